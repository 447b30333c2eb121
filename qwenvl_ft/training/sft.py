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
from qwenvl_ft.config.schema import Precision, TrainConfig

log = logging.getLogger("qwenvl_ft")


def train(cfg: DictConfig) -> Dict:
    typed: TrainConfig = validate(cfg)
    output_dir = Path(typed.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _log_config_summary(typed)

    from transformers import set_seed

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.sources import load_splits
    from qwenvl_ft.modeling.build import build_model, build_processor, count_parameters, model_source

    set_seed(typed.seed)
    source = model_source(typed.model)
    processor = build_processor(typed.model, typed.data, source)
    train_rows, eval_rows = load_splits(typed.data)
    log.info("data: %d training rows, %d held-out rows", len(train_rows), len(eval_rows) if eval_rows else 0)

    model = build_model(typed.model, typed.adapter, source)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    collator = VisionChatCollator(processor, typed.data)

    metrics: Dict = {}
    held_out = list(eval_rows) if eval_rows is not None and typed.trainer.eval_generation else []
    if held_out:
        metrics.update(_held_out_check(model, collator, held_out, typed, "before"))

    trainer = build_trainer(typed, model, processor, collator, train_rows, eval_rows)
    steps = _optimizer_steps(typed, len(train_rows))
    log.info("training: %d optimizer steps (%s epochs, batch %d x accumulation %d)", steps,
             typed.trainer.epochs if typed.trainer.max_steps <= 0 else "-", typed.trainer.batch_size,
             typed.trainer.gradient_accumulation_steps)
    result = trainer.train()
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
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    from qwenvl_ft.modeling.build import optimizer_param_groups

    trainer_cfg, optim_cfg = typed.trainer, typed.optimizer
    has_cuda = torch.cuda.is_available()
    if trainer_cfg.tf32 and not has_cuda:
        log.warning("trainer.tf32=true ignored: no CUDA device")
    # TensorBoard event files go next to the checkpoints (transformers reads this variable).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(typed.output_dir) / "tensorboard")
    args = SFTConfig(
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
        # The collator needs the raw rows; TRL must neither tokenise nor drop columns.
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # truncation is the collator's (it never cuts an image)
        eval_strategy="no",
    )
    optimizers = (None, None)
    if optim_cfg.vision_lr is not None or optim_cfg.merger_lr is not None:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        groups = optimizer_param_groups(model, optim_cfg, Trainer.get_decay_parameter_names(None, model))
        optimizers = (optimizer_cls(groups, **optimizer_kwargs), None)
    return SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_rows,
        processing_class=processor,
        optimizers=optimizers,
    )


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


def _held_out_check(model, collator, rows: List[dict], typed: TrainConfig, when: str) -> Dict:
    from qwenvl_ft.evaluation.generate import evaluate_rows

    result = evaluate_rows(model, collator, rows, typed.trainer.eval_batch_size, typed.trainer.max_new_tokens)
    shown = min(typed.trainer.num_predictions_to_print, len(rows))
    lines = [f"held-out predictions {when} training (exact match {result['exact_match']:.1%} on {len(rows)} rows):"]
    for prediction, reference in list(zip(result["predictions"], result["references"]))[:shown]:
        lines.append(f"  predicted: {prediction!r:40s} reference: {reference!r}")
    log.info("\n".join(lines))
    return {f"eval_exact_match_{when}": result["exact_match"]}


def _optimizer_steps(typed: TrainConfig, rows: int) -> int:
    t = typed.trainer
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(rows / t.batch_size) / t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.epochs)


def _log_config_summary(typed: TrainConfig) -> None:
    m, a, d, o = typed.model, typed.adapter, typed.data, typed.optimizer
    source = "random init (tiny)" if m.random_init else m.name_or_path
    adapter = a.method.value if not a.is_peft else f"{a.method.value} r={a.r} alpha={a.alpha} on {list(a.target_modules)}"
    log.info("run: model=%s (%s) | adapter=%s | data=%s %s | lr=%g %s | output=%s", source, m.dtype.value, adapter,
             d.format.value, d.path or "", o.lr, o.scheduler.value, typed.output_dir)
