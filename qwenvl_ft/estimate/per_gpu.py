"""One GPU's share of the single-process estimate (estimate/memory.py) under the run's `dist` engine: the terms the
engines shard by (qwenvl_ft/distributed/memory.py), read off the estimate's rows. `qwenvl-ft estimate` prints them
for every option and world size; `auto` settings (estimate/autofit.py) size the run by the option it uses."""

from __future__ import annotations

from qwenvl_ft.config.dist import DistEngine, OffloadDevice
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.config.trainer import Precision
from qwenvl_ft.estimate.memory import DTYPE_BYTES, Estimate


def single_process_parts(cfg: TrainConfig, result: Estimate, model):
    """The single-process estimate in the terms the engines shard by."""
    from qwenvl_ft.distributed import memory
    from qwenvl_ft.distributed.fsdp import wrap_classes

    by_name = {name: b for name, b, _ in result.rows}
    weights = sum(b for name, b, _ in result.rows if name.startswith("weights"))
    w = DTYPE_BYTES[cfg.model.dtype.value]
    if cfg.adapter.is_peft:
        trained = by_name.get("adapter weights", 0)
    else:
        trained = result.counts.trainable * w
    classes = set(wrap_classes(cfg))
    unit = max((sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in classes),
               default=0)
    return memory.SingleProcess(
        frozen_weights=weights - (0 if cfg.adapter.is_peft else trained), trained_weights=trained,
        gradients=by_name["gradients"], optimizer=by_name["optimizer states"],
        reference=by_name.get("reference model", 0),
        activations=sum(b for name, b, _ in result.rows if name.startswith("activations")),
        trained_params=result.counts.trainable, base_params=result.counts.total,
        adapter_params=result.counts.trainable if cfg.adapter.is_peft else 0,
        quantized_params=result.counts.quantized, quantized_bytes=by_name.get("weights (4-bit)", 0), unit_params=unit,
        dtype_bytes=w, mixed_precision=cfg.trainer.precision != Precision.fp32)


def dist_option(cfg: TrainConfig) -> str:
    """The run's engine as distributed/memory.py names its options (ddp, zero1..3 with _offload, fsdp); "single"
    for one process."""
    dist = cfg.dist
    if dist.engine == DistEngine.none:
        return "single"
    if dist.engine == DistEngine.deepspeed:
        offload = dist.zero.offload_optimizer != OffloadDevice.none
        return f"zero{dist.zero.stage}" + ("_offload" if offload else "")
    return dist.engine.value


def peak_per_gpu(cfg: TrainConfig, result: Estimate, model, world_size: int) -> int:
    """Bytes on one GPU of the run: the single-process estimate, redistributed the way its dist engine keeps it at
    `world_size` processes."""
    from qwenvl_ft.distributed import memory

    option = dist_option(cfg)
    if option == "single":
        return result.total
    return memory.per_gpu(option, world_size, single_process_parts(cfg, result, model)).gpu
