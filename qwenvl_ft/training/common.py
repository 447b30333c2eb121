"""What every trainer kind (SFT, DPO) shares: starting a run, TrainingArguments, callbacks, optimizer groups,
saving the result and stopping early on a signal."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.schema import Precision, TrainConfig

log = logging.getLogger("qwenvl_ft")


@dataclass
class RunStart:
    typed: TrainConfig
    output_dir: Path
    resume: Optional[str]  # checkpoint to resume from, None for a fresh start
    finished: Optional[Dict]  # metrics of an already finished identical run: nothing left to do


def start_run(cfg: DictConfig) -> RunStart:
    """Validate, take the output folder (one writer per folder: a second run on it is refused; the ranks of one
    distributed launch share it), find the checkpoint to resume from, and record the resolved config there."""
    from qwenvl_ft.runlock import lock_folder
    from qwenvl_ft.runtime import ensure_writable
    from qwenvl_ft.training.resume import finished_metrics, prepare_resume

    typed: TrainConfig = validate(cfg)
    output_dir = ensure_writable(Path(typed.output_dir))
    lock_folder(output_dir)
    resume = prepare_resume(typed, cfg)  # before config.yaml is rewritten: it warns about config changes
    finished = finished_metrics(typed, cfg, resume)
    if finished is None:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log_config_summary(typed)
    return RunStart(typed, output_dir, resume, finished)


def write_history(trainer, output_dir: Path, metrics: Dict) -> None:
    from qwenvl_ft.runtime import write_atomically

    write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_atomically(output_dir / "log_history.json", json.dumps(trainer.state.log_history, indent=1))


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
        dataloader_pin_memory=has_cuda,  # pinned memory only helps copies to a GPU
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
    try:
        trainer.save_model(str(staging))
        processor.save_pretrained(str(staging))
    except BaseException:  # a full disk, Ctrl-C: the partial copy would only take space
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final_dir.exists():
        shutil.rmtree(final_dir)
    staging.rename(final_dir)
    return final_dir


def interrupted(trainer, output_dir: Path, metrics: Dict) -> Dict:
    """Stopped by a signal (SIGTERM, Ctrl-C): the checkpoint is saved, final/ is not written (the run is not
    finished). `metrics["signal_number"]` tells runtime.run_task which exit status to give."""
    from qwenvl_ft.training.resume import StopOnSignal

    state = trainer.state
    checkpoint = output_dir / f"checkpoint-{state.global_step}"
    received = [cb.received for cb in trainer.callback_handler.callbacks
                if isinstance(cb, StopOnSignal) and cb.received is not None]
    metrics.update(interrupted=True, global_step=state.global_step, max_steps=state.max_steps,
                   checkpoint=str(checkpoint), signal_number=int(received[0]) if received else None)
    write_history(trainer, output_dir, metrics)
    log.warning("interrupted at step %d of %d; checkpoint saved to %s. Run the same command again to resume.",
                state.global_step, state.max_steps, checkpoint)
    return metrics


def optimizer_steps(typed: TrainConfig, items: int, batch_size: Optional[int] = None) -> int:
    """Steps for `items` dataset items of `batch_size` (default trainer.batch_size; a packed run has 1 pack each)."""
    t = typed.trainer
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(items / (batch_size or t.batch_size)) / t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.epochs)


def log_config_summary(typed: TrainConfig) -> None:
    m, a, d, o = typed.model, typed.adapter, typed.data, typed.optimizer
    source = "random init (tiny)" if m.random_init else m.name_or_path
    adapter = a.method.value if not a.is_peft else f"{a.method.value} r={a.r} alpha={a.alpha} on {list(a.target_modules)}"
    log.info("run: model=%s (%s) | adapter=%s | data=%s %s | lr=%g %s | output=%s", source, m.dtype.value, adapter,
             d.format.value, d.describe_path() if d.path or d.sources else "", o.lr, o.scheduler.value,
             typed.output_dir)
