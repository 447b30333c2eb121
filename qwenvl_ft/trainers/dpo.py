"""Direct preference optimisation (qwenvl_ft/methods/dpo.py) on image preference pairs, with TRL's DPOTrainer.

The reference policy is whatever TRL makes of `ref_model=None`. With LoRA/DoRA/QLoRA the base model goes to TRL
unwrapped, with the LoraConfig as `peft_config`: TRL wraps it and computes the reference with the adapter disabled
(no second copy). Given a PeftModel instead, TRL 1.16 would add a "ref" adapter copied from the trained one, a
second copy of every adapter weight and modules_to_save module. Full fine-tuning gets a second frozen copy loaded
from the same checkpoint (or, with trainer.dpo.precompute_ref_log_probs, none during training).

There is no held-out reward pass before training: the policy starts as the reference, so every reward is 0
(accuracy 0, margin 0) by construction. Each pair's images are encoded once for chosen and rejected, and with
data.packing the language model runs each batch without its padding (modeling/padding_free.py).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

from qwenvl_ft.trainers.base import Training, TrainerParts, standalone_parts
from qwenvl_ft.training.trainer import finish_trainer, trainer_class

log = logging.getLogger("qwenvl_ft")


class DpoTraining(Training):
    def trainer_arguments(self, parts: TrainerParts, common: Dict):
        from trl import DPOConfig

        cfg = parts.cfg
        dpo = cfg.trainer.dpo
        log.info("dpo: beta=%g loss=%s%s", dpo.beta, "+".join(t.value for t in dpo.loss_type),
                 " | reference log-probs precomputed" if dpo.precompute_ref_log_probs else "")
        return DPOConfig(
            **common,
            # The collator needs the raw rows (and `source`, for its errors); TRL must not drop columns.
            remove_unused_columns=False,
            max_length=cfg.data.max_length,  # truncation is the collator's; TRL only quotes it in an error
            beta=dpo.beta,
            loss_type=[t.value for t in dpo.loss_type],
            loss_weights=list(dpo.loss_weights) if dpo.loss_weights is not None else None,
            label_smoothing=dpo.label_smoothing,
            precompute_ref_log_probs=False,  # TRL refuses it for image data; see precompute_reference
        )

    def build_trainer(self, parts: TrainerParts):
        trainer = build_trainer(parts.cfg, parts.model, parts.peft_config, parts.processor, parts.collator,
                                parts.train_rows, parts.eval_rows, parts)
        remove_redundant_work(trainer, parts.cfg.data.packing)
        reference = "the base with the adapter disabled" if trainer.ref_model is None \
            else "a frozen copy of the starting model"
        dpo = parts.cfg.trainer.dpo
        if dpo.precompute_ref_log_probs:
            # Before a resumed run loads its checkpoint: the reference is the starting model either way.
            precompute_reference(trainer, dpo.precompute_ref_batch_size or parts.cfg.trainer.batch_size)
            reference = f"log-probabilities of {reference}, precomputed"
        log.info("reference: %s", reference)
        parts.state["reference"] = reference
        return trainer

    def before_training(self, trainer, parts: TrainerParts) -> Dict:
        return {"reference": parts.state["reference"], **super().before_training(trainer, parts)}

    def training_metrics(self, trainer, result) -> Dict:
        metrics = super().training_metrics(trainer, result)
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        for key, name in (("rewards/accuracies", "logged_reward_accuracy"), ("rewards/margins", "logged_reward_margin")):
            values = [entry[key] for entry in history if key in entry]
            metrics[f"first_{name}"] = values[0] if values else None
            metrics[f"last_{name}"] = values[-1] if values else None
        return metrics

    def after_training(self, trainer, parts: TrainerParts) -> Dict:
        metrics = held_out_rewards(trainer) if parts.eval_rows is not None else {}
        return {**metrics, **super().after_training(trainer, parts)}

    def result_line(self, metrics: Dict) -> str:
        line = (f"DPO loss {metrics['first_logged_loss']:.3f} -> {metrics['last_logged_loss']:.3f}; reward accuracy "
                f"{metrics['first_logged_reward_accuracy']:.2f} -> {metrics['last_logged_reward_accuracy']:.2f}, "
                f"margin {metrics['first_logged_reward_margin']:.3f} -> {metrics['last_logged_reward_margin']:.3f}")
        if metrics.get("eval_reward_accuracy") is not None:
            line += f"; held-out reward accuracy {metrics['eval_reward_accuracy']:.1%}"
        return line

    # -- evaluation (`qwenvl-ft eval`) -------------------------------------------------------------------------

    def generation_rows(self, rows: List[dict]) -> List[dict]:
        """Each pair as a conversation answered by its chosen answer: what the tuned model should now say."""
        return [{"messages": list(row["prompt"]) + list(row["chosen"]), "images": row["images"], "videos": [],
                 "source": row.get("source", "?")} for row in rows]

    def evaluate_models(self, models: Dict, rows: List[dict], processor, cfg, predictions=None) -> Dict[str, Dict]:
        """Implicit reward accuracy and margin of the tuned model with the base as the reference, as DPO measures
        them in training (beta = trainer.dpo.beta). An adapter's reference is the same model with the adapter
        disabled; a full model needs the base loaded next to it (`eval.compare_base`)."""
        from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
        from qwenvl_ft.evaluation.preference import reward_metrics

        tuned, base = models.get("tuned"), models.get("base")
        is_adapter = tuned is not None and hasattr(tuned, "peft_config")
        if tuned is None or (base is None and not is_adapter):
            log.info("reward accuracy not computed: it needs the fine-tuned model and the base (eval.compare_base)")
            return {}
        reference = None if is_adapter else base
        return {"tuned": reward_metrics(tuned, reference, VisionPreferenceCollator(processor, cfg.data), rows,
                                        cfg.trainer.dpo.beta, cfg.trainer.eval_batch_size)}


TRAINING = DpoTraining()


def build_trainer(cfg, base, peft_config, processor, collator, train_rows, eval_rows,
                  parts: Optional[TrainerParts] = None):
    """DPOTrainer around the base model; `peft_config` (None for full fine-tuning) is applied by TRL. `parts`
    carries what the run skeleton prepared; without it (tests, benchmarks) the same is built here from `cfg`."""
    from trl import DPOTrainer

    if parts is None:
        parts = standalone_parts(TRAINING, cfg, base, processor, collator, train_rows, eval_rows, peft_config)
    trainer = trainer_class(DPOTrainer, parts.trainer_mixins)(
        model=base,
        ref_model=None,  # LoRA: the adapter disabled; full fine-tuning: TRL loads a frozen copy
        peft_config=peft_config,
        args=parts.arguments,
        data_collator=collator,
        train_dataset=train_rows,
        eval_dataset=eval_rows,  # evaluated after training, and every trainer.eval_steps
        processing_class=processor,  # the processor, not the tokenizer: TRL treats the model as a VLM
        callbacks=parts.callbacks,
    )
    return finish_trainer(trainer, cfg)


def remove_redundant_work(trainer, packing: bool) -> list:
    """Policy and reference encode each pair's images once (always: it is exact); with data.packing their language
    model also skips the padding (modeling/padding_free.py explains how, and why inside the model)."""
    from qwenvl_ft.modeling.padding_free import share_pair_images, unpad_language_model

    handles = []
    for model in (trainer.model, trainer.ref_model):
        if model is None:
            continue
        handles += share_pair_images(model)
        if packing:
            handles += unpad_language_model(model)
    log.info("vision: each pair's images encoded once for chosen and rejected%s",
             "; language model runs each batch without its padding (data.packing)" if packing else "")
    return handles


def precompute_reference(trainer, batch_size: int) -> None:
    """Reference log-probabilities of every training (and held-out) pair, computed once, before training.

    TRL 1.16 refuses `precompute_ref_log_probs` for any image dataset, because its precompute path assumes the data
    was tokenised upfront. Our collator processes rows on the fly and deterministically, so one pass of the same
    collator through TRL's own `compute_ref_log_probs` yields exactly what the per-step reference forward would.
    The values become dataset columns that the collator passes on; `precompute_ref_logps` is the switch TRL's own
    precompute path sets, after which `compute_loss` reads them from the batch instead of running the reference.
    """
    import gc

    import torch

    trainer.train_dataset = with_reference_log_probs(trainer, trainer.train_dataset, batch_size)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = with_reference_log_probs(trainer, trainer.eval_dataset, batch_size)
    trainer.precompute_ref_logps = True
    if trainer.ref_model is not None:  # full fine-tuning: the frozen copy is not needed any more
        trainer.ref_model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def with_reference_log_probs(trainer, dataset, batch_size: int):
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False,
                        num_workers=trainer.args.dataloader_num_workers)
    device = trainer.accelerator.device
    # With a PeftModel and no ref_model, compute_ref_log_probs disables the adapter itself.
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    from tqdm.auto import tqdm

    chosen: List[torch.Tensor] = []
    rejected: List[torch.Tensor] = []
    for batch in tqdm(loader, desc="reference log-probabilities", unit=" batches", leave=False,
                      disable=None if trainer.is_world_process_zero() else True):  # None: on a terminal only
        batch = {key: value.to(device) for key, value in batch.items()}
        chosen_logps, rejected_logps = trainer.compute_ref_log_probs(model, batch)
        chosen.append(chosen_logps.float().cpu())
        rejected.append(rejected_logps.float().cpu())
    dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
    return dataset.add_column("ref_rejected_logps", torch.cat(rejected).tolist())


def held_out_rewards(trainer) -> Dict[str, Optional[float]]:
    """DPO metrics of the held-out pairs: how often the trained policy's implicit reward ranks the chosen answer
    first, by what margin, and the loss."""
    result = trainer.evaluate()
    metrics = {"eval_reward_accuracy": result.get("eval_rewards/accuracies"),
               "eval_reward_margin": result.get("eval_rewards/margins"), "eval_loss": result.get("eval_loss")}
    log.info("held-out pairs after training: reward accuracy %.1f%% (0%% before: the policy starts as the "
             "reference), margin %.3f, DPO loss %.3f", 100 * metrics["eval_reward_accuracy"],
             metrics["eval_reward_margin"], metrics["eval_loss"])
    return metrics
