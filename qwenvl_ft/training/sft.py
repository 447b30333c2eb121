"""Supervised fine-tuning: composed config in, trained adapter (or model) + processor + metrics out.

Reads top to bottom: processor -> data -> model (+4-bit, +adapter) -> collator -> held-out predictions before
-> TRL SFTTrainer -> save -> held-out predictions after.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.schema import ConfigError, Precision, TrainConfig

log = logging.getLogger("qwenvl_ft")


def train(cfg: DictConfig) -> Dict:
    typed: TrainConfig = validate(cfg)
    output_dir = Path(typed.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    from qwenvl_ft.training.resume import ReloadConvertedWeights, StopOnSignal, finished_metrics, prepare_resume

    resume = prepare_resume(typed, cfg)  # before config.yaml is rewritten: it warns about config changes
    finished = finished_metrics(typed, cfg, resume)
    if finished is not None:
        return finished
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _log_config_summary(typed)

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

    model = build_model(typed.model, typed.adapter, source)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    collator = VisionChatCollator(processor, typed.data)

    metrics: Dict = {}
    held_out = list(eval_rows) if eval_rows is not None and typed.trainer.eval_generation else []
    if held_out:
        metrics.update(_held_out_check(model, collator, held_out, typed, "before"))

    if typed.trainer.eval_steps is not None and eval_rows is None:
        raise ConfigError("trainer.eval_steps needs held-out rows: set data.eval_size or data.eval_path")
    trainer = build_trainer(typed, model, processor, collator, train_rows, eval_rows)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    trainer.add_callback(ReloadConvertedWeights(resume))
    steps = _optimizer_steps(typed, len(trainer.train_dataset), trainer.args.per_device_train_batch_size)
    log.info("training: %d optimizer steps (%s epochs, batch %d x accumulation %d)", steps,
             typed.trainer.epochs if typed.trainer.max_steps <= 0 else "-", typed.trainer.batch_size,
             typed.trainer.gradient_accumulation_steps)
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume)
    if stop.interrupted(trainer.state):
        return _interrupted(trainer, output_dir, metrics)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics.update(train_loss=result.training_loss, train_runtime_s=result.metrics.get("train_runtime"),
                   first_logged_loss=losses[0] if losses else None, last_logged_loss=losses[-1] if losses else None,
                   global_step=trainer.state.global_step)

    final_dir = save_final(trainer, processor, output_dir)
    if held_out:
        metrics.update(_held_out_check(model, collator, held_out, typed, "after"))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
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


def training_arguments(typed: TrainConfig) -> Dict:
    """The transformers TrainingArguments every trainer kind shares (SFTConfig and DPOConfig extend them)."""
    trainer_cfg, optim_cfg = typed.trainer, typed.optimizer
    has_cuda = torch.cuda.is_available()
    if trainer_cfg.tf32 and not has_cuda:
        log.warning("trainer.tf32=true ignored: no CUDA device")
    # TensorBoard event files go next to the checkpoints (transformers reads this variable).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(typed.output_dir) / "tensorboard")
    return dict(
        output_dir=typed.output_dir,
        num_train_epochs=trainer_cfg.epochs,
        max_steps=trainer_cfg.max_steps,
        per_device_train_batch_size=trainer_cfg.batch_size,
        per_device_eval_batch_size=trainer_cfg.eval_batch_size,
        gradient_accumulation_steps=trainer_cfg.gradient_accumulation_steps,
        learning_rate=optim_cfg.lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.betas[0],
        adam_beta2=optim_cfg.betas[1],
        adam_epsilon=optim_cfg.eps,
        optim=optim_cfg.name,
        lr_scheduler_type=optim_cfg.scheduler.value,
        warmup_steps=optim_cfg.warmup_ratio,  # a float below 1 is a ratio of all steps
        max_grad_norm=optim_cfg.max_grad_norm,
        bf16=trainer_cfg.precision == Precision.bf16,
        fp16=trainer_cfg.precision == Precision.fp16,
        tf32=trainer_cfg.tf32 if has_cuda else None,
        gradient_checkpointing=typed.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=trainer_cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=trainer_cfg.save_steps,
        save_total_limit=trainer_cfg.save_total_limit,
        report_to=[r for r in trainer_cfg.report_to if r != "none"],
        disable_tqdm=trainer_cfg.disable_tqdm,
        seed=typed.seed,
        data_seed=typed.data.seed,
        dataloader_num_workers=typed.data.num_workers,
        **evaluation_arguments(trainer_cfg),
    )


def evaluation_arguments(trainer_cfg) -> Dict:
    """Evaluation during training: held-out loss every trainer.eval_steps, best checkpoint, early stopping."""
    selects = trainer_cfg.load_best_model_at_end or trainer_cfg.early_stopping_patience is not None
    return dict(
        eval_strategy="steps" if trainer_cfg.eval_steps is not None else "no",
        eval_steps=trainer_cfg.eval_steps,
        # Loss only: keeping logits for metrics would hold batch x length x vocabulary floats per eval batch.
        prediction_loss_only=True,
        load_best_model_at_end=trainer_cfg.load_best_model_at_end,
        metric_for_best_model=trainer_cfg.metric_for_best_model if selects else None,
        greater_is_better=trainer_cfg.greater_is_better if selects else None,
    )


def training_callbacks(typed: TrainConfig) -> list:
    """Callbacks every trainer kind shares: checkpoint completion markers (for resuming) and early stopping."""
    from transformers import EarlyStoppingCallback

    from qwenvl_ft.training.resume import CheckpointCompleteMarker

    callbacks = [CheckpointCompleteMarker()]
    if typed.trainer.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=typed.trainer.early_stopping_patience,
                                               early_stopping_threshold=typed.trainer.early_stopping_threshold))
    return callbacks


def build_optimizers(typed: TrainConfig, model, args) -> tuple:
    """(optimizer, None) with separate vision tower / merger learning rates when asked; (None, None) lets the
    Trainer build its own."""
    from transformers import Trainer

    from qwenvl_ft.modeling.build import optimizer_param_groups

    optim_cfg = typed.optimizer
    if optim_cfg.vision_lr is None and optim_cfg.merger_lr is None:
        return None, None
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = optimizer_param_groups(model, optim_cfg, Trainer.get_decay_parameter_names(None, model))
    return optimizer_cls(groups, **optimizer_kwargs), None


def save_final(trainer, processor, output_dir: Path) -> Path:
    """Adapter (or full model) and processor in `final/`, written to a temporary folder and renamed into place,
    so a crash mid-save never leaves a folder that looks complete."""
    final_dir = output_dir / "final"
    staging = output_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    processor.save_pretrained(str(staging))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    staging.rename(final_dir)
    return final_dir


def _interrupted(trainer, output_dir: Path, metrics: Dict) -> Dict:
    """Stopped by a signal: the checkpoint is saved, final/ is not written (the run is not finished)."""
    state = trainer.state
    (output_dir / "log_history.json").write_text(json.dumps(state.log_history, indent=1))
    checkpoint = output_dir / f"checkpoint-{state.global_step}"
    metrics.update(interrupted=True, global_step=state.global_step, max_steps=state.max_steps,
                   checkpoint=str(checkpoint))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.warning("interrupted at step %d of %d; checkpoint saved to %s. Run the same command again to resume.",
                state.global_step, state.max_steps, checkpoint)
    return metrics


def _held_out_check(model, collator, rows: List[dict], typed: TrainConfig, when: str) -> Dict:
    from qwenvl_ft.evaluation.generate import evaluate_rows

    result = evaluate_rows(model, collator, rows, typed.trainer.eval_batch_size, typed.trainer.max_new_tokens)
    shown = min(typed.trainer.num_predictions_to_print, len(rows))
    lines = [f"held-out predictions {when} training (exact match {result['exact_match']:.1%} on {len(rows)} rows):"]
    for prediction, reference in list(zip(result["predictions"], result["references"]))[:shown]:
        lines.append(f"  predicted: {prediction!r:40s} reference: {reference!r}")
    log.info("\n".join(lines))
    return {f"eval_{name}_{when}": result[name] for name in ("exact_match", "bleu", "rouge_l")}


def _optimizer_steps(typed: TrainConfig, items: int, batch_size: Optional[int] = None) -> int:
    """Steps for `items` dataset items of `batch_size` (default trainer.batch_size; a packed run has 1 pack each)."""
    t = typed.trainer
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(items / (batch_size or t.batch_size)) / t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.epochs)


def _log_config_summary(typed: TrainConfig) -> None:
    m, a, d, o = typed.model, typed.adapter, typed.data, typed.optimizer
    source = "random init (tiny)" if m.random_init else m.name_or_path
    adapter = a.method.value if not a.is_peft else f"{a.method.value} r={a.r} alpha={a.alpha} on {list(a.target_modules)}"
    log.info("run: model=%s (%s) | adapter=%s | data=%s %s | lr=%g %s | output=%s", source, m.dtype.value, adapter,
             d.format.value, d.path or "", o.lr, o.scheduler.value, typed.output_dir)
