"""The start-up budget: where the time goes between the process starting and the first training step.

The run marks the end of each phase (`mark("data check")`: the time since the previous mark went to the data
check); the budget is printed when training begins and saved in metrics.json / summary.json (`startup_s`), with
the first step's own time added once it has run. Phases that repeat (a phase name marked twice) add up.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

log = logging.getLogger("qwenvl_ft")

_IMPORTED = time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc, so the interpreter's own start-up counts), else
    since this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


class StartupBudget:
    """Wall-clock and CPU seconds per phase. CPU time (this process's, all its threads) tells a phase that
    computes from one that waits, and stays meaningful on a shared machine where wall time is inflated."""

    def __init__(self, since_process_start: bool):
        self.phases: Dict[str, List[float]] = {}  # name -> [wall s, CPU s]
        self._last = (time.perf_counter(), time.process_time())
        if since_process_start:  # the first run of this process: the interpreter, CLI and config compose
            self.phases["interpreter, CLI and config"] = [max(0.0, process_age()), time.process_time()]
        self.first_step_s: Optional[float] = None

    def mark(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        spent = self.phases.setdefault(name, [0.0, 0.0])
        spent[0] += now[0] - self._last[0]
        spent[1] += now[1] - self._last[1]
        self._last = now

    def first_step_done(self) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self._last[0]

    @property
    def total(self) -> float:
        return sum(wall for wall, _ in self.phases.values())

    def report(self) -> str:
        width = max(len(name) for name in self.phases)
        lines = [f"start-up: {self.total:.1f} s before training begins ({sum(c for _, c in self.phases.values()):.1f}"
                 f" s of CPU in this process)",
                 f"  {'phase':<{width}}  {'wall s':>7}  {'share':>5}  {'CPU s':>6}"]
        lines += [f"  {name:<{width}}  {wall:7.1f}  {wall / self.total:5.0%}  {cpu:6.1f}"
                  for name, (wall, cpu) in self.phases.items()]
        return "\n".join(lines)

    def metrics(self) -> Dict[str, object]:
        out: Dict[str, object] = {"startup_s": {name: round(wall, 3) for name, (wall, _) in self.phases.items()},
                                  "startup_cpu_s": {name: round(cpu, 3) for name, (_, cpu) in self.phases.items()}}
        if self.first_step_s is not None:
            out["first_step_s"] = round(self.first_step_s, 3)
        return out


_current: Optional[StartupBudget] = None
_runs = 0


def begin_run() -> StartupBudget:
    """A fresh budget for a run; the first run of a process also counts the time before it (a sweep's later
    jobs run in the same process and start here)."""
    global _current, _runs
    _current = StartupBudget(since_process_start=_runs == 0)
    _runs += 1
    return _current


def current() -> Optional[StartupBudget]:
    return _current


def mark(name: str) -> None:
    """End of a start-up phase of the current run (nothing without one, e.g. when a bench builds a trainer)."""
    if _current is not None:
        _current.mark(name)


@contextmanager
def heavy_imports():
    """Python's cyclic garbage collector paused while a command first imports torch, transformers, TRL and PEFT,
    and what they built frozen after (`gc.freeze`: later collections skip it). Those imports create millions of
    long-lived objects, so the collector's full passes over the growing heap found nothing to free and cost about
    1.1 s of the demo's 4.5 CPU s of imports (docs/performance.md, "Start-up budget"); the modules live as long as
    the process anyway. Only in a process that has not imported torch yet: there, nothing a run built can be
    frozen with them (a sweep's later job or a test process's later run leaves the collector alone)."""
    if "torch" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def import_model_libraries() -> None:
    """torch and transformers' modeling code, which every command that loads a model imports, under
    `heavy_imports` (`eval`, `infer`: what they import later, PEFT or a family's model class, is then cheap to
    collect around, the frozen modules being skipped)."""
    with heavy_imports():
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
