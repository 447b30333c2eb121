"""`qwenvl-ft estimate`: peak GPU memory (qwenvl_ft/estimate/memory.py), per GPU for each dist option and world
size, and model FLOPs (qwenvl_ft/estimate/flops.py) of a training run, predicted from the config before anything
loads; bounded by the measured data too when the run folder holds a data check of the same data.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict

from omegaconf import DictConfig

from qwenvl_ft import methods
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.estimate.autofit import fit
from qwenvl_ft.estimate.counts import meta_model
from qwenvl_ft.estimate.flops import training_flops, worst_case_work
from qwenvl_ft.estimate.memory import GiB, Estimate, estimate_memory
from qwenvl_ft.estimate.per_gpu import single_process_parts

log = logging.getLogger("qwenvl_ft")


def estimate(composed: DictConfig) -> Dict:
    from qwenvl_ft.config.compose import validate

    cfg: TrainConfig = validate(composed)
    model = meta_model(cfg.model)
    cfg, fitted = fit(cfg, model)  # trainer.batch_size=auto, ...: the choice a training run makes (the same function)
    for line in fitted.reasons:
        print(f"auto: {line}")
    result = estimate_memory(cfg, model)
    c, b = result.counts, result.budget
    parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(c.by_part.items()))
    print(f"model: {cfg.model.name_or_path} ({cfg.model.family.value}), {c.total / 1e9:.3f}B parameters "
          f"({parts})")
    if c.experts:
        text = model.config.get_text_config()
        print(f"mixture of experts: {c.active / 1e9:.3f}B parameters active per token of {c.total / 1e9:.3f}B "
              f"({c.experts / 1e9:.3f}B in routed experts, {text.num_experts_per_tok} of {text.num_experts} per "
              f"token)")
    print(f"training: {cfg.adapter.method.value}, {c.trainable / 1e6:.2f}M trainable "
          f"({100 * c.trainable / c.total:.2f}%), gradient checkpointing "
          f"{'on' if cfg.model.gradient_checkpointing else 'off'}")
    print(f"batch per device step: {b.note}")
    print(result.table())
    flops = training_flops(cfg, model)
    work = worst_case_work(b, model.config.vision_config)
    step_flops = flops.step(work)
    reference = ", reference forward" if _has_reference(cfg) else ""
    print(f"model FLOPs per device step of this batch: {step_flops / 1e12:.2f} TFLOP, "
          f"{step_flops / b.tokens / 1e9:.2f} GFLOP per token (forward + backward{reference}; "
          f"the run's telemetry divides the FLOP/s of its real batches by the GPU's peak for MFU)")
    sharded, fits = sharding(cfg, result, model)
    out = {"predicted_peak_gib": round(result.total / GiB, 2), "parameters": c.total, "trainable": c.trainable,
           "active_parameters": c.active,
           "tokens_per_step": b.tokens, "components_gib": {n: round(v / GiB, 3) for n, v, _ in result.rows},
           "model_tflop_per_step": round(step_flops / 1e12, 3), "model_flops_per_token": step_flops / b.tokens,
           "per_gpu_gib_by_dist": sharded, "fits": fits}
    if fitted.settings:
        out["auto"] = {"settings": fitted.settings, "reasons": fitted.reasons}
    measured = measured_data(cfg)
    if measured is not None:
        data_cfg, source = measured
        again = estimate_memory(dataclasses.replace(cfg, data=data_cfg))
        print(f"with the measured data ({source}): longest row {data_cfg.max_length} tokens, at most "
              f"{data_cfg.max_visual_tokens} visual tokens per row -> batch: {again.budget.note}")
        print(f"{'predicted peak (measured)':<26} {again.total / GiB:8.2f}")
        out["predicted_peak_gib_measured_data"] = round(again.total / GiB, 2)
    return out


def _has_reference(cfg: TrainConfig) -> bool:
    return methods.get(cfg.trainer.kind).reference_forwards(cfg) > 0


# ----------------------------------------------------------------------------------------------------------------
# the sharding section: per GPU for each dist option and world size (qwenvl_ft/distributed/memory.py)


def sharding(cfg: TrainConfig, result: Estimate, model) -> tuple:
    from qwenvl_ft.distributed import memory

    dist = cfg.dist
    worlds = list(memory.WORLD_SIZES)
    if dist.num_processes is not None:
        worlds.append(dist.num_processes * dist.num_machines)
    table, gib, fits = memory.table(single_process_parts(cfg, result, model), tuple(worlds), dist.gpu_memory_gib)
    print(f"\nper GPU by dist option and world size (GiB, same per-device batch; what each engine keeps: "
          f"qwenvl_ft/distributed/memory.py):\n{table}")
    if cfg.adapter.load_in_4bit:
        print("(QLoRA: zero3 and fsdp cannot split 4-bit weights, so only ddp and zero2 are listed)")
    print("\n".join(fits))
    return gib, fits


def measured_data(cfg: TrainConfig):
    """(data config bounded by what the data check measured, where from), or None.

    The worst case above assumes rows of data.max_length holding the whole image budget. When the run folder
    holds a data_check.json of the same data, settings and training method (`qwenvl-ft data-check`, or a training
    start, with the same run_name), its longest row and its most visual tokens in one row bound the batch instead:
    the data check measured every row once (a pair's longer side for DPO, a prompt for GRPO, whose completion
    `Method.batch_data` adds), and its numbers are reused rather than estimated again.
    """
    import json
    from pathlib import Path

    from qwenvl_ft.data.cache import data_key

    path = Path(cfg.output_dir) / "data_check.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        train = report["summary"]["train"]
        same_method = report["settings"].get("method", "sft") == methods.get(cfg.trainer.kind).name
        if report["settings"].get("data_key") != data_key(cfg.data) or not same_method:
            log.info("%s describes other data or settings; not used", path)
            return None
        longest = int(train["sequence_length"]["max"])
        visual = int(train.get("visual_tokens_per_row", {}).get("max", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    d = cfg.data
    max_length = min(longest, d.max_length) if d.max_length else longest
    visual = max(1, min(visual, d.max_visual_tokens) if d.max_visual_tokens else visual)
    return dataclasses.replace(d, max_length=max_length, max_visual_tokens=visual), str(path)
