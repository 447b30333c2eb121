"""What every training method shares: starting a run, the TrainingArguments and callbacks every method gets, the
trainer class (mixins over the TRL trainer), the held-out generation check, saving the result, and the record of
a run stopped by a signal. The run skeleton that uses them is training/run.py."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.schema import DistEngine, HubConfig, Precision, TrainConfig
from qwenvl_ft.distributed.engine import engine_arguments
from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")


@dataclass
class RunStart:
    cfg: TrainConfig
    output_dir: Path
    resume: Optional[str]  # checkpoint to resume from, None for a fresh start
    finished: Optional[Dict]  # metrics of an already finished identical run: nothing left to do


def start_run(composed: DictConfig) -> RunStart:
    """Validate, find the checkpoint to resume from, and record the resolved config in the output folder. Starts
    the run's start-up budget (training/startup.py) and does the heavy imports up front, so that they are one
    line of it instead of hiding in the phases that first touch them.

    With dist=ddp/fsdp/zero* outside a launcher, the run's processes are started here (distributed/launch.py) and
    their result is returned as `finished`. Inside a distributed run the main process prepares the folder (it alone
    removes half-written checkpoints and writes config.yaml, with dist.world_size); every other rank gets its
    decision and checks that its own config is the one recorded. The main process takes the folder (one writer per
    folder: a second run on it is refused; the ranks of one launch share it)."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.launch import launch_if_needed
    from qwenvl_ft.training import startup
    from qwenvl_ft.training.preflight import preflight

    startup.begin_run()
    cfg: TrainConfig = validate(composed)
    preflight(cfg)  # trackers installed, precision supported, trainer.extra_args: before anything loads
    launched = launch_if_needed(cfg)
    if launched is not None:
        return RunStart(cfg, Path(cfg.output_dir), None, launched)
    import_training_libraries(cfg)
    startup.mark("imports (torch, transformers, TRL, PEFT)")
    cfg = record_world_size(composed)
    ranks.ensure_process_group(cfg.dist.backend, cfg.dist.timeout_s)  # accelerate and DeepSpeed reuse it
    resume, finished = ranks.run_on_main(_prepare_output, cfg, composed)
    if not ranks.is_main_process():
        check_same_config(composed, Path(cfg.output_dir))
        if resume is not None and finished is None:
            log.info("rank %d of %d: resuming from %s", ranks.rank(), ranks.world_size(), resume)
    startup.mark("run folder and resume check")
    return RunStart(cfg, Path(cfg.output_dir), resume, finished)


def _prepare_output(cfg: TrainConfig, composed: DictConfig):
    from qwenvl_ft.run_folder.files import ensure_writable
    from qwenvl_ft.run_folder.lock import lock_folder
    from qwenvl_ft.training.resume import finished_metrics, prepare_resume

    output_dir = ensure_writable(Path(cfg.output_dir))
    lock_folder(output_dir)  # held until the command returns (runtime.run_task releases it)
    resume = prepare_resume(cfg, composed)  # before config.yaml is rewritten: it warns about config changes
    finished = finished_metrics(cfg, composed, resume)
    if finished is None:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(composed, resolve=True))
        log_config_summary(cfg)
    elif cfg.hub.push:  # the same command again after a failed upload: only the upload is left to do
        publish_final(output_dir, cfg.hub)
    return resume, finished


def record_world_size(composed: DictConfig) -> TrainConfig:
    """dist.world_size (and dist.num_processes when a launcher decided it) as this run really has them, so that
    config.yaml records them and a resume with another world size is reported as a config change."""
    from qwenvl_ft.distributed import ranks

    world = ranks.world_size()
    if world > 1 and composed.dist.engine == DistEngine.none:
        raise ConfigError(f"{world} processes were launched with dist=single: pick dist=ddp, fsdp, zero2, zero3 or "
                          f"zero3_offload")
    if composed.dist.world_size not in (None, world):
        log.warning("dist.world_size=%s, but the launcher started %d processes", composed.dist.world_size, world)
    composed.dist.world_size = world
    if composed.dist.num_processes is None and "LOCAL_WORLD_SIZE" in os.environ:
        composed.dist.num_processes = int(os.environ["LOCAL_WORLD_SIZE"])
    return validate(composed)


def check_same_config(composed: DictConfig, output_dir: Path) -> None:
    """A rank other than the main one: its composed config must be the one the main process recorded."""
    from qwenvl_ft.training.resume import config_changes

    changed = [key for key in config_changes(output_dir / "config.yaml", composed) if key != "dist.machine_rank"]
    if changed:
        raise ConfigError(f"this rank composed a config that differs from {output_dir / 'config.yaml'} in "
                          f"{', '.join(changed)}: every process of a run must get the same arguments")


