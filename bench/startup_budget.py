"""The start-up budget of issue 21: `qwenvl-ft train recipe=demo` reaches its first optimizer step in <= 5 s (warm
data cache, 2 cores), `eval` and `infer` answer within <= 6 s.

    python bench/startup_budget.py [--repeats 5] [--baseline /tmp/main_tree]

Each figure is a fresh `python -m qwenvl_ft` process (what a user waits for), run from this tree, and with
`--baseline TREE` alternately from that tree too (A B A B; the same interpreter and packages, PYTHONPATH set to
the tree). After one untimed warm-up per tree (OS file cache, bytecode, the random tiny model, the data cache):
- train (warm): `train recipe=demo trainer.max_steps=1` in a new run folder each time, the data cache filled;
- train (cold): once per tree, the same with an empty data cache (`data.cache_dir`);
- eval / infer: `eval recipe=demo run_name=RUN` and `infer ... infer.images=[one png]` on a run trained by the
  warm-up.
Figures: wall seconds of the process, CPU seconds (user + system, the process and its children), for train the
time to the first optimizer step (the run's start-up table `startup_s` plus `first_step_s`, metrics.json), the CPU
seconds of the process before it (`startup_cpu_s`: what wall time would be on idle cores) and the median of each
start-up phase; the 1-minute load average before each run. Medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

THIS_TREE = Path(__file__).resolve().parent.parent
TRAIN = ["train", "recipe=demo", "trainer.max_steps=1"]


def run(tree: Path, argv: List[str], cwd: Path) -> Dict:
    """One fresh process: wall s, CPU s (children's rusage delta), the load before it."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qwenvl_ft", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: qwenvl-ft {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": load}


def train(tree: Path, work: Path, name: str, extra: List[str] = ()) -> Dict:
    folder = work / "runs" / name
    figures = run(tree, [*TRAIN, *extra, f"hydra.run.dir={folder}"], work)
    metrics = json.loads((folder / "metrics.json").read_text())
    figures["phases"] = metrics["startup_s"]
    figures["first_step"] = sum(metrics["startup_s"].values()) + metrics["first_step_s"]
    figures["first_step_cpu"] = sum(metrics["startup_cpu_s"].values())  # the process's own, before the step
    return figures


def median(rows: List[Dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def measure(trees: Dict[str, Path], repeats: int, work: Path) -> Dict[str, Dict[str, List[Dict]]]:
    from PIL import Image

    image = work / "a.png"
    Image.new("RGB", (56, 56), "red").save(image)
    results: Dict[str, Dict[str, List[Dict]]] = {label: {} for label in trees}
    for label, tree in trees.items():  # warm-up: caches, and the run that eval and infer use
        run(tree, [*TRAIN, "run_name=bench"], work)
        results[label]["train (cold data cache)"] = [train(tree, work, f"{label}-cold",
                                                           [f"data.cache_dir={work / ('empty-' + label)}"])]
    infer = ["infer", "recipe=demo", "run_name=bench", f"infer.images=[{image}]"]
    for index in range(repeats):
        for label, tree in trees.items():
            results[label].setdefault("train (warm data cache)", []).append(train(tree, work, f"{label}-{index}"))
            results[label].setdefault("eval", []).append(run(tree, ["eval", "recipe=demo", "run_name=bench"], work))
            results[label].setdefault("infer", []).append(run(tree, infer, work))
    return results


def report(results: Dict[str, Dict[str, List[Dict]]], repeats: int) -> str:
    lines = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}, {repeats} runs per figure (cold: 1), "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| tree | command | median wall s | to first step s | CPU s before it | median CPU s | load | budget |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for label, commands in results.items():
        for command, rows in commands.items():
            first = f"{median(rows, 'first_step'):.1f} | {median(rows, 'first_step_cpu'):.1f}" \
                if "first_step" in rows[0] else "- | -"
            budget, value = (5.0, median(rows, "first_step")) if command.startswith("train (warm") else \
                (6.0, median(rows, "wall")) if command in ("eval", "infer") else (None, None)
            verdict = "-" if budget is None else f"<= {budget:.0f} s: {'met' if value <= budget else 'missed'}"
            lines.append(f"| {label} | {command} | {median(rows, 'wall'):.1f} | {first} | {median(rows, 'cpu'):.1f} "
                         f"| {median(rows, 'load'):.1f} | {verdict} |")
    lines += ["", "Start-up phases of `train` (warm data cache), median wall s:", ""]
    phases = list(dict.fromkeys(p for commands in results.values()
                                for p in commands["train (warm data cache)"][0]["phases"]))
    lines += ["| phase | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for phase in phases + ["first optimizer step"]:
        cells = []
        for commands in results.values():
            rows = commands["train (warm data cache)"]
            values = [row["first_step"] - sum(row["phases"].values()) if phase == "first optimizer step"
                      else row["phases"].get(phase, 0.0) for row in rows]
            cells.append(f"{statistics.median(values):.2f}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another source tree to alternate with (a git worktree)")
    args = parser.parse_args()
    trees = {"this tree": THIS_TREE}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory(prefix="startup_budget_") as folder:
        work = Path(folder)
        os.environ["QWENVL_FT_CACHE"] = str(work / "cache")  # the user's cache, empty at first
        print(report(measure(trees, args.repeats, work), args.repeats))


if __name__ == "__main__":
    main()
