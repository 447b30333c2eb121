"""Where the model's weights live in a distributed run.

- QLoRA: bitsandbytes quantises while loading onto a device; without a device map every process of a DDP / ZeRO-2
  run would load onto the current (first) GPU. Each process gets its own (its LOCAL_RANK).
- ZeRO-3: transformers creates the model partitioned when the TrainingArguments with the ZeRO-3 config exist
  before `from_pretrained` (the run skeleton builds them first); `describe_placement` says how much of the model
  this process holds, so that a run log shows that no process materialised all of it. A mixture-of-experts
  family's sparse MoE block (`Family.moe_block_class`) is a ZeRO-3 leaf (`keep_moe_blocks_whole`).
"""

from __future__ import annotations

import logging

from qwenvl_ft.config.dist import DistEngine
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.distributed import ranks

log = logging.getLogger("qwenvl_ft")


def device_map(cfg: TrainConfig):
    """`device_map` for from_pretrained: this process's GPU for a distributed 4-bit model, else None (the Trainer,
    FSDP or DeepSpeed place the model)."""
    import torch

    if cfg.adapter.load_in_4bit and ranks.is_distributed() and torch.cuda.is_available():
        return {"": ranks.local_rank()}
    return None


def keep_moe_blocks_whole(model, cfg: TrainConfig) -> int:
    """Under ZeRO-3, make a mixture-of-experts family's sparse MoE block (router + experts) one leaf: DeepSpeed
    gathers its parameters once for the whole block instead of tracing the modules inside it, whose calls depend on
    which experts this rank's tokens reach (an expert no token reached on one rank would leave the others waiting
    in a gather; LLaMA-Factory and ms-swift do the same). The number of blocks marked."""
    from qwenvl_ft import families

    family = families.of_model(model)
    dist = cfg.dist
    if not family.moe_block_class or dist.engine != DistEngine.deepspeed or dist.zero.stage != 3:
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    marked = set_z3_leaf_modules(model, [family.load_moe_block_class()])
    log.info("ZeRO-3: %d %s blocks are leaf modules (gathered whole)", len(marked), family.moe_block_class)
    return len(marked)


def describe_placement(model, cfg: TrainConfig) -> None:
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_numel")]
    if partitioned:
        held = sum(p.ds_tensor.numel() for p in partitioned)
        total = sum(p.ds_numel for p in partitioned)
        log.info("model created partitioned by ZeRO-3: this process holds %s of its %s parameters (%.1f%%)",
                 f"{held:,}", f"{total:,}", 100 * held / max(total, 1))
    elif ranks.is_distributed():
        device = next(model.parameters()).device
        log.info("model loaded whole on %s by process %d of %d (%s places it)", device, ranks.rank(),
                 ranks.world_size(), cfg.dist.engine.value)


def placed_when_training_starts(cfg: TrainConfig) -> bool:
    """Whether the engine puts the model on its devices only when training starts (DeepSpeed holds it partitioned
    before, FSDP shards it then): before that, nothing can generate with it."""
    return cfg.dist.engine in (DistEngine.fsdp, DistEngine.deepspeed)
