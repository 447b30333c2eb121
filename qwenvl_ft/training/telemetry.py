"""How well a run uses its machine, measured in every run: real tokens/s and samples/s, padding, step time, the
share of it spent waiting for the next batch, peak memory and, on a GPU, MFU.

Two pieces, because the figures need the training loop's inside:
  `TelemetryMixin`  a mixin for the TRL trainer class (the run skeleton puts it in the class's bases). It times
                    the loop's `next()` on the train DataLoader iterator, through the public `get_batch_samples`
                    (the Trainer fetches every micro-batch of an optimizer step there, before the step), counts
                    what the fetched batches hold, and adds the figures to every training `log` call, so that
                    TensorBoard, the other trackers, the console and log_history.json get them (keys `perf/...`).
  `RunTelemetry`    a TrainerCallback holding the counters and the config-derived constants (model FLOPs per unit
                    of work from `qwenvl_ft.estimate.flops.training_flops`, the device's peak; set once the trainer
                    is built, `on_init_end`, outside the training loop); it closes each step's
                    timer in `on_step_end`, i.e. before logging, saving and evaluation, which are not step time.

Counting happens on the batches as the loop receives them (already on the device): the counts stay device
tensors and are read once per logging step, when the Trainer synchronises anyway for the loss, so the
telemetry adds no host-device synchronisation. Step times are host wall-clock times; the Trainer's per-step
NaN check on the loss synchronises the host with the GPU every micro-batch, so they track the device closely.

Why our own: transformers logs `train_tokens_per_second` only with `include_num_input_tokens_seen` (counting
padding or the attention mask, never packed rows), TRL's `num_tokens` miscounts packed Qwen batches (see
docs/performance.md), and neither measures input stalls or MFU.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from transformers import TrainerCallback

log = logging.getLogger("qwenvl_ft")

GiB = 1024 ** 3
PREFIX = "perf/"

# Dense (no sparsity) bf16 tensor peak of one device, TFLOP/s, from the vendors' datasheets; the first name found
# in torch.cuda.get_device_name() wins, so specific names come before the names they contain.
# trainer.peak_tflops overrides the table (a GPU not listed, or another precision's peak).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2), ("MI300X", 1307.4),
)

# counters per batch, in this order (one int64 device tensor)
COUNTS = ("tokens", "tensor_tokens", "samples", "token_pairs", "patches", "frame_pairs", "window_pairs")


def device_peak_tflops(name: str, override: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak of a device called `name` (torch.cuda.get_device_name), or the configured override."""
    if override:
        return override
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------------------------
# what a batch holds


