"""Supervised fine-tuning: composed config in, trained adapter (or model) + processor + metrics out.

Reads top to bottom: processor -> data -> model (+4-bit, +adapter) -> collator -> held-out predictions before
-> TRL SFTTrainer -> save -> held-out predictions after.
"""

from __future__ import annotations

import logging
from typing import Dict, List

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

    from transformers import set_seed

    from qwenvl_ft.data.check import load_checked_splits
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_model, build_processor, count_parameters, model_source

    set_seed(typed.seed)
    source = model_source(typed.model)
    processor = build_processor(typed.model, typed.data, source)
    # Every row read, decoded and measured before the model loads; invalid rows stop the run (data.skip_invalid).
    train_rows, eval_rows, _ = load_checked_splits(typed.data, processor, typed.trainer.batch_size, typed.data.seed,
                                                   output_dir)
    log.info("data: %d training rows, %d held-out rows", len(train_rows), len(eval_rows) if eval_rows else 0)
    if typed.trainer.eval_steps is not None and eval_rows is None:
        raise ConfigError("trainer.eval_steps needs held-out rows: set data.eval_size or data.eval_path")

    model = build_model(typed.model, typed.adapter, source)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    collator = VisionChatCollator(processor, typed.data)

    metrics: Dict = {}
    held_out = list(eval_rows) if eval_rows is not None and typed.trainer.eval_generation else []
    if held_out:
        metrics.update(_held_out_check(model, collator, held_out, typed, "before"))

    trainer = build_trainer(typed, model, processor, collator, train_rows, eval_rows)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    trainer.add_callback(ReloadConvertedWeights(resume))
    steps = optimizer_steps(typed, len(trainer.train_dataset), trainer.args.per_device_train_batch_size)
    log.info("training: %d optimizer steps (%s epochs, batch %d x accumulation %d)", steps,
             typed.trainer.epochs if typed.trainer.max_steps <= 0 else "-", typed.trainer.batch_size,
             typed.trainer.gradient_accumulation_steps)
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume)
    if stop.interrupted(trainer.state):
        return interrupted(trainer, output_dir, metrics)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics.update(train_loss=result.training_loss, train_runtime_s=result.metrics.get("train_runtime"),
                   first_logged_loss=losses[0] if losses else None, last_logged_loss=losses[-1] if losses else None,
                   global_step=trainer.state.global_step)

    final_dir = save_final(trainer, processor, output_dir)
    if held_out:
        metrics.update(_held_out_check(model, collator, held_out, typed, "after"))
    write_history(trainer, output_dir, metrics)
    log.info("saved %s to %s", "adapter" if typed.adapter.is_peft else "model", final_dir)
    log.info("result: training loss %.3f -> %.3f%s", metrics["first_logged_loss"], metrics["last_logged_loss"],
             f"; held-out exact match {metrics['eval_exact_match_before']:.1%} -> "
             f"{metrics['eval_exact_match_after']:.1%}" if held_out else "")
    return metrics


# ----------------------------------------------------------------------------------------------------------------


def build_trainer(typed: TrainConfig, model, processor, collator, train_rows, eval_rows):
    from trl import SFTConfig, SFTTrainer

    from qwenvl_ft.training.speed import speed_setup

    # Batch layout (padded / length-grouped / token budget / packed), Liger, vision checkpointing.
    speed = speed_setup(typed, collator, train_rows, model)
    args = SFTConfig(
        **{**training_arguments(typed), **speed.arguments},
        # The collator needs the raw rows; TRL must neither tokenise nor drop columns.
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # truncation is the collator's (it never cuts an image)
    )
    return SFTTrainer(
        model=model,
        args=args,
        data_collator=speed.collator,
        train_dataset=speed.train_dataset,
        eval_dataset=eval_rows if typed.trainer.eval_steps is not None else None,
        processing_class=processor,
        optimizers=build_optimizers(typed, model, args),
        callbacks=training_callbacks(typed) + speed.callbacks,
    )


def _held_out_check(model, collator, rows: List[dict], typed: TrainConfig, when: str) -> Dict:
    from qwenvl_ft.evaluation.generate import evaluate_rows

    result = evaluate_rows(model, collator, rows, typed.trainer.eval_batch_size, typed.trainer.max_new_tokens)
    shown = min(typed.trainer.num_predictions_to_print, len(rows))
    lines = [f"held-out predictions {when} training (exact match {result['exact_match']:.1%} on {len(rows)} rows):"]
    for prediction, reference in list(zip(result["predictions"], result["references"]))[:shown]:
        lines.append(f"  predicted: {prediction!r:40s} reference: {reference!r}")
    log.info("\n".join(lines))
    return {f"eval_{name}_{when}": result[name] for name in ("exact_match", "bleu", "rouge_l")}
