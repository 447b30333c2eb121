"""PEFT without bitsandbytes until a run quantises.

`import peft` imports bitsandbytes whenever it is installed (peft/helpers.py does `import bitsandbytes` at module
level, and LoRA's layer dispatch imports its 4-bit/8-bit layers once `peft.import_utils.is_bnb_available()` says
yes). bitsandbytes 0.50 pulls in torch._dynamo and torch._inductor on import: about 3.4 s on 2 CPU cores that a
LoRA, DoRA or full run, `eval`, `infer`, `merge` and `chat` of those never use.

There is no PEFT setting for this, so PEFT is imported with bitsandbytes hidden (`sys.modules["bitsandbytes"] =
None`, which both `import` and `importlib.util.find_spec` honour), and PEFT's two cached availability checks are
asked while it is hidden, so they remember "not installed". PEFT is imported from many places (transformers'
`trainer_utils`, behind `from transformers import set_seed`, imports it too), so `defer_bitsandbytes` puts a
finder on `sys.meta_path` that does this for whichever import of PEFT comes first; the CLI installs it when it
starts. Nothing else is touched: bitsandbytes is visible again as soon as PEFT is imported (transformers'
quantiser and 8-bit optimizers still find it), and `expose_bitsandbytes_to_peft` (called by
`modeling.build.quantization_config`, the one place a run asks for 4-bit weights) clears those two caches and
gives `peft.helpers` its module, after which PEFT behaves as if it had never been hidden.
tests/test_peft_import.py checks both halves in fresh interpreters.
"""

from __future__ import annotations

import importlib.abc
import sys
from contextlib import contextmanager
from typing import Iterator

_BNB = "bitsandbytes"


class _PeftWithoutBitsandbytes(importlib.abc.MetaPathFinder):
    """Finds PEFT the ordinary way (the finders after this one) for the first `import peft` of the process, and has
    its loader run the import with bitsandbytes hidden."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        # also asked by availability checks (importlib.util.find_spec), which load nothing: so the finder goes
        # away when PEFT is actually imported, not here
        spec = next((found for found in (finder.find_spec(name, path, target) for finder in sys.meta_path
                                         if finder is not self and hasattr(finder, "find_spec"))
                     if found is not None), None)
        if spec is not None and spec.loader is not None and sys.modules.get(_BNB) is None:
            run_import = spec.loader.exec_module

            def exec_module(module):
                del spec.loader.exec_module  # the loader is this spec's own; it is left as it was
                if self in sys.meta_path:
                    sys.meta_path.remove(self)  # once
                with _bitsandbytes_hidden():
                    run_import(module)
                    _ask_peft_while_hidden()

            spec.loader.exec_module = exec_module
        return spec


def defer_bitsandbytes() -> None:
    """From now on, the first import of PEFT in this process leaves bitsandbytes out (idempotent; does nothing
    when PEFT is already imported)."""
    if "peft" not in sys.modules and not any(isinstance(f, _PeftWithoutBitsandbytes) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftWithoutBitsandbytes())


@contextmanager
def _bitsandbytes_hidden() -> Iterator[None]:
    already_hidden = _BNB in sys.modules
    sys.modules[_BNB] = None  # type: ignore[assignment]  # import and find_spec both answer "not installed"
    try:
        yield
    finally:
        if not already_hidden:
            del sys.modules[_BNB]


def _ask_peft_while_hidden() -> None:
    from peft import import_utils

    import_utils.is_bnb_available()  # cached (functools.lru_cache): "not installed" until exposed
    import_utils.is_bnb_4bit_available()


def import_peft_without_bitsandbytes() -> None:
    """Import PEFT now, with bitsandbytes hidden from it. A no-op when PEFT or bitsandbytes is already imported:
    then there is nothing left to save."""
    if "peft" in sys.modules or sys.modules.get(_BNB) is not None:
        return
    with _bitsandbytes_hidden():
        _ask_peft_while_hidden()


def expose_bitsandbytes_to_peft() -> None:
    """Import bitsandbytes and let PEFT see it (its 4-bit LoRA layers, `prepare_model_for_kbit_training`)."""
    import bitsandbytes

    peft = sys.modules.get("peft")
    if peft is None:
        return  # PEFT imported from now on finds bitsandbytes by itself
    from peft import helpers, import_utils

    import_utils.is_bnb_available.cache_clear()
    import_utils.is_bnb_4bit_available.cache_clear()
    if getattr(helpers, "bnb", None) is None:
        helpers.bnb = bitsandbytes  # its module-level `import bitsandbytes` failed while hidden
