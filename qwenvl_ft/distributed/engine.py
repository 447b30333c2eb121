"""What the TrainingArguments get for the configured engine (dist.engine), merged over the shared ones by
training/arguments.py's `training_arguments`. accelerate and the Trainer do the rest: DDP wrapping, FSDP2 sharding,
DeepSpeed's engine, the distributed sampler, gathering metrics."""

from __future__ import annotations

from typing import Dict

from qwenvl_ft.config.dist import DistEngine
from qwenvl_ft.config.schema import TrainConfig


def engine_arguments(cfg: TrainConfig) -> Dict:
    dist = cfg.dist
    if dist.engine == DistEngine.none:
        return {}
    import torch

    arguments: Dict = {"ddp_timeout": dist.timeout_s}
    if dist.backend is not None:
        arguments["ddp_backend"] = dist.backend
    if dist.engine in (DistEngine.ddp, DistEngine.fsdp) and not torch.cuda.is_available():
        # accelerate treats processes without GPUs as distributed only when told they are CPU processes.
        arguments["use_cpu"] = True
    if dist.engine == DistEngine.ddp:
        # Every trainable parameter gets a gradient every step (modality.py runs the vision tower even for
        # text-only batches), so DDP need not search the graph for unused ones.
        arguments["ddp_find_unused_parameters"] = False
    elif dist.engine == DistEngine.fsdp:
        from qwenvl_ft.distributed.fsdp import fsdp_arguments

        arguments.update(fsdp_arguments(cfg))
    elif dist.engine == DistEngine.deepspeed:
        from qwenvl_ft.distributed.zero import deepspeed_config

        arguments["deepspeed"] = deepspeed_config(cfg)
        if not torch.cuda.is_available():
            configure_cpu_deepspeed(dist.backend or "gloo", dist.timeout_s)
            arguments["accelerator_config"] = {"use_configured_state": True}
    return arguments


def configure_cpu_deepspeed(backend: str, timeout_s: int) -> None:
    """DeepSpeed between CPU processes (DeepSpeed's CPU accelerator, gloo): accelerate's own backend detection knows
    no CPU DeepSpeed (without a GPU it leaves the backend unset and reports a world size of 1, so that DeepSpeed's
    batch check fails). accelerate's state is configured here with the backend named, as `accelerate launch`
    would, and the TrainingArguments take it over (`accelerator_config.use_configured_state`)."""
    import os
    from datetime import timedelta

    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend=backend, timeout=timedelta(seconds=timeout_s))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
