"""Whether the model a config names can be loaded, told before anything loads, with what to do if not.

transformers reports a missing local folder, an unknown hub id and an uncached hub id while offline as an `OSError`
from deep inside `cached_file`, with a traceback; here each case becomes a ConfigError that names the setting,
the path or hub id, where it was looked for and how to get it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from qwenvl_ft.errors import ConfigError

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """True when the Hugging Face clients will not use the network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_available(name_or_path: str, setting: str = "model.name_or_path") -> None:
    """Raise ConfigError when `name_or_path` is neither a model folder nor a hub id that can be fetched."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            inside = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise ConfigError(f"{setting}={name_or_path}: the folder {path.resolve()} holds no config.json, so it is "
                              f"not a saved transformers model (it holds: {inside})")
        return
    if path.exists():
        raise ConfigError(f"{setting}={name_or_path}: {path.resolve()} is a file; give the model's folder")
    if not is_repo_id(name_or_path):
        raise ConfigError(f"{setting}={name_or_path}: no such folder ({path.resolve()})")
    if offline() and not is_cached(name_or_path):
        raise ConfigError(
            f"{setting}={name_or_path}: not a local folder ({path.resolve()} does not exist) and not in the Hugging "
            f"Face cache ({hub_cache()}), and the hub is off (HF_HUB_OFFLINE=1). Download it on a machine with "
            f"network first (`hf download {name_or_path}`, into this cache or one that HF_HUB_CACHE points at), or "
            f"set {setting} to a local folder")


def model_load_error(source: str, err: BaseException, setting: str = "model.name_or_path") -> ConfigError:
    """A ConfigError for an OSError raised while loading `source` (network, an unknown id, a gated model)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    if offline():
        hint = f"the hub is off (HF_HUB_OFFLINE=1) and the Hugging Face cache ({hub_cache()}) lacks it"
    elif Path(source).expanduser().exists():
        hint = "the folder is incomplete or not a transformers model"
    else:
        hint = ("check the id, the network, and for a gated model `hf auth login`; `hf download "
                f"{source}` fetches it ahead of time")
    return ConfigError(f"{setting}={source}: cannot be loaded ({first}); {hint}")


def loading(source: str, setting: str = "model.name_or_path"):
    """Context manager turning an OSError while loading `source` into `model_load_error`."""
    from contextlib import contextmanager

    @contextmanager
    def guard():
        try:
            yield
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk is the runtime's to report
                raise
            raise model_load_error(source, err, setting) from None

    return guard()
