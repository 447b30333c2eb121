"""The folder qwenvl-ft keeps its per-user caches in (the data check's entries, data/cache.py; random tiny models,
modeling/random_init.py): $QWENVL_FT_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/qwenvl_ft. Here, below both, so that
the two agree on it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QWENVL_FT_CACHE"


def cache_home() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "qwenvl_ft"
