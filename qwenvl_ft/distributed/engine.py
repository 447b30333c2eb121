"""What the TrainingArguments get for the configured engine (dist.engine), merged over the shared ones by
training/common.py's `training_arguments`. accelerate and the Trainer do the rest: DDP wrapping, FSDP2 sharding,
DeepSpeed's engine, the distributed sampler, gathering metrics."""

from __future__ import annotations

from typing import Dict

from qwenvl_ft.config.schema import DistEngine, TrainConfig
from qwenvl_ft.distributed import ranks


def engine_arguments(cfg: TrainConfig) -> Dict:
    dist = cfg.dist
    if not ranks.is_distributed():
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
    return arguments
