"""Training methods: one module per method, found by scanning this package.

Adding a method (KTO, ORPO, ...) is one module here that defines `METHOD = SomeMethod()` (a `methods.base.Method`)
plus its `conf/trainer/<name>.yaml`: the config schema gains `trainer.<name>` and its data formats, and `train`,
`data-check`, `eval` and `estimate` dispatch to it. Importing this package imports the method modules, whose top
level is declarations only (no torch), so the config schema can be built from them.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Dict, List

from qwenvl_ft.methods.base import Method, TrainerParts  # noqa: F401 (the interface, re-exported)

_NOT_METHODS = {"base"}


@lru_cache(maxsize=None)
def registry() -> Dict[str, Method]:
    """Method name -> method, SFT first (the default), the others by name."""
    found: Dict[str, Method] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_METHODS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, Method):
            raise TypeError(f"{module.__name__} must define METHOD, an instance of qwenvl_ft.methods.base.Method")
        if method.name in found:
            raise TypeError(f"two training methods are named {method.name!r}")
        found[method.name] = method
    return dict(sorted(found.items(), key=lambda item: (item[0] != "sft", item[0])))


def names() -> List[str]:
    return list(registry())


def get(name) -> Method:
    """The method called `name` (a str or a TrainerKind member)."""
    key = getattr(name, "value", name)
    try:
        return registry()[key]
    except KeyError:
        raise KeyError(f"unknown training method {key!r}; registered: {', '.join(registry())}") from None


def format_owner(data_format) -> Method:
    """The method that reads `data_format` (a str or a DataFormat member)."""
    key = getattr(data_format, "value", data_format)
    for method in registry().values():
        if key in method.data_formats:
            return method
    raise KeyError(f"no training method reads data.format={key}")
