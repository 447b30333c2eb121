"""Settings left to `auto` (trainer.batch_size, data.max_tokens_per_batch, model.gradient_checkpointing), resolved
once, before anything loads, to the fastest setting whose estimated peak (estimate/memory.py, per GPU under the
run's dist engine: estimate/per_gpu.py) fits one GPU with a margin.

`choose` is a pure function of the config, the memory available and the world size; the training run
(training/start.py) and `qwenvl-ft estimate` both call it, so they print the same choice. Its rule ("fastest"):

  fits          predicted peak <= 90% of the GPU's memory less 0.5 GiB (the CUDA context, outside the estimate;
                the other 10% for fragmentation, the margin `qwenvl-ft estimate`'s "fits" lines use too)
  batch         the largest that fits among 1, 2, 4, ... 64 rows (pairs for DPO); with trainer.effective_batch_size,
                among the divisors of its per-device share, and gradient_accumulation_steps makes up the rest
  token budget  the largest that fits among data.max_length x 1, 2, 4, ... up to 65536 tokens
  checkpointing off when, without it, a batch of at least 8192 tokens fits, or at least the batch that checkpointing
                would allow when that is smaller: recomputation costs one more forward (about a third more compute
                per token), while a batch past a few thousand tokens already fills the GPU's matmuls
Without a GPU and without dist.gpu_memory_gib: batch 4 (token budget 4 x data.max_length) and checkpointing off, the
sizes of the CPU recipes, where memory is not what limits a run and recomputation only costs time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.estimate.memory import GiB, estimate_memory
from qwenvl_ft.estimate.per_gpu import dist_option, peak_per_gpu

AUTO = "auto"
USABLE = 0.9  # of a GPU's memory (distributed/memory.py's margin), after the CUDA context
CUDA_CONTEXT = GiB // 2
MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 65536
TOKEN_UNIT = 2048  # the step of token budgets when data.max_length is null
SATURATING_TOKENS = 8192  # a batch this large keeps checkpointing off (see the rule above)
CPU_BATCH_ROWS = 4


@dataclass(frozen=True)
class MemoryAvailable:
    """One GPU's memory in bytes (None: no GPU and no dist.gpu_memory_gib) and where the number comes from."""

    total: Optional[int]
    source: str

    @property
    def usable(self) -> int:
        return int(USABLE * self.total) - CUDA_CONTEXT


@dataclass(frozen=True)
class Candidate:
    batch_size: int
    max_tokens_per_batch: Optional[int]
    accumulation: int


@dataclass
class Fitted:
    """The resolved settings (dotted key -> plain value, for the keys that were auto, and gradient accumulation
    when trainer.effective_batch_size sets it), the reason lines, and the predicted peak per GPU (bytes)."""

    settings: Dict[str, Any] = field(default_factory=dict)
    reasons: List[str] = field(default_factory=list)
    predicted: Optional[int] = None


def auto_keys(cfg: TrainConfig) -> List[str]:
    """The keys of `cfg` left to auto."""
    values = {"trainer.batch_size": cfg.trainer.batch_size, "data.max_tokens_per_batch": cfg.data.max_tokens_per_batch,
              "model.gradient_checkpointing": cfg.model.gradient_checkpointing}
    return [key for key, value in values.items() if value == AUTO]


def gpu_memory(cfg: TrainConfig) -> MemoryAvailable:
    """dist.gpu_memory_gib when set, else the total memory of this process's CUDA device, else none."""
    if cfg.dist.gpu_memory_gib is not None:
        return MemoryAvailable(int(cfg.dist.gpu_memory_gib * GiB), f"dist.gpu_memory_gib={cfg.dist.gpu_memory_gib:g}")
    import torch

    if not torch.cuda.is_available():
        return MemoryAvailable(None, "no CUDA GPU and no dist.gpu_memory_gib")
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return MemoryAvailable(props.total_memory, f"cuda:{index} ({props.name}, {props.total_memory / GiB:.1f} GiB)")