def import_training_libraries(cfg: TrainConfig) -> None:
    """The libraries every training run needs, and the method's TRL trainer module (TRL imports its trainers
    lazily), so that the start-up budget shows them as one line."""
    import importlib.util

    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    module = f"trl.trainer.{cfg.trainer.kind.value}_trainer"
    if importlib.util.find_spec(module) is not None:
        importlib.import_module(module)


def write_history(trainer, output_dir: Path, metrics: Dict) -> None:
    """metrics.json and log_history.json, by the main process, each written whole or not at all; the run's
    performance figures (training/telemetry.py) and start-up budget (training/startup.py) join `metrics`, so
    that summary.json carries them too."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.run_folder.files import write_atomically
    from qwenvl_ft.training import startup
    from qwenvl_ft.training.telemetry import summary_metrics

    metrics.update(summary_metrics(trainer))
    if startup.current() is not None:
        metrics.update(startup.current().metrics())
    if not ranks.is_main_process():
        return
    write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_atomically(output_dir / "log_history.json", json.dumps(trainer.state.log_history, indent=1))


def finish_final(output_dir: Path, command: Optional[str] = None, started_at: Optional[float] = None) -> Path:
    """Once final/, metrics.json and log_history.json are written (the held-out metrics after training included):
    run_info.json (command, hardware, software, times), the model card of final/, and the upload when hub.push.
    `command` defaults to this job's command line, `started_at` to when start_run wrote config.yaml (the start of
    this session of the run)."""
    from qwenvl_ft.publish.card import launch_command, run_info, typed_config, write_run_info

    config_yaml = output_dir / "config.yaml"
    started = started_at if started_at is not None else config_yaml.stat().st_mtime
    write_run_info(output_dir, run_info(command or launch_command(), started))
    return publish_final(output_dir, typed_config(config_yaml.read_text()).hub)


def publish_final(output_dir: Path, hub: HubConfig) -> Path:
    """(Re)write the card of final/ from the run folder's records, naming hub.repo_id as where to load it from
    when set, then upload final/ when hub.push (a HubError when that fails: final/ stays as it is)."""
    from qwenvl_ft.publish.card import build_card, launch_command, load_run, write_card
    from qwenvl_ft.publish.hub import push_folder

    final_dir = output_dir / "final"
    kind = "adapter" if (final_dir / "adapter_config.json").is_file() else "model"
    card = write_card(final_dir, build_card(load_run(output_dir), kind, hub.repo_id or str(final_dir)))
    log.info("model card: %s", card)
    if hub.push:
        retry = (f"run the same command again (the run is finished: it only uploads):\n"
                 f"  {launch_command() or 'qwenvl-ft train ... (the same arguments)'}")
        push_folder(final_dir, hub, retry)
    return card


def training_arguments(cfg: TrainConfig) -> Dict:
    """The transformers TrainingArguments every method shares (SFTConfig, DPOConfig, ... extend them), with
    trainer.extra_args added (preflight checked them against the method's config class)."""
    import torch

    from qwenvl_ft.data.workers import training_workers
    from qwenvl_ft.training.preflight import active_trackers, effective_precision
    from qwenvl_ft.training.speed import check_liger

    trainer_cfg, optim_cfg = cfg.trainer, cfg.optimizer
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
        bf16=precision == Precision.bf16,
        fp16=precision == Precision.fp16,
        tf32=trainer_cfg.tf32 if has_cuda else None,
        activation_checkpointing=cfg.model.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=trainer_cfg.logging_steps,
        logging_first_step=True,
        save_strategy=trainer_cfg.save_strategy.value,
        save_steps=trainer_cfg.save_steps,
        save_total_limit=trainer_cfg.save_total_limit,
        report_to=active_trackers(trainer_cfg.report_to),
        run_name=tracker_run_name(cfg),
        disable_tqdm=trainer_cfg.disable_tqdm,
        seed=cfg.seed,
        data_seed=cfg.data.seed,
        dataloader_pin_memory=has_cuda,  # pinned memory only helps copies to a GPU
        **workers.training_arguments(),
        # Liger's layer kernels (the Trainer applies them); TRL keeps its own fused LM head and loss
        use_liger_kernel=cfg.model.use_liger_kernel,
        **evaluation_arguments(trainer_cfg),
        **trainer_cfg.extra_args,
    )
    arguments.update(engine_arguments(cfg))  # DDP / FSDP2 / DeepSpeed (qwenvl_ft/distributed/engine.py)
    return arguments


