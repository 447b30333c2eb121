"""Direct preference optimisation: composed config in, trained adapter (or model) + processor + metrics out.

Reads top to bottom like sft.py: processor -> preference pairs -> model (+4-bit, +adapter) -> collator -> TRL
DPOTrainer (+ images encoded once per pair, + no padding with data.packing) (-> reference log-probabilities
precomputed, when asked) -> train -> save -> held-out rewards. There is
no held-out pass before training: the policy starts as the reference, so every reward is 0 (accuracy 0, margin 0)
by construction. Same output layout as SFT: config.yaml, tensorboard/, checkpoint-*/, final/, metrics.json,
log_history.json.

The reference policy is whatever TRL makes of `ref_model=None`. With LoRA/DoRA/QLoRA the base model goes to TRL
unwrapped, with the LoraConfig as `peft_config`: TRL wraps it and computes the reference with the adapter disabled
(no second copy). Given a PeftModel instead, TRL 1.16 would add a "ref" adapter copied from the trained one, a
second copy of every adapter weight and modules_to_save module. Full fine-tuning gets a second frozen copy loaded
from the same checkpoint (or, with trainer.dpo.precompute_ref_log_probs, none during training).
"""

from __future__ import annotations

import gc
import logging
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig

from qwenvl_ft.config.schema import ConfigError, TrainConfig
from qwenvl_ft.training.common import build_optimizers, interrupted, optimizer_steps, save_final, start_run, \
    training_arguments, training_callbacks, write_history

log = logging.getLogger("qwenvl_ft")


def train(cfg: DictConfig) -> Dict:
    run = start_run(cfg)
    if run.finished is not None:
        return run.finished
    typed, output_dir, resume = run.typed, run.output_dir, run.resume
    from qwenvl_ft.training.resume import ReloadConvertedWeights, StopOnSignal
    dpo = typed.trainer.dpo
    log.info("dpo: beta=%g loss=%s%s", dpo.beta, "+".join(t.value for t in dpo.loss_type),
             " | reference log-probs precomputed" if dpo.precompute_ref_log_probs else "")

    from transformers import set_seed

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.preference import load_pair_splits
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor, count_parameters, \
        model_source

    set_seed(typed.seed)
    source = model_source(typed.model)
    processor = build_processor(typed.model, typed.data, source)
    train_rows, eval_rows = load_pair_splits(typed.data)
    log.info("data: %d training pairs, %d held-out pairs", len(train_rows), len(eval_rows) if eval_rows else 0)
    if typed.trainer.eval_steps is not None and eval_rows is None:
        raise ConfigError("trainer.eval_steps needs held-out pairs: set data.eval_size or data.eval_path")

    base = build_base_model(typed.model, typed.adapter, source)
    peft_config = build_lora_config(base, typed.model, typed.adapter) if typed.adapter.is_peft else None
    collator = VisionPreferenceCollator(processor, typed.data)

    trainer = build_trainer(typed, base, peft_config, processor, collator, train_rows, eval_rows)
    remove_redundant_work(trainer, typed.data.packing)
    trainable, total = count_parameters(trainer.model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    reference = "the base with the adapter disabled" if trainer.ref_model is None \
        else "a frozen copy of the starting model"
    if dpo.precompute_ref_log_probs:
        # Before a resumed run loads its checkpoint: the reference is the starting model either way.
        precompute_reference(trainer, dpo.precompute_ref_batch_size or typed.trainer.batch_size)
        reference = f"log-probabilities of {reference}, precomputed"
    log.info("reference: %s", reference)

    metrics: Dict = {"reference": reference}
    steps = optimizer_steps(typed, len(train_rows))
    log.info("training: %d optimizer steps (%s epochs, batch %d pairs x accumulation %d)", steps,
             typed.trainer.epochs if typed.trainer.max_steps <= 0 else "-", typed.trainer.batch_size,
             typed.trainer.gradient_accumulation_steps)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    trainer.add_callback(ReloadConvertedWeights(resume))
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume)
    if stop.interrupted(trainer.state):
        return interrupted(trainer, output_dir, metrics)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics.update(train_loss=result.training_loss, train_runtime_s=result.metrics.get("train_runtime"),
                   global_step=trainer.state.global_step)
    for key, name in (("loss", "logged_loss"), ("rewards/accuracies", "logged_reward_accuracy"),
                      ("rewards/margins", "logged_reward_margin")):
        values = [entry[key] for entry in history if key in entry]
        metrics[f"first_{name}"] = values[0] if values else None
        metrics[f"last_{name}"] = values[-1] if values else None

    final_dir = save_final(trainer, processor, output_dir)
    if eval_rows is not None:
        metrics.update(_held_out(trainer))
    write_history(trainer, output_dir, metrics)
    log.info("saved %s to %s", "adapter" if typed.adapter.is_peft else "model", final_dir)
    log.info("result: DPO loss %.3f -> %.3f; reward accuracy %.2f -> %.2f, margin %.3f -> %.3f%s",
             metrics["first_logged_loss"], metrics["last_logged_loss"], metrics["first_logged_reward_accuracy"],
             metrics["last_logged_reward_accuracy"], metrics["first_logged_reward_margin"],
             metrics["last_logged_reward_margin"],
             f"; held-out reward accuracy {metrics['eval_reward_accuracy']:.1%}" if eval_rows is not None else "")
    return metrics