def resolved(cfg: TrainConfig, settings: Dict[str, Any]) -> TrainConfig:
    """`cfg` with `settings` (dotted keys of its groups) in place: plain values, checked again by the schema."""
    groups: Dict[str, Dict[str, Any]] = {}
    for key, value in settings.items():
        group, name = key.split(".", 1)
        groups.setdefault(group, {})[name] = value
    return dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **values)
                                       for group, values in groups.items()})


def choose(cfg: TrainConfig, memory: Optional[MemoryAvailable], world_size: int = 1, model=None) -> Fitted:
    """The fastest setting of every auto key that fits `memory` by the estimate (the rule in the module's
    docstring); ConfigError naming the keys when not even the smallest fits. `memory` may be None when no key is
    auto (trainer.effective_batch_size is still checked against the devices)."""
    check_effective_batch(cfg, world_size)
    keys = auto_keys(cfg)
    if not keys:
        return Fitted()
    candidates = _candidates(cfg, world_size)
    if memory.total is None:
        return _cpu_defaults(cfg, keys, candidates, memory)
    if model is None:
        from qwenvl_ft.estimate.counts import meta_model

        model = meta_model(cfg.model)
    checkpointing = [False, True] if cfg.model.gradient_checkpointing == AUTO else [cfg.model.gradient_checkpointing]
    largest = {on: _largest_fitting(cfg, candidates, on, memory.usable, model, world_size) for on in checkpointing}
    on = _pick_checkpointing(largest)
    if largest[on] is None:
        smallest = _peak(cfg, candidates[0], checkpointing[-1], model, world_size)
        raise ConfigError(f"{', '.join(k + '=auto' for k in keys)}: even {_describe(cfg, candidates[0], smallest)}"
                          f"{' with gradient checkpointing' if checkpointing[-1] else ''} is predicted at "
                          f"{smallest[0] / GiB:.2f} GiB per GPU, over the {memory.usable / GiB:.2f} GiB usable of "
                          f"{memory.source}: lower data.max_length or data.max_pixels, or use adapter=qlora or a "
                          f"sharding dist option (qwenvl-ft estimate lists them)")
    pick, peak = largest[on]
    fitted = Fitted(_settings(cfg, keys, pick, on), [], peak[0])
    fitted.reasons.append(f"memory: {memory.source}; an auto setting must fit {memory.usable / GiB:.2f} GiB "
                          f"({USABLE:.0%} of it less {CUDA_CONTEXT / GiB:.1f} GiB of CUDA context), per GPU under "
                          f"{_engine(cfg, world_size)}")
    fitted.reasons += _reasons(cfg, keys, candidates, largest, on, memory, model, world_size)
    return fitted


def check_effective_batch(cfg: TrainConfig, world_size: int) -> None:
    """trainer.effective_batch_size with a fixed trainer.batch_size: it must be what the run really has."""
    t = cfg.trainer
    if t.effective_batch_size is None or t.batch_size == AUTO:
        return
    steps = t.batch_size * t.gradient_accumulation_steps * world_size
    if steps != t.effective_batch_size:
        raise ConfigError(f"trainer.effective_batch_size={t.effective_batch_size}, but trainer.batch_size x "
                          f"gradient_accumulation_steps x devices = {t.batch_size} x {t.gradient_accumulation_steps} "
                          f"x {world_size} = {steps}: set trainer.batch_size=auto to derive gradient_accumulation_steps")


def fit(cfg: TrainConfig, model=None) -> tuple:
    """(`cfg` with its auto keys resolved for this machine, the Fitted): what `qwenvl-ft estimate` and data-check
    use, at the world size the run will have (dist.num_processes x dist.num_machines, one per visible GPU when
    num_processes is null)."""
    if not auto_keys(cfg):
        return cfg, Fitted()
    fitted = choose(cfg, gpu_memory(cfg), planned_world_size(cfg), model)
    return resolved(cfg, fitted.settings), fitted


