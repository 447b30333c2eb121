"""Hydra callback that prints and saves a table of every job of a `-m` sweep when it ends, whatever ran the jobs
(Hydra's basic launcher, submitit's local processes or SLURM jobs: each job leaves a summary.json in its folder)
and whatever chose them (the basic sweeper's grid, Optuna's trials: the best one by the objective is marked)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("qwenvl_ft")

# Output folders of the failed jobs of the last sweep in this process; the CLI exits non-zero when any failed.
FAILED_JOBS: List[str] = []


def collect(sweep_dir: Path) -> List[dict]:
    rows = []
    for path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        rows.append(json.loads(path.read_text()))
    return rows


def best_job(rows: List[dict], direction: Optional[str] = None) -> Optional[dict]:
    """The completed job with the best objective (summary.json `objective`, set with `objective=...`, e.g. by
    sweep=optuna): lowest or highest by `direction`, else lowest for a loss and highest for anything else."""
    scored = [row for row in rows if row["status"] == "completed" and row.get("objective")
              and not math.isnan(row["objective"]["value"])]
    if not scored:
        return None
    name = scored[0]["objective"]["name"]
    maximize = direction == "maximize" if direction else "loss" not in name
    return (max if maximize else min)(scored, key=lambda row: row["objective"]["value"])


def format_table(rows: List[dict], direction: Optional[str] = None) -> str:
    metric_names = sorted({k for row in rows for k in row.get("metrics", {})})
    objective = next((row["objective"]["name"] for row in rows if row.get("objective")), None)
    best = best_job(rows, direction)
    header = ["job", "status", "overrides"] + ([f"objective ({objective})"] if objective else []) + metric_names
    lines = [header]
    for row in rows:
        metrics = row.get("metrics", {})
        cells = [Path(row["output_dir"]).name + (" (best)" if row is best else ""), row["status"],
                 " ".join(row["overrides"])]
        if objective:
            cells.append(f"{row['objective']['value']:.4g}" if row.get("objective") else "")
        cells += [f"{metrics[m]:.4g}" if isinstance(metrics.get(m), (int, float)) else str(metrics.get(m, ""))
                  for m in metric_names]
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        FAILED_JOBS.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        FAILED_JOBS.extend(row["output_dir"] for row in rows if row["status"] != "completed")
        direction = config.hydra.sweeper.get("direction")  # Optuna's; the basic sweeper has none
        table = format_table(rows, direction if isinstance(direction, str) else None)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=2, default=str))
        (sweep_dir / "sweep_summary.txt").write_text(table + "\n")
        log.info("sweep summary (%s):\n%s", sweep_dir / "sweep_summary.txt", table)
