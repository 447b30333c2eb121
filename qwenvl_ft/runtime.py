"""What every command does around its work: record the outcome, report user errors plainly, keep a sweep going.

A job writes `summary.json` into its output folder (overrides, status, final metrics, error). In a `-m` sweep a
failing job is recorded as failed and the sweep moves on to the next job; `qwenvl_ft.sweep.SweepSummary` reads the
summaries when the sweep ends. A single run that fails on a config or data error prints one clear message and
exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict

from omegaconf import DictConfig

from qwenvl_ft.errors import UserFacingError

log = logging.getLogger("qwenvl_ft")

INTERRUPTED_EXIT_STATUS = 143  # 128 + SIGTERM


def _job_info():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary `.NAME.partial` next to it: the file is never half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_summary(output_dir: str, payload: Dict) -> None:
    from qwenvl_ft.distributed import ranks

    if not ranks.is_main_process():  # one run folder, one writer: the main process of a distributed run
        return
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(payload, indent=2, default=str))


def run_task(task: Callable[[DictConfig], Dict], cfg: DictConfig) -> Dict:
    overrides, is_sweep = _job_info()
    output_dir = cfg.output_dir
    summary = {"overrides": overrides, "output_dir": output_dir, "status": "failed", "metrics": {}}
    try:
        metrics = task(cfg) or {}  # each task validates its own config first
        if metrics.get("interrupted"):
            # Stopped by SIGTERM with a checkpoint saved: not a failure, not finished either. The exit status
            # says terminated-by-SIGTERM (128 + 15) so that schedulers and retry loops run it again; a sweep
            # stops here too instead of starting its next job.
            summary.update(status="interrupted", metrics=metrics)
            write_summary(output_dir, summary)
            print(f"qwenvl-ft: interrupted at step {metrics.get('global_step')}; checkpoint saved to "
                  f"{metrics.get('checkpoint')}. Run the same command again to resume.", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_STATUS)
        summary.update(status="completed", metrics=metrics)
        value = objective_value(cfg, metrics)
        if value is not None:
            summary["objective"] = {"name": cfg.objective, "value": value}
            return value  # what a sweeper (Optuna) optimises
        return metrics
    except UserFacingError as err:  # config and data errors: the message says everything
        from qwenvl_ft.distributed import ranks

        summary["error"] = str(err)
        # The other ranks of a distributed run stop on the same error: the main process shows it, they log it.
        main = ranks.is_main_process()
        (log.error if main else log.info)("%s", err)
        if not is_sweep:
            write_summary(output_dir, summary)
            if main:
                print(f"qwenvl-ft: {err}", file=sys.stderr)
            sys.exit(2)
    except Exception as err:
        summary["error"] = f"{type(err).__name__}: {err}"
        if not is_sweep:
            write_summary(output_dir, summary)
            raise
        log.error("job failed, the sweep goes on:\n%s", traceback.format_exc())
    finally:
        if summary["status"] == "completed" or is_sweep:
            write_summary(output_dir, summary)
    return float("nan") if cfg.get("objective") else {}  # a failed trial, for a sweeper that optimises


def objective_value(cfg: DictConfig, metrics: Dict):
    """The value of `cfg.objective` this run reports: from its metrics, else the last logged one (log_history.json,
    e.g. eval_loss); NaN when it reports none (Optuna then counts the trial as failed). None without objective."""
    name = cfg.get("objective")
    if not name:
        return None
    if isinstance(metrics.get(name), (int, float)):
        return float(metrics[name])
    history = Path(cfg.output_dir) / "log_history.json"
    if history.is_file():
        logged = [entry[name] for entry in json.loads(history.read_text()) if name in entry]
        if logged:
            return float(logged[-1])
    log.warning("objective=%s: the run reported no such metric", name)
    return float("nan")
