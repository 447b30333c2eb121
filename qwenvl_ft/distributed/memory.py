"""Per-GPU memory of a run for each `dist` option and world size: the sharding section of `qwenvl-ft estimate`.

The single-process estimate (qwenvl_ft/estimate/memory.py) gives the bytes of weights, adapters, gradients, optimizer
states and activations; here they are redistributed the way each engine keeps them:

  ddp            every process holds everything, plus DDP's gradient buckets (one more copy of the gradients:
                 PyTorch's default `gradient_as_bucket_view=False`)
  zero1/2/3      DeepSpeed with bf16/fp16 casts the model to that dtype and keeps an fp32 master copy and two
                 fp32 Adam states per trained parameter (12 bytes) in the optimizer; stage 1 partitions that, stage
                 2 also the gradients, stage 3 also the weights (plus the blocks being gathered: two wrap units);
                 offloading moves the optimizer partition (and with offload_param the weight partition) to CPU RAM
  fsdp           FSDP2 full shard under mixed precision (accelerate keeps trained parameters in fp32): fp32
                 trained weights, gradients and both Adam states sharded, frozen weights sharded in their dtype,
                 plus two gathered wrap units (the one computing and the one prefetched) in the compute dtype
Activations are per process and the same for every option (the per-device batch does not change). These are
byte counts of what the engines keep, not measurements; DeepSpeed's and FSDP's communication buffers (tens to
hundreds of MB) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

GiB = 1024 ** 3
OPTIONS = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp")  # conf/dist options that shard or replicate
WORLD_SIZES = (1, 2, 4, 8)
GPU_SIZES_GIB = (24, 40, 80, 141)
USABLE = 0.9  # of a GPU's memory: the CUDA context and fragmentation take the rest


@dataclass
class SingleProcess:
    """The single-process estimate, split the way the engines treat it (bytes; parameters as counts)."""

    frozen_weights: int  # base weights that do not train, in their storage dtype (4-bit included)
    trained_weights: int  # weights that train (full fine-tuning: model dtype; LoRA factors: fp32)
    gradients: int
    optimizer: int
    reference: int  # DPO's frozen reference copy (full fine-tuning)
    activations: int
    trained_params: int
    base_params: int  # the base model's parameters (adapters not included)
    adapter_params: int  # LoRA factors and modules_to_save copies (0 for full fine-tuning)
    quantized_params: int  # base parameters held in 4 bits
    quantized_bytes: int
    unit_params: int  # the largest wrap unit (decoder layer or vision block)
    dtype_bytes: int  # model.dtype
    mixed_precision: bool  # trainer.precision bf16/fp16

    @property
    def shardable(self) -> bool:
        """4-bit weights cannot be split by ZeRO-3 or FSDP (the config refuses those combinations)."""
        return self.quantized_params == 0


@dataclass
class PerGpu:
    gpu: int
    cpu: int  # offloaded to CPU RAM, per process


def per_gpu(option: str, world: int, s: SingleProcess) -> PerGpu:
    """Bytes on one GPU (and offloaded to CPU per process) for a `dist` option at a world size."""
    if option == "ddp":
        buckets = s.gradients if world > 1 else 0
        return PerGpu(s.frozen_weights + s.trained_weights + s.gradients + buckets + s.optimizer + s.reference
                      + s.activations, 0)
    unit = 2 * s.unit_params * s.dtype_bytes  # the unit computing and the one being gathered next
    if option.startswith("zero"):
        stage = 3 if option.startswith("zero3") else int(option[4])
        offload = option.endswith("_offload")
        # DeepSpeed with bf16/fp16 casts every floating weight (adapters too) to that dtype; 4-bit weights stay
        if s.mixed_precision:
            weights = s.quantized_bytes + 2 * (s.base_params - s.quantized_params + s.adapter_params)
        else:
            weights = s.frozen_weights + s.trained_weights
        gradients = (2 if s.mixed_precision else 4) * s.trained_params
        optimizer = (12 if s.mixed_precision else 8) * s.trained_params
        reference = s.reference
        if stage >= 2:
            gradients //= world
        optimizer //= world
        if stage == 3:
            weights, reference = weights // world + unit, reference // world
        cpu = 0
        if offload:
            cpu, optimizer = optimizer, 0
            if stage == 3:
                cpu += weights - unit
                weights = unit
        return PerGpu(weights + gradients + optimizer + reference + s.activations, cpu)
    if option == "fsdp":
        trained = (4 if s.mixed_precision else s.dtype_bytes) * s.trained_params
        sharded = (s.frozen_weights + trained + trained + 2 * trained + s.reference) // world
        return PerGpu(sharded + unit + s.activations, 0)
    raise ValueError(f"unknown dist option {option}")


def table(s: SingleProcess, world_sizes: Tuple[int, ...], gpu_gib: Optional[float]) -> Tuple[str, Dict, List[str]]:
    """(printable table, {option: {world: GiB}}, one line per GPU size saying from how many GPUs each option
    fits)."""
    worlds = tuple(sorted(set(world_sizes)))
    options = [o for o in OPTIONS if s.shardable or o in ("ddp", "zero2")]
    result = {option: {world: per_gpu(option, world, s) for world in worlds} for option in options}
    header = f"{'dist option':<16}" + "".join(f"{f'{w} GPU' + ('s' if w > 1 else ''):>17}" for w in worlds)
    lines = [header, "-" * len(header)]
    for option in options:
        cells = []
        for world in worlds:
            usage = result[option][world]
            cell = f"{usage.gpu / GiB:.2f}" + (f" (+{usage.cpu / GiB:.0f} CPU)" if usage.cpu else "")
            cells.append(f"{cell:>17}")
        lines.append(f"{option:<16}" + "".join(cells))
    fits = []
    for size in (gpu_gib,) if gpu_gib else GPU_SIZES_GIB:
        fitting = {option: [w for w in worlds if result[option][w].gpu <= USABLE * size * GiB] for option in options}
        said = [f"{option} on {', '.join(map(str, found))}" for option, found in fitting.items() if found]
        fits.append(f"fits {size:g} GiB GPUs (at most {USABLE:.0%} used), by number of GPUs: "
                    + ("; ".join(said) if said else f"nothing up to {worlds[-1]} GPUs"))
    gib = {option: {world: round(usage.gpu / GiB, 2) for world, usage in by_world.items()}
           for option, by_world in result.items()}
    return "\n".join(lines), gib, fits
