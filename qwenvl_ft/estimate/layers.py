"""The decoder layers' saved bytes per token, layer by layer: a language model whose layers differ in kind (hybrid
Gated DeltaNet and gated attention, `layer_types`) has a formula per kind (`Family.layer_kind_bytes`), and each kind
has its own LoRA'd Linears (q/k/v/o_proj in the attention layers, in_proj_*/out_proj in the DeltaNet ones, the MLP in
both), read off the model the estimate builds on the meta device."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List

from qwenvl_ft import families
from qwenvl_ft.families.base import LINEAR_ATTENTION, attribute, layer_kinds


@dataclass(frozen=True)
class LayerBytes:
    """Saved bytes per token of each decoder layer, and how to say it."""

    per_layer: List[float]
    kinds: List[str]

    def describe(self) -> str:
        counts = Counter(self.kinds)
        parts = []
        for kind, n in counts.items():
            one = self.per_layer[self.kinds.index(kind)]
            name = "Gated DeltaNet" if kind == LINEAR_ATTENTION else "attention"
            parts.append(f"{n} {name} x {one:,.0f} B/token")
        return " + ".join(parts)


def lora_inputs_by_kind(model, family: families.Family, lora_modules: Dict[str, int]) -> Dict[str, List[int]]:
    """in_features of the LoRA'd Linears of one decoder layer of each kind (the first layer of the kind)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = attribute(base, family.decoder_layers)
    text = model.config.get_text_config()
    found: Dict[str, List[int]] = {}
    for layer, kind in zip(layers, layer_kinds(text)):
        if kind in found:
            continue
        found[kind] = [module.in_features for name, module in layer.named_modules()
                       if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in lora_modules]
    return found


def hybrid_layer_bytes(model, family: families.Family, text, lora_modules: Dict[str, int], a: int,
                       trainable: bool, r: int, mask_bytes: int, linear: int, extra: float = 0) -> LayerBytes:
    """Saved bytes per token of every decoder layer of a family whose layers differ in kind; `extra` bytes per
    token are added to every layer (a mixture-of-experts layer's routed experts, estimate/experts.py)."""
    kinds = layer_kinds(text)
    lora = lora_inputs_by_kind(model, family, lora_modules) if lora_modules else {}
    by_kind = {kind: extra + family.layer_kind_bytes(text, kind, a, trainable, lora.get(kind, []), r, mask_bytes,
                                                     mlp_bytes=linear) for kind in set(kinds)}
    return LayerBytes([by_kind[kind] for kind in kinds], kinds)


def recurrent_state_rows(text, completions: int) -> List[tuple]:
    """What generation keeps per sequence in each Gated DeltaNet layer instead of a KV cache: the delta rule's
    state (value heads x key width x value width, fp32 on transformers' torch path) and the conv's last
    kernel-size inputs (in the activation dtype; counted at 2 bytes)."""
    layers = layer_kinds(text).count(LINEAR_ATTENTION)
    if not layers:
        return []
    heads, key, value = text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim
    conv = 2 * text.linear_num_key_heads * key + heads * value
    per_sequence = layers * (4 * heads * key * value + 2 * conv * text.linear_conv_kernel_dim)
    return [("generation: recurrent state", per_sequence * completions,
             f"{completions} completions x {layers} Gated DeltaNet layers' state and conv inputs "
             f"({per_sequence / 2 ** 20:.1f} MiB per completion)")]
