"""`qwenvl-ft train`: the run skeleton every training method goes through: composed config in, trained adapter (or
model) + processor + metrics out.

Reads top to bottom: validate and find the checkpoint to resume from -> processor -> the data, read and checked by
the method's own reader and measurer -> the method's TRL arguments (before the model: DeepSpeed ZeRO-3 partitions
a model at load time only when its config already exists) -> model (+4-bit, + the adapter's config) -> the method's
TRL trainer (opening the experiment trackers) -> held-out figures before -> train (stopping cleanly on SIGTERM)
-> save final/ -> held-out figures after, each also sent to the trackers with a prediction gallery -> the model
card of final/ (and the upload with hub.push). What differs between SFT, DPO, GRPO, ... is declared in
qwenvl_ft/methods/, with their rows in qwenvl_ft/data/kinds.py and their training in qwenvl_ft/trainers/; what
they share is in qwenvl_ft/training/.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from omegaconf import DictConfig

from qwenvl_ft import methods
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.trainers.base import TrainerParts, Training, shared_parts, training_of
from qwenvl_ft.training.finish import finish_final, interrupted, log_performance, save_final, write_history
from qwenvl_ft.training.start import RunStart, start_run

log = logging.getLogger("qwenvl_ft")


def train(composed: DictConfig) -> Dict:
    """Train the method trainer.kind names on the composed config; its metrics (also in metrics.json)."""
    started = time.time()
    run = start_run(composed)
    if run.finished is not None:
        return run.finished
    cfg, output_dir = run.cfg, run.output_dir
    from qwenvl_ft.training.start_from import train_start_model

    # model.start_from: the run this one starts from, trained first when it is missing
    stopped = train_start_model(cfg, train)
    if stopped is not None:
        return stopped

    method = methods.get(cfg.trainer.kind)
    training = training_of(method)
    parts, trackers = prepare(run, composed, method, training)
    trainer = build(training, parts)
    with trackers.closing():  # the trackers' runs end as finished, or as failed if anything below raises
        metrics, final_dir = fit(run, method, training, trainer, parts, trackers)
    if final_dir is None:  # stopped by a signal: the checkpoint is saved, final/ is not
        return metrics
    log.info("saved %s to %s", "adapter" if cfg.adapter.is_peft else "model", final_dir)
    from qwenvl_ft.training.divergence import nonfinite_note

    log.info("result: %s%s", training.result_line(metrics), nonfinite_note(metrics))
    if trainer.is_world_process_zero():  # the model card of final/ (and the upload when hub.push), once
        finish_final(output_dir, started_at=started, linear_attention=linear_attention_backend(trainer.model))
    log_performance(metrics)
    return metrics


def prepare(run: RunStart, composed: DictConfig, method: methods.Method, training: Training) -> Tuple:
    """The processor, the checked data, the shared and the method's TrainingArguments, the model, and the trackers:
    (TrainerParts, Trackers)."""
    from transformers import AutoConfig, set_seed

    from qwenvl_ft.data.batching import stored_lengths
    from qwenvl_ft.data.kinds import rows_of
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.placement import describe_placement, device_map, keep_moe_blocks_whole
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor, describe_experts, \
        model_source
    from qwenvl_ft.training import startup

    cfg, output_dir = run.cfg, run.output_dir
    set_seed(cfg.seed)
    with ranks.main_process_first():  # a random model is built once and found in the cache by the others
        source = model_source(cfg.model)
    processor = build_processor(cfg.model, cfg.data, source)
    startup.mark("processor")
    # Every row read, decoded and measured before the model loads; invalid rows stop the run (data.skip_invalid).
    train_rows, eval_rows, report = checked_data(cfg, processor, output_dir)
    if not ranks.is_main_process():
        log.info("data check: the main process's result, %d training %s", len(train_rows), method.row_kind)
    startup.mark("data check")
    log.info("data: %d training %s, %d held-out", len(train_rows), method.row_kind, len(eval_rows or []))
    if cfg.trainer.eval_steps is not None and eval_rows is None:
        raise ConfigError("trainer.eval_steps needs held-out rows: set data.eval_size or data.eval_path")

    model_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    parts = shared_parts(cfg, processor, rows_of(method).collator(processor, cfg.data), train_rows, eval_rows,
                         model_config, train_lengths=stored_lengths(train_rows))  # measured once, by the data check
    trackers = run_trackers(cfg, composed, training, processor, eval_rows)
    parts.callbacks.append(trackers)  # opens the trackers' runs when the trainer is built (main process only)
    parts.arguments = training.trainer_arguments(parts, parts.arguments)
    startup.mark("training arguments and batch plan")
    # After the arguments: under ZeRO-3 transformers creates the model partitioned over the processes.
    parts.model = build_base_model(cfg.model, cfg.adapter, source, device_map=device_map(cfg))
    describe_placement(parts.model, cfg)
    keep_moe_blocks_whole(parts.model, cfg)
    parts.peft_config = build_lora_config(parts.model, cfg.model, cfg.adapter) if cfg.adapter.is_peft else None
    describe_experts(parts.model, parts.peft_config)
    startup.mark("model load")
    return parts, trackers


def build(training: Training, parts: TrainerParts):
    """The method's TRL trainer, with its parameter count logged."""
    from qwenvl_ft.modeling.build import count_parameters
    from qwenvl_ft.training import startup

    trainer = training.build_trainer(parts)
    startup.mark("trainer build")
    trainable, total = count_parameters(trainer.model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if hasattr(trainer.model, "peft_config"):  # whether vLLM can serve what this run will save
        from qwenvl_ft import families
        from qwenvl_ft.publish.serving import serving_of_model

        log.info("serving: %s", serving_of_model(trainer.model, families.of_model(trainer.model)).sentence())
    backend = linear_attention_backend(trainer.model)
    if backend is not None:
        log.info("linear attention: the recurrent layers' delta rule runs on %s%s", backend,
                 " (pip install \".[fla]\" on CUDA for flash-linear-attention's kernels)" if backend == "torch" else "")
    return trainer


def linear_attention_backend(model):
    """What runs the recurrent layers (modeling/linear_attention.py), None without them."""
    from qwenvl_ft.modeling.linear_attention import linear_attention_backend as backend_of

    return backend_of(model)


def fit(run: RunStart, method: methods.Method, training: Training, trainer, parts: TrainerParts,
        trackers) -> Tuple[Dict, Optional[Path]]:
    """Held-out figures before, the training loop, final/, held-out figures after, and the history: (metrics,
    final/), or (metrics, None) when a signal stopped the run (its checkpoint is saved)."""
    from qwenvl_ft.training import startup
    from qwenvl_ft.training.divergence import nonfinite_metrics
    from qwenvl_ft.training.resume import ReloadConvertedWeights, StopOnSignal

    cfg, output_dir = run.cfg, run.output_dir
    metrics: Dict = training.before_training(trainer, parts)
    trackers.held_out("before", metrics, 0, trainer.model)
    startup.mark("held-out generation before training")
    stop = StopOnSignal()
    trainer.add_callback(stop)
    trainer.add_callback(ReloadConvertedWeights(run.resume))
    log_plan(cfg, method, len(trainer.train_dataset), trainer.args.per_device_train_batch_size)
    from qwenvl_ft.training.speed import small_model_threads

    with stop.installed(), small_model_threads(trainer.model, say="training"):  # one thread for a small model on a CPU
        result = trainer.train(resume_from_checkpoint=run.resume)
    if stop.interrupted(trainer.state):
        scored_later(training, parts, trackers, metrics)
        return interrupted(trainer, output_dir, metrics), None
    metrics.update(training.training_metrics(trainer, result))
    metrics.update(nonfinite_metrics(trainer))

    final_dir = save_final(trainer, parts.processor, output_dir)
    after = training.after_training(trainer, parts)
    scored_later(training, parts, trackers, metrics)
    trackers.held_out("after", after, trainer.state.global_step, trainer.model)
    metrics.update(after)
    write_history(trainer, output_dir, metrics)
    return metrics, final_dir


def scored_later(training: Training, parts: TrainerParts, trackers, metrics: Dict) -> None:
    """The before-training figures scored once training has ended (Training.scored_later) join `metrics` and
    reach the trackers at step 0, where the check's other figures are."""
    late = training.scored_later(parts)
    trackers.held_out("before", late, 0)
    metrics.update(late)


def run_trackers(cfg: TrainConfig, composed: DictConfig, training: Training, processor, eval_rows):
    """The Trackers callback of a training run: the resolved config, and a gallery of the first
    trainer.tracker.gallery_size held-out rows (as the method's `Training.generation_rows`, qwenvl_ft/trainers/,
    turns them into conversations), generated greedily like the before/after check."""
    from omegaconf import OmegaConf

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.evaluation.held_out import predict_gallery
    from qwenvl_ft.training.trackers import Trackers

    size = cfg.trainer.tracker.gallery_size
    rows = training.generation_rows(list(eval_rows))[:size] if eval_rows is not None and size else []
    gallery = None
    if rows:
        collator = VisionChatCollator(processor, cfg.data)

        def gallery(model):
            return predict_gallery(model, collator, rows, cfg.trainer.eval_batch_size, cfg.trainer.max_new_tokens)

    resolved = OmegaConf.to_container(composed, resolve=True)
    return Trackers(cfg, resolved, OmegaConf.to_yaml(composed, resolve=True), gallery)


def checked_data(cfg: TrainConfig, processor, output_dir):
    """The checked training and held-out rows (load_checked_splits). In a distributed run the main process checks
    first, alone: its error, if any, stops every rank with the same message, and it fills the measure-once cache
    (data/cache.py) that the other ranks then read instead of decoding every row again. The rows are not
    broadcast: they are memory-mapped from the cache entry (in the run folder when the run spans machines)."""
    from qwenvl_ft.data.check import load_checked_splits
    from qwenvl_ft.distributed import ranks

    def check(log_report: bool = True):
        return load_checked_splits(cfg.data, processor, cfg.trainer.batch_size, cfg.data.seed, output_dir,
                                   log_report=log_report)

    if not ranks.is_distributed():
        return check()
    checked = {}
    ranks.run_on_main(lambda: checked.update(result=check()))
    return checked["result"] if ranks.is_main_process() else check(log_report=False)


def log_plan(cfg: TrainConfig, method: methods.Method, items: int, per_device_batch: int) -> None:
    steps = optimizer_steps(cfg, items, per_device_batch)
    log.info("training: %d optimizer steps (%s epochs, batch %d %s x accumulation %d)", steps,
             cfg.trainer.epochs if cfg.trainer.max_steps <= 0 else "-", cfg.trainer.batch_size, method.batch_unit,
             cfg.trainer.gradient_accumulation_steps)


def optimizer_steps(cfg: TrainConfig, items: int, batch_size: Optional[int] = None) -> int:
    """Steps for `items` dataset items of `batch_size` (default trainer.batch_size; a packed run has 1 pack each)."""
    t = cfg.trainer
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(items / (batch_size or t.batch_size)) / t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.epochs)
