"""The run skeleton every training method goes through: composed config in, trained adapter (or model) +
processor + metrics out.

Reads top to bottom: validate and find the checkpoint to resume from -> processor -> the data, read and checked by
the method's own reader and measurer -> the method's TRL arguments (before the model: DeepSpeed ZeRO-3 partitions
a model at load time only when its config already exists) -> model (+4-bit, + the adapter's config) -> the method's
TRL trainer (opening the experiment trackers) -> held-out figures before -> train (stopping cleanly on SIGTERM)
-> save final/ -> held-out figures after, each also sent to the trackers with a prediction gallery -> the model
card of final/ (and the upload with hub.push). What differs between SFT, DPO, GRPO, ... is in qwenvl_ft/methods/;
what they share is in common.py.
"""

from __future__ import annotations

import logging
import time
from typing import Dict

from omegaconf import DictConfig

from qwenvl_ft.config.schema import ConfigError, TrainConfig
from qwenvl_ft.training.common import finish_final, interrupted, optimizer_steps, save_final, shared_parts, \
    start_run, write_history

log = logging.getLogger("qwenvl_ft")


def train(composed: DictConfig) -> Dict:
    started = time.time()
    run = start_run(composed)
    if run.finished is not None:
        return run.finished
    cfg, output_dir = run.cfg, run.output_dir
    from transformers import AutoConfig, set_seed

    from qwenvl_ft.training.start_from import train_start_model

    # model.start_from: the run this one starts from, trained first when it is missing
    stopped = train_start_model(cfg, train)
    if stopped is not None:
        return stopped

    from qwenvl_ft import methods
    from qwenvl_ft.data.batching import stored_lengths
    from qwenvl_ft.data.check import load_checked_splits
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor, count_parameters, \
        model_source
    from qwenvl_ft.training.resume import ReloadConvertedWeights, StopOnSignal
    from qwenvl_ft.training.trackers import run_trackers

    method = methods.get(cfg.trainer.kind)
    set_seed(cfg.seed)
    source = model_source(cfg.model)
    processor = build_processor(cfg.model, cfg.data, source)
    # Every row read, decoded and measured before the model loads; invalid rows stop the run (data.skip_invalid).
    train_rows, eval_rows, _ = load_checked_splits(cfg.data, processor, cfg.trainer.batch_size, cfg.data.seed,
                                                        output_dir)
    log.info("data: %d training %s, %d held-out", len(train_rows), method.row_kind, len(eval_rows or []))
    if cfg.trainer.eval_steps is not None and eval_rows is None:
        raise ConfigError("trainer.eval_steps needs held-out rows: set data.eval_size or data.eval_path")

    model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    parts = shared_parts(cfg, processor, method.collator(processor, cfg.data), train_rows, eval_rows, model_config,
                         train_lengths=stored_lengths(train_rows))  # measured once, by the data check
    trackers = run_trackers(cfg, composed, method, processor, eval_rows)
    parts.callbacks.append(trackers)  # opens the trackers' runs when the trainer is built (main process only)
    parts.arguments = method.trainer_arguments(parts, parts.arguments)
    parts.model = build_base_model(cfg.model, cfg.adapter, source)
    parts.peft_config = build_lora_config(parts.model, cfg.model, cfg.adapter) if cfg.adapter.is_peft else None
    trainer = method.build_trainer(parts)
    trainable, total = count_parameters(trainer.model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    with trackers.closing():  # the trackers' runs end as finished, or as failed if anything below raises
        metrics: Dict = method.before_training(trainer, parts)
        trackers.held_out("before", metrics, 0, trainer.model)
        stop = StopOnSignal()
        trainer.add_callback(stop)
        trainer.add_callback(ReloadConvertedWeights(run.resume))
        log_plan(cfg, method, len(trainer.train_dataset), trainer.args.per_device_train_batch_size)
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=run.resume)
        if stop.interrupted(trainer.state):
            return interrupted(trainer, output_dir, metrics)
        metrics.update(method.training_metrics(trainer, result))

        final_dir = save_final(trainer, processor, output_dir)
        after = method.after_training(trainer, parts)
        trackers.held_out("after", after, trainer.state.global_step, trainer.model)
        metrics.update(after)
        write_history(trainer, output_dir, metrics)
    log.info("saved %s to %s", "adapter" if cfg.adapter.is_peft else "model", final_dir)
    log.info("result: %s", method.result_line(metrics))
    if trainer.is_world_process_zero():  # the model card of final/ (and the upload when hub.push), once
        finish_final(output_dir, started_at=started)
    return metrics


def log_plan(cfg: TrainConfig, method, items: int, per_device_batch: int) -> None:
    steps = optimizer_steps(cfg, items, per_device_batch)
    log.info("training: %d optimizer steps (%s epochs, batch %d %s x accumulation %d)", steps,
             cfg.trainer.epochs if cfg.trainer.max_steps <= 0 else "-", cfg.trainer.batch_size, method.batch_unit,
             cfg.trainer.gradient_accumulation_steps)