def planned_world_size(cfg: TrainConfig) -> int:
    dist = cfg.dist
    if dist_option(cfg) == "single":
        return 1
    if dist.num_processes is not None:
        return dist.num_processes * dist.num_machines
    import torch

    return max(1, torch.cuda.device_count()) * dist.num_machines


def _candidates(cfg: TrainConfig, world_size: int) -> List[Candidate]:
    """The settings tried, smallest first."""
    t, d = cfg.trainer, cfg.data
    if d.max_tokens_per_batch == AUTO:
        unit = d.max_length or TOKEN_UNIT
        batch = 1 if t.batch_size == AUTO else t.batch_size  # unused: the token budget sets the batch
        return [Candidate(batch, n, t.gradient_accumulation_steps) for n in _doubling(unit, MAX_BATCH_TOKENS)]
    if t.batch_size != AUTO:
        return [Candidate(t.batch_size, d.max_tokens_per_batch, t.gradient_accumulation_steps)]
    if t.effective_batch_size is None:
        return [Candidate(b, d.max_tokens_per_batch, t.gradient_accumulation_steps)
                for b in _doubling(1, MAX_BATCH_ROWS)]
    share, rest = divmod(t.effective_batch_size, world_size)
    if share == 0 or rest:
        raise ConfigError(f"trainer.effective_batch_size={t.effective_batch_size} is not a multiple of the "
                          f"{world_size} devices: each device must take the same batch")
    return [Candidate(b, d.max_tokens_per_batch, share // b) for b in range(1, min(share, MAX_BATCH_ROWS) + 1)
            if share % b == 0]


def _doubling(start: int, cap: int) -> List[int]:
    sizes = [start]
    while sizes[-1] * 2 <= cap:
        sizes.append(sizes[-1] * 2)
    return sizes


def _with(cfg: TrainConfig, candidate: Candidate, checkpointing: bool) -> TrainConfig:
    return resolved(cfg, {"trainer.batch_size": candidate.batch_size,
                          "trainer.gradient_accumulation_steps": candidate.accumulation,
                          "data.max_tokens_per_batch": candidate.max_tokens_per_batch,
                          "model.gradient_checkpointing": checkpointing})


def _peak(cfg: TrainConfig, candidate: Candidate, checkpointing: bool, model, world_size: int) -> tuple:
    """(predicted bytes per GPU, tokens per device step) of `cfg` with `candidate` and `checkpointing`."""
    concrete = _with(cfg, candidate, checkpointing)
    result = estimate_memory(concrete, model)
    return peak_per_gpu(concrete, result, model, world_size), result.budget.tokens


def _largest_fitting(cfg, candidates, checkpointing: bool, usable: int, model, world_size: int):
    """(the largest candidate that fits, its (peak, tokens)), or None; the peak grows with the batch, so the search
    stops at the first that does not fit."""
    best = None
    for candidate in candidates:
        peak = _peak(cfg, candidate, checkpointing, model, world_size)
        if peak[0] > usable:
            break
        best = (candidate, peak)
    return best


def _pick_checkpointing(largest: Dict[bool, Optional[tuple]]) -> bool:
    """Checkpointing off when it fits a batch of SATURATING_TOKENS, or one at least as large as with it."""
    if len(largest) == 1:
        return next(iter(largest))
    off, on = largest[False], largest[True]
    if off is None:
        return True
    if on is None:
        return False
    return not off[1][1] >= min(on[1][1], SATURATING_TOKENS)


def _settings(cfg: TrainConfig, keys: List[str], pick: Candidate, checkpointing: bool) -> Dict[str, Any]:
    values = {"trainer.batch_size": pick.batch_size, "data.max_tokens_per_batch": pick.max_tokens_per_batch,
              "model.gradient_checkpointing": checkpointing}
    settings = {key: values[key] for key in keys}
    if cfg.trainer.effective_batch_size is not None:
        settings["trainer.gradient_accumulation_steps"] = pick.accumulation
    return settings


def _describe(cfg: TrainConfig, candidate: Candidate, peak: tuple) -> str:
    from qwenvl_ft import methods

    if candidate.max_tokens_per_batch is not None:
        return f"a token budget of {candidate.max_tokens_per_batch}"
    unit = methods.get(cfg.trainer.kind).batch_unit
    unit = unit[:-1] if candidate.batch_size == 1 and unit.endswith("s") else unit
    return f"a batch of {candidate.batch_size} {unit} ({peak[1]} tokens)"


def _engine(cfg: TrainConfig, world_size: int) -> str:
    option = dist_option(cfg)
    return "one process" if option == "single" else f"dist {option} over {world_size} processes"


def _reasons(cfg, keys, candidates, largest, on: bool, memory, model, world_size: int) -> List[str]:
    """One line per auto key: what was chosen, its predicted peak, and what the next size up would need."""
    pick, peak = largest[on]
    lines = []
    if "model.gradient_checkpointing" in keys:
        off = largest[False]
        if not on:
            why = f"without it {_describe(cfg, off[0], off[1])} fits ({off[1][0] / GiB:.2f} GiB)"
        elif off is None:
            why = "even the smallest batch does not fit without it"
        else:
            why = (f"without it only {_describe(cfg, off[0], off[1])} fits, under {SATURATING_TOKENS} tokens and "
                   f"under the {peak[1]} tokens it allows")
        lines.append(f"model.gradient_checkpointing=auto -> {str(on).lower()}: {why} (rule: off when a batch of "
                     f">= {SATURATING_TOKENS} tokens, or as large as with it, fits without it)")
    sized = "data.max_tokens_per_batch" if "data.max_tokens_per_batch" in keys else \
        "trainer.batch_size" if "trainer.batch_size" in keys else None
    if sized is not None:
        index = candidates.index(pick)
        above = " (the largest tried)"
        if index + 1 < len(candidates):
            bigger = candidates[index + 1]
            need = _peak(cfg, bigger, on, model, world_size)
            above = f"; {_describe(cfg, bigger, need)} would need {need[0] / GiB:.2f} GiB"
        value = pick.max_tokens_per_batch if sized == "data.max_tokens_per_batch" else pick.batch_size
        lines.append(f"{sized}=auto -> {value}: {_describe(cfg, pick, peak)} is predicted at "
                     f"{peak[0] / GiB:.2f} GiB{above}")
    if sized == "data.max_tokens_per_batch" and "trainer.batch_size" in keys:
        lines.append("trainer.batch_size=auto -> 1: unused, data.max_tokens_per_batch sets the batch")
    if cfg.trainer.effective_batch_size is not None:
        lines.append(f"trainer.gradient_accumulation_steps -> {pick.accumulation}, to keep "
                     f"trainer.effective_batch_size={cfg.trainer.effective_batch_size} over {world_size} device(s)")
    return lines


def _cpu_defaults(cfg: TrainConfig, keys: List[str], candidates: List[Candidate], memory) -> Fitted:
    """No GPU memory to size by: the CPU recipes' sizes, checkpointing off (it would only cost time)."""
    if cfg.data.max_tokens_per_batch == AUTO:
        target = CPU_BATCH_ROWS * (cfg.data.max_length or TOKEN_UNIT)
        pick = max((c for c in candidates if c.max_tokens_per_batch <= target), key=lambda c: c.max_tokens_per_batch)
    elif cfg.trainer.batch_size == AUTO:
        pick = max((c for c in candidates if c.batch_size <= CPU_BATCH_ROWS), key=lambda c: c.batch_size)
    else:
        pick = candidates[0]
    settings = _settings(cfg, keys, pick, False)
    chosen = ", ".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                       for key, value in settings.items())
    return Fitted(settings, [f"{memory.source}: the CPU defaults {chosen} (batch {CPU_BATCH_ROWS}, checkpointing "
                             f"off: memory is not what limits a CPU run, recomputation only costs time; set "
                             f"dist.gpu_memory_gib to size the run for a GPU)"])
