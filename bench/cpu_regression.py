"""The CPU regression of issue 21: the same small LoRA job through two source trees and through this tree with one
suspect switched off at a time, alternated run by run, as ratios to the first variant.

    python bench/cpu_regression.py --old-tree /tmp/bisect-ab3212b [--repeats 2] [--rows 512]
    git worktree add /tmp/bisect-ab3212b ab3212b      # the tree the issue compares with

The job (the issue's): the tiny random Qwen2-VL, the demo's generated shapes (`--rows` training rows, 16 held
out), LoRA r=8 on q_proj/v_proj, batch 8, one epoch, fp32, a fresh output folder (so a cold data cache) in a
fresh process. Variants, each run once per round, rounds repeated `--repeats` times (A B C ... A B C ...):

  old-tree        the tree of --old-tree (ab3212b: before the data and telemetry work)
  this-tree       this tree as a user runs it (data.num_workers=auto: 1 worker on a CPU-only run)
  workers-0       data.num_workers=0 (batches collated in the training process)
  no-telemetry    the run telemetry switched off (telemetry.find_telemetry answers None, so TelemetryMixin passes
                  every call straight through: no batch counting, no per-window figures)
  warm-cache      the data cache of a previous run of the same data reused (data.cache_dir: a shared folder)
  cache-off       data.cache=off (the data check measured, nothing stored or looked up)

Each run's figures: end-to-end wall seconds (process start to exit, as the issue measured), the Trainer's
`train_runtime` (the training loop alone), and the CPU seconds of the process and its children. Medians per
variant, then each median over this-tree's. The machine's load average is printed next to every round: on a
shared machine, read the ratios, not the seconds. docs/performance.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THIS_TREE = Path(__file__).resolve().parent.parent
RUNNER = r"""
import os, sys
if os.environ.get("BENCH_NO_TELEMETRY"):
    import qwenvl_ft.training.telemetry as telemetry
    telemetry.find_telemetry = lambda trainer: None
try:
    from qwenvl_ft.commands.cli import main
except ImportError:  # trees before the restructure
    from qwenvl_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def job(rows: int, output_dir: Path) -> list:
    return ["train", "recipe=demo", "adapter=lora", "adapter.r=8", "adapter.target_modules=[q_proj,v_proj]",
            f"data.shapes.num_train={rows}", "data.shapes.num_eval=16", "trainer.epochs=1", "trainer.batch_size=8",
            "trainer.precision=fp32", "trainer.save_steps=100000", "trainer.disable_tqdm=true",
            f"output_dir={output_dir}"]


def variants(old_tree: Path, cache_dir: Path) -> dict:
    """name -> (source tree, extra overrides, extra environment)."""
    return {
        "this-tree": (THIS_TREE, [], {}),
        "old-tree": (old_tree, [], {}),
        "workers-0": (THIS_TREE, ["data.num_workers=0"], {}),
        "no-telemetry": (THIS_TREE, [], {"BENCH_NO_TELEMETRY": "1"}),
        "warm-cache": (THIS_TREE, [f"data.cache_dir={cache_dir}"], {}),
        "cache-off": (THIS_TREE, ["data.cache=off"], {}),
    }


def run_once(tree: Path, overrides: list, env: dict, rows: int, work: Path) -> dict:
    output_dir = Path(tempfile.mkdtemp(dir=work))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUNNER, *job(rows, output_dir), *overrides], cwd=work,
                         env={**os.environ, "PYTHONPATH": str(tree), **env}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"run failed ({tree} {overrides}):\n{out.stderr[-3000:]}")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {"wall": wall, "loop": metrics.get("train_runtime_s") or metrics.get("train_runtime"),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def telemetry_step_cost(repeats: int = 2000) -> float:
    """Seconds the telemetry adds to one step of this job, measured alone: `batch_counts` on a batch shaped like
    the job's (8 rows of ~40 tokens, one image each) plus the timed iterator around the loader. The per-window
    figures (once per logging step, not per step) are left out."""
    sys.path.insert(0, str(THIS_TREE))
    import torch

    from qwenvl_ft.config.compose import compose, validate
    from qwenvl_ft.estimate.counts import meta_model
    from qwenvl_ft.training.telemetry import RunTelemetry, _TimedIterator

    cfg = validate(compose(["recipe=demo", "adapter=lora"], output_dir="/tmp/unused"))
    telemetry = RunTelemetry(cfg)
    telemetry.vision = meta_model(cfg.model).config.vision_config
    batch = {"input_ids": torch.ones(8, 40, dtype=torch.long), "attention_mask": torch.ones(8, 40, dtype=torch.long),
             "image_grid_thw": torch.tensor([[1, 4, 4]] * 8)}
    started = time.perf_counter()
    for _ in range(repeats):
        timed = _TimedIterator(iter([batch]))
        batches = [next(timed)]
        telemetry.fetched(batches, timed.waited, time.perf_counter())
    return (time.perf_counter() - started) / repeats


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu_regression_"))
    chosen = {name: spec for name, spec in variants(args.old_tree, work / "shared_cache").items()
              if not args.only or name in args.only or name == "this-tree"}
    if "warm-cache" in chosen:  # fill the shared cache once, outside the timed runs
        run_once(*chosen["warm-cache"], args.rows, work)
    results = {name: [] for name in chosen}
    for round_ in range(args.repeats):
        print(f"round {round_ + 1}: load average {load()} before", flush=True)
        for name, (tree, overrides, env) in chosen.items():
            results[name].append(run_once(tree, overrides, env, args.rows, work))
            print(f"  {name:<13} wall {results[name][-1]['wall']:6.1f} s  loop {results[name][-1]['loop']:6.2f} s"
                  f"  cpu {results[name][-1]['cpu']:6.1f} s  (load {load()})", flush=True)
    print_table(results, args)
    if "no-telemetry" in results:
        per_step = telemetry_step_cost()
        loop = statistics.median(r["loop"] for r in results["this-tree"]) / (args.rows // 8)
        print(f"\ntelemetry per step, measured alone: {per_step * 1e3:.2f} ms = {per_step / loop:.2%} of this job's "
              f"median CPU step ({loop * 1e3:.0f} ms; load average {load()})")


def print_table(results: dict, args) -> None:
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("wall", "loop", "cpu")}
              for name, runs in results.items()}
    base = median["this-tree"]
    print(f"\nLoRA r=8 q/v, tiny Qwen2-VL, {args.rows} shape rows, batch 8, 1 epoch, fp32; median of {args.repeats} "
          f"alternated runs; {os.cpu_count()} CPUs, load average {load()} at the end\n")
    print("| variant | end to end s | training loop s | CPU s | end to end / this-tree | loop / this-tree |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in median.items():
        print(f"| {name} | {m['wall']:.1f} | {m['loop']:.2f} | {m['cpu']:.1f} | {m['wall'] / base['wall']:.2f} | "
              f"{m['loop'] / base['loop']:.2f} |")


if __name__ == "__main__":
    main()