# TrainingArguments that qwenvl-ft sets -> the config key it sets them from (trainer.extra_args may not set them;
# tests/test_config_ux.py keeps this in step with `training_arguments`).
ARGUMENT_SOURCES = {
    "output_dir": "output_dir", "num_train_epochs": "trainer.epochs", "max_steps": "trainer.max_steps",
    "per_device_train_batch_size": "trainer.batch_size", "per_device_eval_batch_size": "trainer.eval_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps", "learning_rate": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay", "adam_beta1": "optimizer.betas", "adam_beta2": "optimizer.betas",
    "adam_epsilon": "optimizer.eps", "optim": "optimizer.name", "lr_scheduler_type": "optimizer.scheduler",
    "warmup_steps": "optimizer.warmup_steps or optimizer.warmup_ratio", "max_grad_norm": "optimizer.max_grad_norm",
    "bf16": "trainer.precision", "fp16": "trainer.precision", "tf32": "trainer.tf32",
    "activation_checkpointing": "model.gradient_checkpointing",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "activation_checkpointing_kwargs": "model.gradient_checkpointing (always non-reentrant)",
    "gradient_checkpointing_kwargs": "model.gradient_checkpointing (always non-reentrant)",
    "logging_steps": "trainer.logging_steps", "logging_first_step": "trainer.logging_steps (always true)",
    "save_strategy": "trainer.save_strategy", "save_steps": "trainer.save_steps",
    "save_total_limit": "trainer.save_total_limit", "report_to": "trainer.report_to",
    "run_name": "trainer.tracker.run_name", "disable_tqdm": "trainer.disable_tqdm", "seed": "seed",
    "data_seed": "data.seed", "dataloader_num_workers": "data.num_workers",
    "dataloader_persistent_workers": "data.num_workers (persistent with workers)",
    "dataloader_prefetch_factor": "data.num_workers and trainer.gradient_accumulation_steps (a step ready)",
    "dataloader_pin_memory": "the device (pinned only with CUDA)", "eval_strategy": "trainer.eval_steps",
    "eval_steps": "trainer.eval_steps", "prediction_loss_only": "trainer.eval_steps (loss only)",
    "load_best_model_at_end": "trainer.load_best_model_at_end",
    "metric_for_best_model": "trainer.metric_for_best_model", "greater_is_better": "trainer.greater_is_better",
    "use_liger_kernel": "model.use_liger_kernel",
}


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


def training_callbacks(cfg: TrainConfig) -> list:
    """Callbacks every method shares: checkpoint completion markers (for resuming), the run's telemetry (fed by
    the trainer class's TelemetryMixin), early stopping, and the vision blocks' own gradient checkpointing
    setting."""
    from transformers import EarlyStoppingCallback

    from qwenvl_ft.training.resume import CheckpointCompleteMarker
    from qwenvl_ft.training.speed import vision_checkpointing_callback
    from qwenvl_ft.training.telemetry import RunTelemetry

    callbacks = [CheckpointCompleteMarker(), RunTelemetry(cfg)]
    if cfg.dist.engine != DistEngine.none:
        from qwenvl_ft.distributed.modality import vision_in_step_callback

        callbacks.append(vision_in_step_callback(always=cfg.dist.is_sharded))
    if cfg.trainer.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.trainer.early_stopping_patience,
                                               early_stopping_threshold=cfg.trainer.early_stopping_threshold))
    if cfg.model.vision_checkpointing != cfg.model.gradient_checkpointing:
        callbacks.append(vision_checkpointing_callback(cfg.model.vision_checkpointing))
    return callbacks


# ----------------------------------------------------------------------------------------------------------------
# the trainer class: TRL's, with our mixins. Overriding public Trainer methods in a subclass is the extension point
# transformers documents (`create_optimizer`, `get_train_dataloader`, ...); a mixin per concern keeps each override
# small and lets every method's trainer get the same ones.


class PerModuleLearningRates:
    """optimizer.vision_lr / merger_lr: the Trainer's optimizer with one parameter group per learning rate.

    Built inside `create_optimizer`, i.e. on the model as the Trainer trains it (after PEFT wrapping, FSDP or
    DeepSpeed preparation): an optimizer passed in from outside is refused under FSDP and would hold the wrong
    parameters after wrapping. `optimizer_settings` (the optimizer group) is set on the configured subclass.
    """

    optimizer_settings: Any = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from qwenvl_ft.modeling.build import optimizer_param_groups

            target = self.model if model is None else model
            groups = optimizer_param_groups(target, self.optimizer_settings, self.get_decay_parameter_names(target))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)  # the Trainer's own bookkeeping (it keeps an optimizer it finds)


