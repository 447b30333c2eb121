"""Installed packages a run does not use stay unimported: hidden from the libraries' availability checks while it
runs.

transformers, accelerate and TRL import an installed tracker or engine as soon as they ask whether it is
installed, whether or not the run uses it: TRL's trainer modules `import wandb` at module level when
`transformers.integrations.is_wandb_available()` (which imports it to answer) says yes, about 1 s on 2 cores;
accelerate's `extract_model_from_parallel`, which the Trainer calls when it is built and on every unwrap, imports
DeepSpeed (and through it MLflow) whenever it is installed, about 2.5 s. None of them has a setting to skip these
checks, so for the length of each command's job (commands/runtime.py `run_task`: train, and eval, infer, merge
and chat, whose `save_pretrained` unwraps the model the same way) the packages it does not use are hidden
(`sys.modules[name] = None`: `import` fails as for a missing package and `importlib.util.find_spec` answers
None), and put back as they were afterwards.
A run that reports to W&B or runs DeepSpeed hides nothing of those (only train configs have `trainer.report_to`
and `dist`), and a sweep's jobs (several in one process) hide no tracker: TRL binds them at its first import. tests/test_optional_packages.py checks a demo run imports none of them; tests/test_trackers.py and
the DeepSpeed runs check the runs that do use them.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, List

from omegaconf import DictConfig, OmegaConf

# the trackers transformers probes by importing them (each is a trainer.report_to choice)
TRACKER_PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow"}


def unused_packages(composed: DictConfig, sweep: bool = False) -> List[str]:
    """The optional packages a composed (not yet validated) config of any command does not use. In a sweep
    (`-m`, several jobs in one process) the trackers stay visible: TRL binds them once, when its trainer modules
    are first imported (`import wandb` at module level), so a tracker hidden from the first job would be missing
    for a later job that reports to it (NameError at the end of its training)."""
    report_to = OmegaConf.select(composed, "trainer.report_to", default=None) or []
    report_to = [_name(report_to)] if isinstance(report_to, str) else [_name(tracker) for tracker in report_to]
    unused = [package for tracker, package in TRACKER_PACKAGES.items() if tracker not in report_to and not sweep]
    if _name(OmegaConf.select(composed, "dist.engine", default="none")) != "deepspeed":
        unused.append("deepspeed")
    return unused


def _name(value) -> str:
    """A choice as the config spells it: structured configs hold enum members (str() of one is 'Tracker.wandb')."""
    return str(getattr(value, "value", value))


@contextmanager
def hidden(packages: List[str]) -> Iterator[List[str]]:
    """Hide these packages while the block runs, except those already imported (nothing left to save); yields
    the ones hidden."""
    hide = [name for name in packages if name not in sys.modules]
    for name in hide:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield hide
    finally:
        for name in hide:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
