"""What every command does around its work: record the outcome, report user errors plainly, keep a sweep going.

A job writes `summary.json` into its output folder (overrides, status, final metrics, error). In a `-m` sweep a
failing job is recorded as failed and the sweep moves on to the next job; `qwenvl_ft.commands.sweep.SweepSummary`
reads the summaries when the sweep ends. A single run that fails on a config or data error prints one clear message
and exits with status 2 instead of a traceback (a run that diverged, errors.TrainingDiverged, with status 3); so does
one whose output folder cannot be written (checked by the `CheckOutputFolder` Hydra callback before Hydra creates
it). A write that fails because the disk is full ends with
a message naming the file and the space left (status 1), and Ctrl-C outside training with a plain message
(status 130); the summary is written when it can be, and a failure to write it never hides the original error.
Folder locks taken by the task (qwenvl_ft/run_folder/lock.py) are released when it ends. The run folder's files
themselves (atomic writes, summary.json, space checks) are qwenvl_ft/run_folder/files.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.errors import UserFacingError
from qwenvl_ft.run_folder.files import ensure_writable, free_space, human_bytes, save_summary

log = logging.getLogger("qwenvl_ft")

INTERRUPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143; SIGINT (Ctrl-C) exits with 130
DISK_FULL_EXIT_STATUS = 1
LOW_SPACE_BYTES = 64 * 1024 * 1024


def _job_info():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN


# ----------------------------------------------------------------------------------------------------------------
# folders and failed writes


class CheckOutputFolder(Callback):
    """Hydra callback: the run (or sweep) folder must be writable before Hydra creates it, which it would do with
    a bare traceback and no word of which setting to change."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        from omegaconf import OmegaConf

        try:
            folder = OmegaConf.select(config, key)
        except Exception:  # an interpolation only Hydra's job can resolve: Hydra checks it itself
            return
        if folder is None:
            return
        try:
            ensure_writable(Path(str(folder)))
        except ConfigError as err:
            print(f"qwenvl-ft: config error: {err}", file=sys.stderr)
            sys.exit(2)


# Raised by writes that failed for lack of space: errno, or the text of errors that lose it (safetensors' Rust
# I/O error; torch.save's C++ stream writer, which reports only "unexpected pos" or "file write failed").
_DISK_FULL = re.compile(r"No space left on device|os error 28\b|Disk quota exceeded|os error 122\b|StorageFull")
_TORCH_WRITER = re.compile(r"PytorchStreamWriter failed|unexpected pos \d+ vs \d+|file write failed|"
                           r"iostream error")
_PATH_LOCALS = ("filename", "f", "file", "path", "partial", "save_path", "output_file", "save_directory",
                "output_dir", "name", "staging", "output_path")


