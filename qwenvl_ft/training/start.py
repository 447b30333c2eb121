"""Starting a run: validate, launch the processes (dist), take and prepare the run folder, find the checkpoint to
resume from, and do the heavy imports up front (the run skeleton, commands/train.py, begins with `start_run`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig, OmegaConf

from qwenvl_ft.config.compose import validate
from qwenvl_ft.config.dist import DistEngine
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.training.finish import publish_final

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
    with startup.heavy_imports():  # preflight imports torch first
        cfg: TrainConfig = validate(composed)
        preflight(cfg)  # trackers installed, precision supported, trainer.extra_args: before anything loads
        launched = launch_if_needed(cfg)
        if launched is None:
            import_training_libraries(cfg)
    if launched is not None:
        return RunStart(cfg, Path(cfg.output_dir), None, launched)
    startup.mark("imports (torch, transformers, TRL, PEFT)")
    fit_auto_settings(composed)
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


def fit_auto_settings(composed: DictConfig) -> None:
    """trainer.batch_size, data.max_tokens_per_batch and model.gradient_checkpointing left to auto: resolved here,
    once per process, by the estimate (estimate/autofit.py: `choose`, the function `qwenvl-ft estimate` prints), and
    written into the composed config, so that everything downstream (config.yaml and a resume's comparison
    included) sees plain values. The log says what was chosen and why."""
    from qwenvl_ft.distributed import ranks
    from qwenvl_ft.estimate.autofit import auto_keys, choose, gpu_memory

    cfg = validate(composed)
    memory = gpu_memory(cfg) if auto_keys(cfg) else None
    fitted = choose(cfg, memory, ranks.world_size())  # also checks trainer.effective_batch_size against the devices
    for line in fitted.reasons:
        log.info("auto: %s", line)
    for key, value in fitted.settings.items():
        OmegaConf.update(composed, key, value)


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
    lazily), so that the start-up budget shows them as one line; bitsandbytes only when the run quantises."""
    import importlib.util

    from qwenvl_ft.modeling.peft_import import expose_bitsandbytes_to_peft, import_peft_without_bitsandbytes

    if cfg.adapter.load_in_4bit:
        expose_bitsandbytes_to_peft()
    import_peft_without_bitsandbytes()  # a no-op once bitsandbytes is in
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    module = f"trl.trainer.{cfg.trainer.kind.value}_trainer"
    if importlib.util.find_spec(module) is not None:
        importlib.import_module(module)


def log_config_summary(cfg: TrainConfig) -> None:
    m, a, d, o = cfg.model, cfg.adapter, cfg.data, cfg.optimizer
    source = "random init (tiny)" if m.random_init else m.name_or_path
    adapter = a.method.value if not a.is_peft else f"{a.method.value} r={a.r} alpha={a.alpha} on {list(a.target_modules)}"
    log.info("run: model=%s (%s) | adapter=%s | data=%s %s | lr=%g %s | output=%s", source, m.dtype.value, adapter,
             d.format.value, d.describe_path() if d.path or d.sources else "", o.lr, o.scheduler.value,
             cfg.output_dir)