def trainer_mixins(cfg: TrainConfig) -> tuple:
    """The mixins this run's trainer class gets, configured: the telemetry every run logs (training/telemetry.py),
    and what the config asks for."""
    from qwenvl_ft.training.telemetry import TelemetryMixin

    mixins = [TelemetryMixin]
    if cfg.optimizer.vision_lr is not None or cfg.optimizer.merger_lr is not None:
        mixins.append(type("PerModuleLearningRates", (PerModuleLearningRates,),
                           {"optimizer_settings": cfg.optimizer}))
    return tuple(mixins)


def trainer_class(base: type, mixins: Sequence[type]) -> type:
    """`base` (SFTTrainer, DPOTrainer, ...) with `mixins` in front of it; `base` itself when there are none."""
    if not mixins:
        return base
    return type(base.__name__, (*mixins, base), {"__module__": base.__module__})


def finish_trainer(trainer, cfg: TrainConfig):
    """What every method's trainer gets once built: per-sample attention for packed rows (data.packing), on the
    policy and on a reference model when there is one; full-precision modules where there is no autocast."""
    if cfg.data.packing:
        from qwenvl_ft.training.speed import packed_attention

        packed_attention([trainer.model, getattr(trainer, "ref_model", None)])
    if not (trainer.args.bf16 or trainer.args.fp16):
        restore_fully_trained_modules(trainer.model, cfg.model.dtype.value)
    return trainer


def restore_fully_trained_modules(model, dtype: str) -> None:
    """TRL's trainers cast every trainable parameter of a 4-bit model to bf16 (QLoRA's adapters in bf16, for
    autocast). In a run without autocast (fp32, as on a CPU) a module that trains in full, such as a merger after
    a frozen 4-bit vision tower, then gets inputs in the model's dtype with bf16 weights, and LayerNorm refuses
    the mix ("mixed dtype (CPU)"). Such modules go back to the model's dtype; LoRA factors keep TRL's bf16 (PEFT
    casts their inputs)."""
    import torch

    target = getattr(torch, dtype)
    if target == torch.bfloat16:
        return
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype == torch.bfloat16 and "lora_" not in name:
            param.data = param.data.to(target)


def shared_parts(cfg: TrainConfig, processor, collator, train_rows, eval_rows, model_config,
                 train_lengths: Optional[List[int]] = None):
    """TrainerParts with what every method shares: the common TrainingArguments, callbacks and trainer mixins."""
    from qwenvl_ft.methods.base import TrainerParts

    return TrainerParts(cfg=cfg, processor=processor, collator=collator, train_rows=train_rows,
                        eval_rows=eval_rows, model_config=model_config, arguments=training_arguments(cfg),
                        callbacks=training_callbacks(cfg), trainer_mixins=trainer_mixins(cfg),
                        train_lengths=train_lengths)


def standalone_parts(method, cfg: TrainConfig, model, processor, collator, train_rows, eval_rows,
                     peft_config=None):
    """TrainerParts for building a method's trainer outside the run skeleton (tests and benchmarks), holding what
    the skeleton would have prepared."""
    parts = shared_parts(cfg, processor, collator, train_rows, eval_rows, getattr(model, "config", None))
    parts.model, parts.peft_config = model, peft_config
    parts.arguments = method.trainer_arguments(parts, parts.arguments)
    return parts


