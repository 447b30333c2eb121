"""Can vLLM serve an adapter unmerged? Said at the start of training, by `merge`, and on the model card.

Why: a LoRA adapter that vLLM cannot load fails (or, worse, is silently cut down) at deployment, long after
training. vLLM loads LoRA factors on the language model's Linears only:
  - LoRA on the vision tower (adapter.vision_lora) is ignored with a warning ("vLLM currently only supports adding
    LoRA to language model, visual.… will be ignored": vllm-project/vllm#23796; issue 1675 of QwenLM's VL repository);
  - LoRA on fused MoE experts (PEFT's target_parameters on the 3-D expert weights) does not load
    (issue 1675 of QwenLM's VL repository; vllm-project/vllm#40005, and #41384 found it silently dropped);
  - an adapter with modules_to_save (fully trained copies, e.g. an unfrozen vision tower or merger) is refused
    ("vLLM only supports modules_to_save being None": vllm-project/vllm#9280, hiyouga/LlamaFactory#9545).
`qwenvl-ft merge` folds the adapter into the base: the merged folder is a plain transformers model, which vLLM
serves whatever the adapter trained.

What is read: the adapted module names and the adapter's config (a PEFT model at the start of training, or the
adapter folder's adapter_config.json and weight names), against the family's declaration (its vision tower path,
and `expert_parameters` where a family declares them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Tuple

from qwenvl_ft.families.base import Family

PEFT_PREFIX = "base_model.model."
VISION = ("LoRA on the vision tower, which vLLM ignores (it adapts the language model only: vllm-project/vllm#23796, "
          "QwenLM's VL repository, issue 1675)")
EXPERTS = ("LoRA on fused MoE expert weights, which vLLM does not load (QwenLM's VL repository, issue 1675; "
           "vllm-project/vllm#40005)")
SAVED_COPIES = ("fully trained module copies (modules_to_save: {names}), which vLLM refuses (vllm-project/vllm#9280)")


@dataclass(frozen=True)
class Serving:
    """Whether vLLM can serve an adapter unmerged, and why not."""

    reasons: Tuple[str, ...]

    @property
    def servable(self) -> bool:
        return not self.reasons

    def sentence(self) -> str:
        if self.servable:
            return ("vLLM can serve this adapter unmerged (`vllm serve BASE --enable-lora --lora-modules "
                    "name=ADAPTER`); `qwenvl-ft merge` makes a plain model of it too")
        return ("vLLM cannot serve this adapter unmerged: it holds " + "; and ".join(self.reasons)
                + ". `qwenvl-ft merge` folds it into the base, and vLLM serves the merged folder as a plain model")


def vllm_serving(family: Family, adapted: Iterable[str], modules_to_save: Iterable[str] = (),
                 target_parameters: Iterable[str] = ()) -> Serving:
    """`adapted`: the names of the modules (or parameters) that carry LoRA factors, from the model's root (a PEFT
    prefix is dropped); `target_parameters`: PEFT's parameter targets (fused expert weights)."""
    names = [name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name for name in adapted]
    experts = tuple(getattr(family, "expert_parameters", None) or ())  # families with fused experts declare them
    reasons = []
    if any(name == family.vision_tower or name.startswith(family.vision_tower + ".") for name in names):
        reasons.append(VISION)
    targeted = list(target_parameters) + names
    if any(_ends_with(name, expert) for name in targeted for expert in experts):
        reasons.append(EXPERTS)
    saved = sorted(set(modules_to_save))
    if saved:
        reasons.append(SAVED_COPIES.format(names=", ".join(saved)))
    return Serving(tuple(reasons))


def _ends_with(name: str, expert: str) -> bool:
    """Whether `name` is (or holds) the expert parameter `expert` ("mlp.experts.gate_up_proj")."""
    return name == expert or name.endswith("." + expert) or f".{expert}." in f".{name}."


def serving_of_model(model, family: Family) -> Serving:
    """A PEFT model's adapter, as training holds it."""
    config = next(iter(model.peft_config.values()))
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A]
    return vllm_serving(family, adapted, config.modules_to_save or (), getattr(config, "target_parameters", None) or ())


def serving_of_folder(folder: Path, family: Family) -> Serving:
    """A saved adapter folder: adapter_config.json and the names of its LoRA weights."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    weights = Path(folder) / "adapter_model.safetensors"
    adapted = []
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            adapted = [key.split(".lora_")[0] for key in handle.keys() if ".lora_" in key]
    return vllm_serving(family, adapted, config.get("modules_to_save") or (), config.get("target_parameters") or ())
