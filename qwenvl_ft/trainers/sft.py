"""Supervised fine-tuning (qwenvl_ft/methods/sft.py): TRL's SFTTrainer with our collator.

Batch layouts (padded, length-grouped, token budget, packed) are planned here from the data check's row lengths
(training/speed.py); the held-out generation check before and after training is the base class's.
"""

from __future__ import annotations

from typing import Dict, Optional

from qwenvl_ft.trainers.base import Training, TrainerParts, standalone_parts
from qwenvl_ft.training.trainer import finish_trainer, trainer_class


class SftTraining(Training):
    def trainer_arguments(self, parts: TrainerParts, common: Dict):
        from trl import SFTConfig

        from qwenvl_ft.data.batching import training_batches
        from qwenvl_ft.data.packing import position_function

        cfg = parts.cfg
        batches = training_batches(cfg.data, cfg.trainer.batch_size, parts.collator, parts.train_rows,
                                   cfg.data.seed, lengths=parts.train_lengths,
                                   positions=position_function(parts.model_config) if parts.model_config else None,
                                   fixed_packs=cfg.model.compile)
        parts.state["batches"] = batches
        arguments = {**common, "per_device_train_batch_size": batches.per_device_batch_size}
        if batches.sampling_strategy is not None:
            arguments["train_sampling_strategy"] = batches.sampling_strategy
        return SFTConfig(
            **arguments,
            # The collator needs the raw rows; TRL must neither tokenise nor drop columns.
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,  # truncation is the collator's (it never cuts an image)
        )

    def build_trainer(self, parts: TrainerParts):
        from peft import get_peft_model

        model = parts.model if parts.peft_config is None else get_peft_model(parts.model, parts.peft_config)
        return build_trainer(parts.cfg, model, parts.processor, parts.collator, parts.train_rows, parts.eval_rows,
                             parts)

    def result_line(self, metrics: Dict) -> str:
        line = super().result_line(metrics)
        if "eval_exact_match_before" in metrics and "eval_exact_match_after" in metrics:
            line += (f"; held-out exact match {metrics['eval_exact_match_before']:.1%} -> "
                     f"{metrics['eval_exact_match_after']:.1%}")
        if "eval_iou_50_before" in metrics and "eval_iou_50_after" in metrics:
            line += f"; held-out IoU@0.5 {metrics['eval_iou_50_before']:.1%} -> {metrics['eval_iou_50_after']:.1%}"
        return line


def build_trainer(cfg, model, processor, collator, train_rows, eval_rows, parts: Optional[TrainerParts] = None):
    """TRL's SFTTrainer in the configured batch layout. `parts` carries what the run skeleton prepared (arguments,
    callbacks, trainer mixins); without it (tests, benchmarks) the same is built here from `cfg`."""
    from accelerate.utils import is_peft_model
    from trl import SFTTrainer

    from qwenvl_ft.modeling.cpu_lm_head import add_cpu_lm_head

    if parts is None:
        parts = standalone_parts(TRAINING, cfg, model, processor, collator, train_rows, eval_rows)
    batches = parts.state["batches"]
    trainer = trainer_class(SFTTrainer, parts.trainer_mixins)(
        model=model,
        args=parts.arguments,
        data_collator=batches.collator,
        train_dataset=batches.dataset,
        eval_dataset=eval_rows if cfg.trainer.eval_steps is not None else None,
        processing_class=processor,
        callbacks=parts.callbacks,
    )
    # After SFTTrainer.__init__, which added TRL's fused LM head to the base model: on a CPU with a small vocabulary
    # the label positions' logits are cheaper than TRL's tiles, with the same loss and metrics (modeling/cpu_lm_head.py)
    add_cpu_lm_head(trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model)
    return finish_trainer(trainer, cfg)


TRAINING = SftTraining()
