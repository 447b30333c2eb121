"""What a training run records about itself, and reads back: `run_info.json` (the launch command, hardware, software
and times, written when the run finishes) and the `RunRecord` of a run folder (config.yaml, metrics.json,
log_history.json, run_info.json, data_check.json's summary) that the model card (qwenvl_ft/publish/card.py) is
built from.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.errors import ConfigError

RUN_INFO = "run_info.json"  # command, hardware, software and times of the training run, next to config.yaml
_SOFTWARE = ("qwenvl-ft", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes")


@dataclass
class RunRecord:
    """What a card says about the training run behind a folder."""

    config: TrainConfig
    config_yaml: str  # the resolved config, as saved in the run's config.yaml
    metrics: Dict = field(default_factory=dict)  # metrics.json: before/after held-out metrics, losses, runtime
    log_history: List[Dict] = field(default_factory=list)  # the Trainer's log history (loss curve)
    info: Dict = field(default_factory=dict)  # run_info.json: command, hardware, software, start and end times
    data_summary: Dict = field(default_factory=dict)  # data_check.json's summary: rows per split


def launch_command() -> Optional[str]:
    """The command line of this job as the user would type it again (one sweep job: its own overrides); None
    outside the command line (a config composed in Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # Hydra not initialised: composed in Python
        return None
    program = sys.argv[0] if sys.argv and sys.argv[0].startswith("qwenvl-ft ") else "qwenvl-ft"
    return " ".join([program] + [shlex.quote(o) for o in overrides])


def hardware() -> str:
    """GPUs (count, name, memory, CUDA version) or the CPU, and the number of processes of a distributed run."""
    import torch

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    spread = f"; {processes} processes" if processes > 1 else ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
                f"CUDA {torch.version.cuda}{spread}")
    return f"CPU: {_cpu_name()}, {os.cpu_count()} cores{spread}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in _SOFTWARE:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run_info(command: Optional[str], started_at: Optional[float]) -> Dict:
    """run_info.json of a run that just finished: what the card reports about how and where it ran."""
    finished = time.time()
    return {"command": command, "hardware": hardware(), "software": software(),
            "python": platform.python_version(), "started_at": started_at, "finished_at": finished,
            "wall_time_s": None if started_at is None else round(finished - started_at, 1)}


def load_run(run_dir: Path) -> Optional[RunRecord]:
    """The record of the training run in `run_dir` (None when it holds no config.yaml: a folder made elsewhere)."""
    config_yaml = run_dir / "config.yaml"
    if not config_yaml.is_file():
        return None
    text = config_yaml.read_text()

    def read(name: str, default):
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else default

    return RunRecord(config=typed_config(text), config_yaml=text, metrics=read("metrics.json", {}),
                     log_history=read("log_history.json", []), info=read(RUN_INFO, {}),
                     data_summary=read("data_check.json", {}).get("summary", {}))


def typed_config(config_yaml: str) -> TrainConfig:
    """A run's saved config.yaml read back into the typed schema (extra keys of a command's own group dropped)."""
    import dataclasses

    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.create(config_yaml))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    node = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in saved.items() if k in known})
    try:
        return OmegaConf.to_object(node)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"config.yaml of the run does not validate: {err}") from None


def write_run_info(run_dir: Path, info: Dict) -> None:
    partial = run_dir / f".{RUN_INFO}.partial"
    partial.write_text(json.dumps(info, indent=2))
    os.replace(partial, run_dir / RUN_INFO)
