"""Hydra callback that prints and saves a table of every job of a `-m` sweep when it ends."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List

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


def format_table(rows: List[dict]) -> str:
    metric_names = sorted({k for row in rows for k in row.get("metrics", {})})
    header = ["job", "status", "overrides"] + metric_names
    lines = [header]
    for row in rows:
        metrics = row.get("metrics", {})
        cells = [Path(row["output_dir"]).name, row["status"], " ".join(row["overrides"])]
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
        table = format_table(rows)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=2, default=str))
        (sweep_dir / "sweep_summary.txt").write_text(table + "\n")
        log.info("sweep summary (%s):\n%s", sweep_dir / "sweep_summary.txt", table)
