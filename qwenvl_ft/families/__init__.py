"""Model families as declarations: one module per family, found by scanning this package.

    from qwenvl_ft import families
    families.names()                 # ['qwen2_5_vl', 'qwen2_vl', 'qwen3_5', 'qwen3_5_moe', 'qwen3_vl', ...]
    families.get("qwen3_vl")         # its Family (qwenvl_ft/families/base.py says what one holds)
    families.of_model(model)         # by model.config.model_type (PEFT-wrapped models too)
    families.of_processor(processor) # by the processor's class

Adding a family: a module here that defines `FAMILY = Family(...)`, and a `conf/model/<option>.yaml` with
`family: <its name>`. Modules whose name starts with an underscore, and `base`, are not families.
This package imports neither torch, transformers nor `qwenvl_ft.config` (which imports it for the choices of
`model.family`).
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from typing import Any, Dict, List

from qwenvl_ft.families.base import IMAGE, TEXT, VIDEO, Family, ModelParts, VisionSizes

__all__ = ["DEFAULT", "Family", "IMAGE", "ModelParts", "PROCESSOR_FAMILY", "TEXT", "VIDEO", "VisionSizes",
           "all_families", "get", "names", "of_config", "of_model", "of_processor"]

DEFAULT = "qwen2_vl"  # model.family when a config does not say

_registry: Dict[str, Family] = {}


def _discover() -> Dict[str, Family]:
    if not _registry:
        for module_info in pkgutil.iter_modules(__path__):
            if module_info.name.startswith("_") or module_info.name == "base":
                continue
            family = getattr(import_module(f"{__name__}.{module_info.name}"), "FAMILY", None)
            if not isinstance(family, Family):
                raise TypeError(f"qwenvl_ft.families.{module_info.name} must define FAMILY = Family(...)")
            if family.name in _registry:
                raise ValueError(f"two family modules declare {family.name!r}")
            _registry[family.name] = family
    return _registry


def names() -> List[str]:
    return sorted(_discover())


def all_families() -> List[Family]:
    return [_discover()[name] for name in names()]


def get(name: str) -> Family:
    try:
        return _discover()[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(names())}") from None


def of_config(config: Any) -> Family:
    """The family of a transformers model config (its model_type)."""
    return get(getattr(config, "model_type", None))


def of_model(model: Any) -> Family:
    """The family of a model, PEFT-wrapped or not (PeftModel hands `.config` through)."""
    return of_config(model.config)


# the attribute modeling/build.py's build_processor sets on every processor it builds: the family it serves
PROCESSOR_FAMILY = "qwenvl_ft_family"


def of_processor(processor: Any) -> Family:
    """The family a processor serves: the one it was built for (PROCESSOR_FAMILY), else the family whose processor
    class `processor` is (or derives from) and, among families sharing a processor class, whose tokenizer class
    its tokenizer is."""
    declared = getattr(processor, PROCESSOR_FAMILY, None)
    if declared is not None:
        return get(declared)
    tokenizer_classes = [cls.__name__ for cls in type(getattr(processor, "tokenizer", None)).__mro__]
    for cls in type(processor).__mro__:
        candidates = [family for family in _discover().values() if family.processor_class == cls.__name__]
        if candidates:
            by_tokenizer = [f for f in candidates if f.tokenizer_class in tokenizer_classes]
            return (by_tokenizer or candidates)[0]
    raise ValueError(f"no model family uses the processor {type(processor).__name__}; known families: "
                     f"{', '.join(names())}")