def batch_counts(batch, vision=None, pairs: bool = False):
    """The `COUNTS` of one collated batch, as an int64 tensor on the batch's device (no synchronisation).

    Padded batches (an `attention_mask`): real tokens are the mask's ones, sequences its rows; packed rows (no mask,
    text positions restarting at 0 for every sample, qwenvl_ft/data/packing.py): every token is real and samples
    are the restarts. `pairs`: DPO batches hold a chosen and a rejected sequence per sample and repeat each pair's
    images, which the model encodes once (qwenvl_ft/modeling/padding_free.py). `vision`: the model's vision config
    (attention spans of the ViT, for `estimate.vision_attention_pairs`). Anything else (a method whose batches
    are raw rows: GRPO's loader yields prompts, which it turns into tokens only when it generates) counts as
    nothing, and the run reports step time, data wait and memory without token figures.
    """
    import torch

    from qwenvl_ft.estimate.flops import vision_attention_pairs

    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    if not isinstance(ids, torch.Tensor):
        return None
    zero = torch.zeros((), dtype=torch.long, device=ids.device)
    mask = batch.get("attention_mask")
    if mask is not None:
        lengths = mask.long().sum(-1)
        tokens, samples, token_pairs = lengths.sum(), zero + ids.shape[0], (lengths * lengths).sum()
    else:
        tokens, samples, token_pairs = _packed_counts(batch, ids)
    patches = frame_pairs = window_pairs = zero
    for key in ("image_grid_thw", "video_grid_thw"):
        grid = batch.get(key)
        if isinstance(grid, torch.Tensor) and grid.numel():
            patches = patches + grid.long().prod(-1).sum()
            if vision is not None:
                full, window = vision_attention_pairs(grid, vision)
                frame_pairs, window_pairs = frame_pairs + full, window_pairs + window
    vision_share = 2 if pairs else 1  # images repeated for the rejected sequences are encoded once
    return torch.stack([tokens, zero + ids.numel(), samples // (2 if pairs else 1), token_pairs,
                        patches // vision_share, frame_pairs // vision_share, window_pairs // vision_share])


def _packed_counts(batch, ids):
    """(real tokens, samples, sum of squared sample lengths) of a packed row. A sample without a single trained
    label is the filler that pads a pack to its fixed length (model.compile: data/packing.py `filler`; every real
    row trains on at least one token) and counts as padding."""
    import torch

    text = _text_positions(batch.get("position_ids"), ids).reshape(-1)
    starts = text == 0
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]  # a sample's last token: the next one restarts at 0, or the row ends
    real = torch.ones_like(starts)
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.numel() == text.numel():
        sample = starts.long().cumsum(0) - 1  # each token's sample, without a device sync
        trained = torch.zeros(text.numel(), dtype=torch.long, device=text.device)
        trained.index_add_(0, sample.clamp(min=0), (labels.reshape(-1) != -100).long())
        real = trained[sample.clamp(min=0)] > 0
    return (real.long().sum(), (starts & real).long().sum(),
            ((text.long() + 1) ** 2 * (ends & real).long()).sum())


def _text_positions(position_ids, ids):
    """Row 0 of packed M-RoPE positions (4, 1, total), or plain (1, total) positions; without any, one sample."""
    import torch

    if position_ids is None:
        return torch.arange(ids.shape[-1], device=ids.device)[None].expand_as(ids)
    return position_ids[0] if position_ids.dim() == 3 else position_ids


# ----------------------------------------------------------------------------------------------------------------
# the counters


@dataclass
class Window:
    """What accumulated since the last log (or since the start, for the run's totals)."""

    counts: object = None  # int64 device tensor of COUNTS, None until a batch arrives
    wait_s: float = 0.0  # host blocked on the DataLoader iterator
    step_s: float = 0.0  # fetch start to on_step_end, summed over optimizer steps
    steps: int = 0

    def add(self, other: "Window") -> None:
        if other.counts is not None:
            self.counts = other.counts if self.counts is None else self.counts + other.counts
        self.wait_s += other.wait_s
        self.step_s += other.step_s
        self.steps += other.steps


def performance_line(values: Dict[str, float]) -> str:
    """The console summary of a run's figures: `performance: 1,234 tokens/s, ...`."""
    v = values
    parts = []
    if "tokens_per_s" in v:
        parts += [f"{v['tokens_per_s']:,.0f} tokens/s", f"{v['samples_per_s']:.2f} samples/s",
                  f"padding {v['padding_fraction']:.1%}"]
    parts += [f"step {v['step_time_s']:.3f} s", f"data wait {v['data_wait_fraction']:.1%}"]
    if "peak_allocated_gib" in v:
        parts.append(f"peak memory {v['peak_allocated_gib']:.2f} GiB allocated, {v['peak_reserved_gib']:.2f} GiB "
                     f"reserved")
    elif "peak_rss_gib" in v:
        parts.append(f"peak RSS {v['peak_rss_gib']:.2f} GiB")
    if "mfu" in v:
        parts.append(f"MFU {v['mfu']:.1%} ({v['model_tflops_per_s_per_device']:.1f} TFLOP/s per device)")
    elif "model_tflops_per_s_per_device" in v:
        parts.append(f"{v['model_tflops_per_s_per_device'] * 1000:.2f} model GFLOP/s")
    return "performance: " + ", ".join(parts)


def peak_memory() -> Dict[str, float]:
    """CUDA's max allocated and reserved bytes since the process started, or the main process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_gib": rss * (1 if sys.platform == "darwin" else 1024) / GiB}


class _TimedIterator:
    """The DataLoader iterator as the loop sees it, adding up the time each `next()` blocks."""

    def __init__(self, iterator: Iterator):
        self.iterator, self.waited = iterator, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.waited += time.perf_counter() - start


class RunTelemetry(TrainerCallback):
    """Counters and constants of the run's telemetry (see the module docstring); `training_callbacks` adds it."""

    def __init__(self, cfg):
        from qwenvl_ft import methods

        self.cfg = cfg
        # DPO: a batch holds a chosen and a rejected sequence per pair, with the pair's images repeated
        self.pairs = methods.get(cfg.trainer.kind).sequences_per_row() == 2
        self.peak_override = getattr(cfg.trainer, "peak_tflops", None)
        self.flops = None  # estimate.TrainingFlops, set when training begins
        self.vision = None  # the model's vision config
        self.peak_tflops: Optional[float] = None
        self.window, self.total = Window(), Window()
        self.summary: Optional[Dict[str, float]] = None  # the whole run's figures, set by the Trainer's final log
        self._step_started: Optional[float] = None

    # -- set-up ----------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        """The run's constants, once the trainer is built: they depend on the config only, so they are set-up
        (the start-up table's trainer build), not time of the training loop."""
        import torch

        from qwenvl_ft.estimate.counts import meta_model
        from qwenvl_ft.estimate.flops import training_flops

        try:  # the model's architecture on the meta device: about 0.02 s, no weights
            model = meta_model(self.cfg.model)
            self.flops, self.vision = training_flops(self.cfg, model), model.config.vision_config
        except Exception as err:  # telemetry must never stop a run: no FLOPs, no MFU
            log.warning("telemetry: model FLOPs unavailable, no MFU (%s: %s)", type(err).__name__, err)
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            self.peak_tflops = device_peak_tflops(name, self.peak_override)
            if self.peak_tflops is None:
                log.warning("telemetry: no dense bf16 peak known for %s; set trainer.peak_tflops for MFU", name)

    def on_train_begin(self, args, state, control, **kwargs):
        from qwenvl_ft.training import startup

        startup.mark("training loop set-up (data loader, optimizer, checkpoint)")
        if startup.current() is not None and state.is_world_process_zero:
            log.info("%s", startup.current().report())

    # -- per step --------------------------------------------------------------------------------------------

    def fetched(self, batches: List, waited_s: float, started: float) -> None:
        """The loop received one optimizer step's micro-batches, after blocking `waited_s` for them."""
        self._step_started = started
        self.window.wait_s += waited_s
        for batch in batches:
            counts = batch_counts(batch, self.vision, self.pairs)
            if counts is not None:
                self.window.counts = counts if self.window.counts is None else self.window.counts + counts

    def on_step_end(self, args, state, control, **kwargs):
        from qwenvl_ft.training import startup

        if startup.current() is not None:
            startup.current().first_step_done()
        if self._step_started is not None:
            self.window.step_s += time.perf_counter() - self._step_started
            self.window.steps += 1
            self._step_started = None

    # -- figures ---------------------------------------------------------------------------------------------

    def close_window(self, accelerator) -> Optional[Dict[str, float]]:
        """Figures of the steps since the last log, over all ranks (a collective: every rank logs together)."""
        window, self.window = self.window, Window()
        self.total.add(window)
        return self._figures(window, accelerator)

    def close_run(self, accelerator) -> Optional[Dict[str, float]]:
        self.total.add(self.window)
        self.window = Window()
        self.summary = self._figures(self.total, accelerator)
        return self.summary

    def _figures(self, window: Window, accelerator) -> Optional[Dict[str, float]]:
        import torch

        counts = window.counts
        device = counts.device if counts is not None else accelerator.device
        local = torch.zeros(len(COUNTS) + 5, dtype=torch.float64, device=device)
        if counts is not None:
            local[: len(COUNTS)] = counts.double()
        memory = peak_memory()
        local[len(COUNTS):] = torch.tensor([window.wait_s, window.step_s, window.steps,
                                            memory.get("peak_allocated_gib", memory.get("peak_rss_gib", 0.0)),
                                            memory.get("peak_reserved_gib", 0.0)], dtype=torch.float64)
        ranks = accelerator.gather(local[None]) if accelerator.num_processes > 1 else local[None]
        totals, peaks = ranks.sum(0).tolist(), ranks.max(0).values.tolist()
        count = dict(zip(COUNTS, totals[: len(COUNTS)]))
        wait_s, step_s, steps = totals[len(COUNTS): len(COUNTS) + 3]
        if steps == 0 or step_s <= 0:
            return None
        devices = ranks.shape[0]
        seconds = step_s / devices  # ranks step in lockstep: the mean step time is the wall time
        values = {"step_time_s": step_s / steps, "data_wait_fraction": wait_s / step_s}
        counted = count["tensor_tokens"] > 0  # GRPO's loader yields prompt rows: no tokens until it generates
        if counted:
            values.update(tokens_per_s=count["tokens"] / seconds, samples_per_s=count["samples"] / seconds,
                          padding_fraction=1 - count["tokens"] / count["tensor_tokens"])
        if "peak_allocated_gib" in memory:
            values.update(peak_allocated_gib=peaks[len(COUNTS) + 3], peak_reserved_gib=peaks[len(COUNTS) + 4])
        else:
            values["peak_rss_gib"] = peaks[len(COUNTS) + 3]
        if self.flops is not None and counted:
            from qwenvl_ft.estimate.flops import StepWork

            flops = self.flops.step(StepWork(tokens=count["tokens"], token_pairs=count["token_pairs"],
                                             patches=count["patches"], frame_pairs=count["frame_pairs"],
                                             window_pairs=count["window_pairs"]))
            values["model_tflops_per_s_per_device"] = flops / seconds / devices / 1e12
            if self.peak_tflops:
                values["mfu"] = values["model_tflops_per_s_per_device"] / self.peak_tflops
        return values


def find_telemetry(trainer) -> Optional[RunTelemetry]:
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, RunTelemetry)), None)


