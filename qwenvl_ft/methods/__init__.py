"""Training methods as declarations: one module per method, found by scanning this package.

    from qwenvl_ft import methods
    methods.names()                  # ['sft', 'dpo', 'grpo']
    methods.get("dpo")               # its Method (qwenvl_ft/methods/base.py says what one declares)
    methods.format_owner("llava")    # the method that reads a data.format

Adding a method (KTO, ORPO, ...) is one module here that defines `METHOD = SomeMethod()` (a `methods.base.Method`)
naming its rows (qwenvl_ft/data/kinds.py) and its training (a module of qwenvl_ft/trainers/), plus its
`conf/trainer/<name>.yaml`: the config schema gains `trainer.<name>` and its data formats, and `train`,
`data-check`, `eval` and `estimate` dispatch to it. The method modules are declarations only (no torch), so the
config schema can be built from them.
"""

from qwenvl_ft.methods.base import ARGUMENT_SOURCES, GenerationBatch, Method, format_owner, get, load, names, \
    registry

__all__ = ["ARGUMENT_SOURCES", "GenerationBatch", "Method", "format_owner", "get", "load", "names", "registry"]
