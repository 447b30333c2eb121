"""`eval`, `infer`, `merge` and `chat` of a named run use the config that run trained with.

`qwenvl-ft eval recipe=R run_name=X` composes the same groups as `train`, but the run in outputs/R/X may have been
trained with overrides (`data.path=my.json`, another `model=` option, ...) that this command line does not repeat. Its
`config.yaml` (the resolved config `train` saved) is therefore the starting point: the model, data, adapter,
optimizer and trainer groups and the seed come from it, and only what this command line overrides changes. A data
override that differs from what the run trained on is shown, since it evaluates on other rows than the run's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from qwenvl_ft.config.run_files import read_yaml

log = logging.getLogger("qwenvl_ft")

RUN_CONFIG = "config.yaml"
TRAINED_KEYS = ("model", "data", "adapter", "optimizer", "trainer", "seed")  # what the run's config decides


def job_overrides() -> List[str]:
    """The command line's overrides of the running Hydra job ([] outside of one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def with_saved_run(cfg: DictConfig, overrides: Optional[Sequence[str]] = None,
                   run_dir: Optional[Path] = None) -> DictConfig:
    """`cfg` with the trained groups replaced by the run's saved ones, the command line's overrides applied on top.
    `run_dir` defaults to the folder above the command's output folder (outputs/<recipe>/<run_name>); without a
    saved config there, `cfg` is returned as composed."""
    overrides = job_overrides() if overrides is None else list(overrides)
    run_dir = Path(cfg.output_dir).parent if run_dir is None else Path(run_dir)
    saved_path = run_dir / RUN_CONFIG
    if not saved_path.is_file():
        return cfg
    saved = read_yaml(saved_path, f"It is the config the run trained with, which this command starts from: restore "
                                  f"it ({run_dir / 'final' / 'README.md'} holds a copy under 'Full config' once the "
                                  f"run finished), or move it away to use this command line's config alone")
    keys = [_key(o) for o in overrides]
    swapped = {k for k in keys if k in TRAINED_KEYS}  # `data=llava`: the whole group as composed now
    result = OmegaConf.merge(cfg, {k: saved[k] for k in TRAINED_KEYS if k in saved and k not in swapped})
    for key in keys:
        if key.split(".")[0] in TRAINED_KEYS and key not in swapped:
            OmegaConf.update(result, key, OmegaConf.select(cfg, key), merge=False)
    log.info("using the run's config %s%s", saved_path,
             f" with {', '.join(overrides)}" if overrides else "")
    _show_data_changes(saved, result, keys, saved_path)
    return result


def _key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def _show_data_changes(saved: DictConfig, result: DictConfig, keys: List[str], saved_path: Path) -> None:
    """Warn about each data key this command line changed from what the run trained on."""
    if not any(k == "data" or k.startswith("data.") for k in keys):
        return
    before = _flat(OmegaConf.to_container(saved.get("data", {}), resolve=True))
    after = _flat(OmegaConf.to_container(result.data, resolve=True))
    changed = [(name, before.get(name), value) for name, value in after.items() if before.get(name) != value]
    if changed:
        lines = "\n".join(f"  data.{name}: {new!r} (the run trained on {old!r})" for name, old, new in changed)
        log.warning("the data differs from the run's (%s):\n%s", saved_path, lines)


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for name, value in (node or {}).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out