def held_out_generation(model, processor, rows: List[dict], cfg: TrainConfig, when: str) -> Dict:
    """The before/after check: greedy answers to the held-out rows (conversations ending on the reference), on
    the device the model trains on, with exact match, BLEU and ROUGE-L; a few predictions are logged.

    In a distributed run the main process generates alone when every process holds the whole model (DDP, ZeRO-1/2;
    the others wait), and every process generates its share of the rows when the model is sharded (FSDP, ZeRO-3:
    each forward gathers weights from all of them). Before training, DeepSpeed and FSDP have not yet put the model
    on its devices (ZeRO-3 holds it partitioned, FSDP shards it when training starts), so the check is left out
    there; `qwenvl-ft eval` compares the base with final/."""
    from qwenvl_ft.data.collate import VisionChatCollator, reference_answer
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.placement import placed_when_training_starts
    from qwenvl_ft.evaluation.generate import generate_answers
    from qwenvl_ft.evaluation.metrics import compute

    collator = VisionChatCollator(processor, cfg.data)
    batch, new_tokens = cfg.trainer.eval_batch_size, cfg.trainer.max_new_tokens
    if ranks.is_distributed() and when == "before" and placed_when_training_starts(cfg):
        log.info("held-out generation before training: left out under dist.engine=%s (the model is placed on its "
                 "devices when training starts)", cfg.dist.engine.value)
        return {}
    if ranks.is_distributed() and cfg.dist.is_sharded:
        predictions = sharded_answers(model, collator, rows, batch, new_tokens)
    else:
        predictions = ranks.run_on_main(generate_answers, model, collator, rows, batch, new_tokens,
                                        progress=f"held-out predictions {when} training")
    references = [reference_answer(row) for row in rows]
    result = {**compute(predictions, references), "predictions": predictions, "references": references}
    shown = min(cfg.trainer.num_predictions_to_print, len(rows))
    lines = [f"held-out predictions {when} training (exact match {result['exact_match']:.1%} on {len(rows)} rows):"]
    for prediction, reference in list(zip(result["predictions"], result["references"]))[:shown]:
        lines.append(f"  predicted: {prediction!r:40s} reference: {reference!r}")
    log.info("\n".join(lines))
    return {f"eval_{name}_{when}": result[name] for name in ("exact_match", "bleu", "rouge_l")}


def sharded_answers(model, collator, rows: List[dict], batch_size: int, max_new_tokens: int) -> List[str]:
    """Greedy answers to `rows` from a model sharded over the processes: each process answers a contiguous share
    (padded to the same number of batches, so that every process runs the same number of forwards), with
    `synced_gpus` (transformers keeps a finished process stepping until all are done); the shares are gathered in
    order."""
    import torch.distributed as dist

    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.evaluation.generate import generate_answers

    world, rank = ranks.world_size(), ranks.rank()
    share = math.ceil(len(rows) / world)
    mine = rows[rank * share:(rank + 1) * share]
    padded = mine + [rows[0]] * (share - len(mine))  # answers to the padding are dropped below
    answers = generate_answers(model, collator, padded, batch_size,
                               generation=dict(max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=True))
    gathered: List[Optional[List[str]]] = [None] * world
    dist.all_gather_object(gathered, answers[:len(mine)])
    return [answer for part in gathered for answer in part]


def save_final(trainer, processor, output_dir: Path) -> Path:
    """Adapter (or full model) and processor in `final/`, written to a temporary folder and renamed into place,
    so a crash mid-save never leaves a folder that looks complete. Every rank takes part (FSDP and ZeRO-3 gather
    the weights collectively); the main process writes, the others wait until final/ is in place."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.distributed.saving import save_consolidated

    final_dir = output_dir / "final"
    staging = output_dir / ".final.partial"
    if ranks.is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
    ranks.barrier()
    try:
        save_consolidated(trainer, staging)
        if ranks.is_main_process():
            processor.save_pretrained(str(staging))
    except BaseException:  # a full disk, Ctrl-C: the partial copy would only take space
        if ranks.is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if ranks.is_main_process():
        if final_dir.exists():
            shutil.rmtree(final_dir)
        staging.rename(final_dir)
    ranks.barrier()
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
    log_performance(metrics)
    log.warning("interrupted at step %d of %d; checkpoint saved to %s. Run the same command again to resume.",
                state.global_step, state.max_steps, checkpoint)
    return metrics


def log_performance(metrics: Dict) -> None:
    """The run's performance figures as one console line (`performance: ...`), when it has them."""
    from qwenvl_ft.training.telemetry import performance_line

    if metrics.get("performance"):
        log.info("%s", performance_line(metrics["performance"]))


def optimizer_steps(cfg: TrainConfig, items: int, batch_size: Optional[int] = None) -> int:
    """Steps for `items` dataset items of `batch_size` (default trainer.batch_size; a packed run has 1 pack each)."""
    t = cfg.trainer
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(items / (batch_size or t.batch_size)) / t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.epochs)


def log_config_summary(cfg: TrainConfig) -> None:
    m, a, d, o = cfg.model, cfg.adapter, cfg.data, cfg.optimizer
    source = "random init (tiny)" if m.random_init else m.name_or_path
    adapter = a.method.value if not a.is_peft else f"{a.method.value} r={a.r} alpha={a.alpha} on {list(a.target_modules)}"
    log.info("run: model=%s (%s) | adapter=%s | data=%s %s | lr=%g %s | output=%s", source, m.dtype.value, adapter,
             d.format.value, d.describe_path() if d.path or d.sources else "", o.lr, o.scheduler.value,
             cfg.output_dir)
