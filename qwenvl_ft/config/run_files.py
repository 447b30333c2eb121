"""The files of a run folder, read or checked before use: a damaged one (truncated by a full disk or a kill, edited
by hand) is one ConfigError naming the file, what is wrong with it and what to do, not a parser's traceback.

What reads them: resuming (training/resume.py: trainer_state.json, the checkpoint's weights and optimizer files,
config.yaml), `eval`/`infer`/`merge`/`chat` (config/saved_run.py: config.yaml; modeling/load.py and merge:
adapter_config.json and the adapter's weights). Each check reads headers only (a safetensors header, a zip's
central directory): checking a checkpoint costs milliseconds, whatever its size.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

from qwenvl_ft.errors import ConfigError


def read_json(path: Path, remedy: str) -> Any:
    """The JSON file at `path`; ConfigError naming it, the line and column, and `remedy` when it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is damaged (not valid JSON at line {err.lineno}, column {err.colno}: "
                          f"{err.msg}). {remedy}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {err}). {remedy}") from None


def read_yaml(path: Path, remedy: str):
    """The YAML mapping at `path` (OmegaConf); ConfigError naming it, the line and column, and `remedy`."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = ": ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{path} is damaged (not valid YAML{where}: {reason}). {remedy}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {err}). {remedy}") from None
    if not isinstance(node, DictConfig) or len(node) == 0:
        raise ConfigError(f"{path} is damaged (it holds no config mapping). {remedy}")
    return node


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a .safetensors file, from its header alone (None: whole): the header must parse and the
    file must hold every byte its tensors' offsets reach (a truncated file does not)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes, no header)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{path.name} is truncated ({size} bytes; its header alone is {length + 8})"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} has an unreadable header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def torch_file_problem(path: Path) -> Optional[str]:
    """What is wrong with a torch.save file (optimizer.pt, scheduler.pt, rng_state.pth, ...): it is a zip archive,
    whose directory sits at its end, so a truncated file has none (None: whole, or not a zip-format file)."""
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return None  # the legacy pickle format: nothing cheap to check
    try:
        with zipfile.ZipFile(path):
            return None
    except zipfile.BadZipFile:
        return f"{path.name} is truncated or damaged (no zip directory at its end)"


def checkpoint_problem(folder: Path) -> Optional[str]:
    """What makes a checkpoint folder marked complete unloadable (None: nothing found): trainer_state.json must
    parse with a global_step, every weights file be whole, every torch.save file have its directory, every JSON
    config parse."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"trainer_state.json is unreadable ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json holds no global_step"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        problem = None
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = torch_file_problem(path)
        elif path.suffix == ".json" and path.name.endswith("config.json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                problem = f"{path.name} is not valid JSON ({err})"
        if problem:
            return problem if path.parent == folder else f"{path.relative_to(folder).parent}/{problem}"
    return None