class TelemetryMixin:
    """Mixin for the TRL trainer class (first in its bases): feeds `RunTelemetry` from inside the loop. Without a
    `RunTelemetry` callback it changes nothing."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        telemetry = find_telemetry(self)
        if telemetry is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        started = time.perf_counter()
        timed = _TimedIterator(epoch_iterator)
        batches, items = super().get_batch_samples(timed, num_batches, device)
        telemetry.fetched(batches, timed.waited, started)
        return batches, items

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        telemetry = find_telemetry(self)
        if telemetry is not None:
            figures = None
            if "train_runtime" in logs:  # the Trainer's final log: the whole run
                figures = telemetry.close_run(self.accelerator)
            elif "loss" in logs and not any(key.startswith("eval_") for key in logs):
                figures = telemetry.close_window(self.accelerator)
            if figures is not None:
                logs.update({PREFIX + key: value for key, value in figures.items()})
        super().log(logs, start_time)


def summary_metrics(trainer) -> Dict[str, object]:
    """The whole run's figures for metrics.json / summary.json: `performance` ({} before the Trainer's final
    log, e.g. without a telemetry callback)."""
    telemetry = find_telemetry(trainer)
    figures = telemetry.summary if telemetry is not None else None
    if figures is None:
        return {}
    return {"performance": {key: round(value, 6) for key, value in figures.items()}}
