"""The transformers TrainingArguments every training method shares (its TRL config extends them): what they are set
from is methods/base.py's ARGUMENT_SOURCES."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict

from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.config.trainer import Precision
from qwenvl_ft.distributed.engine import engine_arguments

log = logging.getLogger("qwenvl_ft")


def training_arguments(cfg: TrainConfig) -> Dict:
    """The transformers TrainingArguments every method shares (SFTConfig, DPOConfig, ... extend them), with
    trainer.extra_args added (preflight checked them against the method's config class)."""
    import torch

    from qwenvl_ft.data.workers import training_workers
    from qwenvl_ft.training.preflight import effective_precision
    from qwenvl_ft.training.speed import check_liger, trainer_applies_liger

    trainer_cfg = cfg.trainer
    check_liger(cfg.model)
    precision = effective_precision(trainer_cfg.precision)
    has_cuda = torch.cuda.is_available()
    workers = training_workers(cfg.data.num_workers, trainer_cfg.gradient_accumulation_steps)
    log.info("data loader: %d worker process(es)%s (%s)", workers.num_workers,
             f", persistent, {workers.prefetch_factor} batches ready each" if workers.num_workers else "", workers.why)
    if trainer_cfg.tf32 and not has_cuda:
        log.warning("trainer.tf32=true ignored: no CUDA device")
    # TensorBoard event files go next to the checkpoints (transformers reads this variable).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.output_dir) / "tensorboard")
    arguments = dict(
        output_dir=cfg.output_dir,
        num_train_epochs=trainer_cfg.epochs,
        max_steps=trainer_cfg.max_steps,
        per_device_train_batch_size=trainer_cfg.batch_size,
        per_device_eval_batch_size=trainer_cfg.eval_batch_size,
        gradient_accumulation_steps=trainer_cfg.gradient_accumulation_steps,
        **optimizer_arguments(cfg.optimizer),
        bf16=precision == Precision.bf16,
        fp16=precision == Precision.fp16,
        tf32=trainer_cfg.tf32 if has_cuda else None,
        activation_checkpointing=cfg.model.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        **logging_arguments(cfg),
        seed=cfg.seed,
        data_seed=cfg.data.seed,
        dataloader_pin_memory=has_cuda,  # pinned memory only helps copies to a GPU
        **workers.training_arguments(),
        # Liger's own patch, applied by the Trainer, for the families we do not swap ourselves (training/trainer.py
        # finish_trainer does those); TRL keeps its own fused LM head and loss
        use_liger_kernel=trainer_applies_liger(cfg.model),
        **evaluation_arguments(trainer_cfg),
        **trainer_cfg.extra_args,
    )
    arguments.update(engine_arguments(cfg))  # DDP / FSDP2 / DeepSpeed (qwenvl_ft/distributed/engine.py)
    return arguments


def optimizer_arguments(optim_cfg) -> Dict:
    """The optimizer and its learning-rate schedule (the optimizer group)."""
    return dict(
        learning_rate=optim_cfg.lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.betas[0],
        adam_beta2=optim_cfg.betas[1],
        adam_epsilon=optim_cfg.eps,
        optim=optim_cfg.name,
        lr_scheduler_type=optim_cfg.scheduler.value,
        # an int counts optimizer steps, a float below 1 is a ratio of all steps
        warmup_steps=optim_cfg.warmup_steps if optim_cfg.warmup_steps is not None else optim_cfg.warmup_ratio,
        max_grad_norm=optim_cfg.max_grad_norm,
    )


def logging_arguments(cfg: TrainConfig) -> Dict:
    """Logging, checkpoints and the trackers."""
    from qwenvl_ft.training.preflight import active_trackers

    trainer_cfg = cfg.trainer
    return dict(
        logging_steps=trainer_cfg.logging_steps,
        logging_first_step=True,
        save_strategy=trainer_cfg.save_strategy.value,
        save_steps=trainer_cfg.save_steps,
        save_total_limit=trainer_cfg.save_total_limit,
        report_to=active_trackers(trainer_cfg.report_to),
        run_name=tracker_run_name(cfg),
        disable_tqdm=trainer_cfg.disable_tqdm,
        # A non-finite loss is logged as it is: transformers' filter logs the mean of the window's earlier steps
        # in its place, 0.000 when it is the window's first (trainer.on_nonfinite decides what happens to the run)
        logging_nan_inf_filter=False,
    )


def tracker_run_name(cfg: TrainConfig) -> str:
    """The run's name in the trackers: trainer.tracker.run_name, else the run folder's name (a sweep job's
    folder is its number, so it is named after the sweep folder too)."""
    if cfg.trainer.tracker.run_name:
        return cfg.trainer.tracker.run_name
    folder = Path(cfg.output_dir)
    return f"{folder.parent.name}-{folder.name}" if folder.name.isdigit() else folder.name


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