# ----------------------------------------------------------------------------------------------------------------


def build_trainer(typed: TrainConfig, base, peft_config, processor, collator, train_rows, eval_rows):
    """DPOTrainer around the base model; `peft_config` (None for full fine-tuning) is applied by TRL."""
    from trl import DPOConfig, DPOTrainer

    from qwenvl_ft.training.speed import check_liger, vision_checkpointing_callback

    dpo = typed.trainer.dpo
    check_liger(typed.model)
    callbacks = training_callbacks(typed)
    if typed.model.vision_checkpointing != typed.model.gradient_checkpointing:
        callbacks.append(vision_checkpointing_callback(typed.model.vision_checkpointing))
    args = DPOConfig(
        **training_arguments(typed),
        use_liger_kernel=typed.model.use_liger_kernel,  # TRL applies the layer kernels, never the fused loss
        # The collator needs the raw rows (and `source`, for its errors); TRL must not drop columns.
        remove_unused_columns=False,
        max_length=typed.data.max_length,  # truncation is the collator's; TRL only quotes it in an error
        beta=dpo.beta,
        loss_type=[t.value for t in dpo.loss_type],
        loss_weights=list(dpo.loss_weights) if dpo.loss_weights is not None else None,
        label_smoothing=dpo.label_smoothing,
        precompute_ref_log_probs=False,  # TRL refuses it for image data; see precompute_reference
    )
    trainer = DPOTrainer(
        model=base,
        ref_model=None,  # LoRA: the adapter disabled; full fine-tuning: TRL loads a frozen copy
        peft_config=peft_config,
        args=args,
        data_collator=collator,
        train_dataset=train_rows,
        eval_dataset=eval_rows,  # evaluated after training, and every trainer.eval_steps
        processing_class=processor,  # the processor, not the tokenizer: TRL treats the model as a VLM
        callbacks=callbacks,
    )
    # Separate vision / merger learning rates need the parameters as trained, i.e. after TRL's PEFT wrapping;
    # the Trainer builds its own optimizer only when none is set by then.
    trainer.optimizer, _ = build_optimizers(typed, trainer.model, args)
    return trainer


def remove_redundant_work(trainer, packing: bool) -> list:
    """Policy and reference encode each pair's images once (always: it is exact); with data.packing their language
    model also skips the padding (modeling/padding_free.py explains how, and why inside the model)."""
    from qwenvl_ft.modeling.padding_free import share_pair_images, unpad_language_model
    from qwenvl_ft.modeling.varlen_attention import NAME, use_for_language_model

    handles = []
    for model in (trainer.model, trainer.ref_model):
        if model is None:
            continue
        handles += share_pair_images(model)
        if packing:
            handles += unpad_language_model(model)
            # with sdpa, per-sample attention instead of a block-diagonal mask over the packed row
            if use_for_language_model(model):
                log.info("packing: language model attention switched from sdpa to %s (per-sample SDPA)", NAME)
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
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False,
                        num_workers=trainer.args.dataloader_num_workers)
    device = trainer.accelerator.device
    # With a PeftModel and no ref_model, compute_ref_log_probs disables the adapter itself.
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    from tqdm.auto import tqdm

    chosen: List[torch.Tensor] = []
    rejected: List[torch.Tensor] = []
    for batch in tqdm(loader, desc="reference log-probabilities", unit=" batches", leave=False):
        batch = {key: value.to(device) for key, value in batch.items()}
        chosen_logps, rejected_logps = trainer.compute_ref_log_probs(model, batch)
        chosen.append(chosen_logps.float().cpu())
        rejected.append(rejected_logps.float().cpu())
    dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
    return dataset.add_column("ref_rejected_logps", torch.cat(rejected).tolist())


def _held_out(trainer) -> Dict[str, Optional[float]]:
    """DPO metrics of the held-out pairs: how often the trained policy's implicit reward ranks the chosen answer
    first, by what margin, and the loss."""
    result = trainer.evaluate()
    metrics = {"eval_reward_accuracy": result.get("eval_rewards/accuracies"),
               "eval_reward_margin": result.get("eval_rewards/margins"), "eval_loss": result.get("eval_loss")}
    log.info("held-out pairs after training: reward accuracy %.1f%% (0%% before: the policy starts as the "
             "reference), margin %.3f, DPO loss %.3f", 100 * metrics["eval_reward_accuracy"],
             metrics["eval_reward_margin"], metrics["eval_loss"])
    return metrics