def _chain(err: BaseException) -> List[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _failed_file(err: BaseException) -> Optional[str]:
    """The file a failed write was writing: OSError's filename, else the innermost path-like local variable of
    the frames it passed through (torch.save's `f`, safetensors' `filename`, our own `path`)."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.filename:
            return str(link.filename)
    frames = []
    for link in _chain(err):
        tb = link.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
    for frame in reversed(frames):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if hasattr(value, "write") and isinstance(getattr(value, "name", None), str):
                value = value.name  # an open file
            if isinstance(value, (str, os.PathLike)) and _looks_like_file(str(value)):
                return str(value)
    return None


def _looks_like_file(value: str) -> bool:
    """A path on this machine (not a member name inside an archive, such as torch.save's 'data/22')."""
    if not value or "\n" in value or len(value) > 4096:
        return False
    path = Path(value)
    return (path.is_absolute() or len(path.parts) > 1) and path.parent.is_dir()


def write_failure(err: BaseException, output_dir: str) -> Optional[str]:
    """A one-screen message for an error raised by a write that failed for lack of space (naming the file, the
    space left and what happens to an unfinished checkpoint); None for any other error."""
    chain = _chain(err)
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or \
        any(_DISK_FULL.search(str(e)) for e in chain)
    torch_writer = any(_TORCH_WRITER.search(str(e)) for e in chain)
    if not (full or torch_writer):
        return None
    target = _failed_file(err) or output_dir
    free = free_space(Path(target))
    # torch.save's writer loses the errno: an almost empty file system says what happened
    full = full or (free is not None and free < LOW_SPACE_BYTES)
    space = f"{human_bytes(free)} free on that file system" if free is not None else "free space unknown"
    reason = "No space left on device" if full else f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    lines = [f"{'disk full: ' if full else ''}writing {target} failed ({reason}); {space}."]
    lines += _checkpoint_notes(Path(output_dir))
    lines.append("Free some space (or move the run with hydra.run.dir=DIR) and run the same command again.")
    return "\n".join(lines)


def _checkpoint_notes(output_dir: Path) -> List[str]:
    if not output_dir.is_dir() or not any(output_dir.glob("checkpoint-*")):
        return []
    from qwenvl_ft.training.resume import checkpoints, is_complete

    found = checkpoints(output_dir)
    notes = [f"{path.name} is incomplete (no completion marker): resuming ignores it and removes it."
             for _, path in found if not is_complete(path)]
    complete = [path for _, path in found if is_complete(path)]
    if complete:
        notes.append(f"The newest complete checkpoint is {complete[-1]}; the run resumes from it.")
    return notes


# The command line as typed (commands/cli.py's main sets it): the resume hint repeats it.
COMMAND_LINE: List[str] = []


def resume_command(cfg: DictConfig, overrides: List[str]) -> str:
    """The command that resumes this run: the same arguments, with run_name pinned (a timestamped default would
    start a new folder)."""
    if COMMAND_LINE:
        command, arguments = COMMAND_LINE[0], list(COMMAND_LINE[1:])
    else:
        command, arguments = "qwenvl-ft train", list(overrides)
    if not any(a.split("=", 1)[0].lstrip("+~") == "run_name" for a in arguments):
        arguments.append(f"run_name={cfg.get('run_name')}")
    return " ".join([command] + [shlex.quote(a) for a in arguments])


# ----------------------------------------------------------------------------------------------------------------
# one job


def run_task(task: Callable[[DictConfig], Dict], cfg: DictConfig) -> Dict:
    from qwenvl_ft.run_folder.lock import release_all
    from qwenvl_ft.training.optional_packages import hidden, unused_packages

    overrides, is_sweep = _job_info()
    output_dir = cfg.output_dir
    summary = {"overrides": overrides, "output_dir": output_dir, "status": "failed", "metrics": {}}
    try:
        with hidden(unused_packages(cfg, is_sweep)):  # installed trackers and DeepSpeed, unless this job uses them
            metrics = task(cfg) or {}  # each task validates its own config first
        if metrics.get("interrupted"):
            _stop_interrupted(cfg, overrides, summary, metrics)
        summary.update(status="completed", metrics=metrics)
        value = objective_value(cfg, metrics)
        if value is not None:
            summary["objective"] = {"name": cfg.objective, "value": value}
            return value  # what a sweeper (Optuna) optimises
        return metrics
    except UserFacingError as err:  # config and data errors: the message says everything
        _report_user_error(err, summary, is_sweep)
    except KeyboardInterrupt:
        _stop_outside_training(cfg, overrides, summary)
    except Exception as err:
        if not _report_failure(err, summary, is_sweep):
            raise
    finally:
        release_all()
        if summary["status"] == "completed" or is_sweep:
            save_summary(output_dir, summary)
    return float("nan") if cfg.get("objective") else {}  # a failed trial, for a sweeper that optimises


def _stop_interrupted(cfg: DictConfig, overrides: List[str], summary: Dict, metrics: Dict) -> None:
    """Stopped by SIGTERM or Ctrl-C with a checkpoint saved: not a failure, not finished either. The exit status
    says terminated-by-that-signal (128 + 15, 128 + 2) so that schedulers and retry loops run it again; a sweep
    stops here too instead of starting its next job."""
    summary.update(status="interrupted", metrics=metrics)
    note = save_summary(summary["output_dir"], summary)
    number = int(metrics.get("signal_number") or signal.SIGTERM)
    print(f"qwenvl-ft: interrupted ({signal.Signals(number).name}) at step {metrics.get('global_step')}; "
          f"checkpoint saved to {metrics.get('checkpoint')}. To resume, run the same command again:\n"
          f"  {resume_command(cfg, overrides)}{note}", file=sys.stderr)
    sys.exit(128 + number)


def _report_user_error(err: UserFacingError, summary: Dict, is_sweep: bool) -> None:
    """A config or data error: recorded; a single run shows the message and exits with status 2, a sweep goes on."""
    from qwenvl_ft.distributed import ranks

    summary["error"] = str(err)
    # The other ranks of a distributed run stop on the same error: the main process shows it, they log it.
    main = ranks.is_main_process()
    (log.error if main else log.info)("%s", err)
    if not is_sweep:
        note = save_summary(summary["output_dir"], summary)
        if main:
            print(f"qwenvl-ft: {err}{note}", file=sys.stderr)
        sys.exit(getattr(err, "exit_status", 2))


def _stop_outside_training(cfg: DictConfig, overrides: List[str], summary: Dict) -> None:
    """Ctrl-C outside the training loop (data check, model loading, generation): there is nothing to save.
    Inside it, StopOnSignal turns Ctrl-C into a checkpoint and `metrics["interrupted"]` (_stop_interrupted)."""
    summary.update(status="interrupted", error="interrupted (Ctrl-C) outside the training loop")
    note = save_summary(summary["output_dir"], summary)
    print(f"\nqwenvl-ft: interrupted (Ctrl-C) outside the training loop; nothing is half-written. The same "
          f"command starts again (resuming from the newest complete checkpoint, if there is one):\n"
          f"  {resume_command(cfg, overrides)}{note}", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def _report_failure(err: Exception, summary: Dict, is_sweep: bool) -> bool:
    """Any other error: recorded. A single run stopped by a full disk shows one message and exits with
    DISK_FULL_EXIT_STATUS; a sweep logs it and goes on (True). False: a bug, for the caller to raise with its
    traceback (after the summary is written)."""
    message = write_failure(err, summary["output_dir"])
    summary["error"] = message or f"{type(err).__name__}: {err}"
    if not is_sweep:
        note = save_summary(summary["output_dir"], summary)
        if message is None:
            return False
        log.error("%s", message)
        print(f"qwenvl-ft: {message}{note}", file=sys.stderr)
        sys.exit(DISK_FULL_EXIT_STATUS)
    log.error("job failed, the sweep goes on:\n%s", message or traceback.format_exc())
    return True


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
