"""The estimate's mixture-of-experts terms: parameters (total and active per token), LoRA on the fused experts,
and the saved tensors of a decoder layer's routed experts.

A mixture-of-experts decoder layer (families: `Family.expert_parameters`) runs the attention, norms and (where the
family has one) a shared expert densely, which the family's dense formula counts with the shared expert as its MLP
(`dense_view`), and routes each token to exactly num_experts_per_tok experts: the routed rows are k per token, so
their activations are exact, not an average. From transformers' router and `grouped_mm_experts_forward`
(transformers/integrations/moe.py, the default experts implementation) and PEFT's ParamWrapper, per token:

  router     its fp32 softmax over the experts (4E), the top-k indices (8k), the top-k weights renormalised in
             fp32 (4k) and their sum (4)
  dispatch   three int64 indices per routed row (the gather of the tokens, of their weights, and the inverse
             permutation: 24k); the routing weights in the autocast dtype (a k)
  experts    the gate/up output (2I, kept whole by the two halves SiLU and the product keep), SiLU's output (I)
             and the down projection's output (h, for the weighting), per routed row: a k (3I + h)
  weights    a fused weight that trains (full fine-tuning) or has a LoRA keeps its matmul's input: a k h for
             gate_up_proj, a k I for down_proj
  shared     (a shared expert) its sigmoid gate's output (1) and its output (h), kept by their product: a (h + 1)

and per decoder layer the grouped matmuls' group offsets (int32 per expert) and, with LoRA on a fused weight: PEFT
folds W + BA into a new tensor of the whole expert stack for the forward (torch.baddbmm), which the grouped matmul
keeps for the backward: E x out x in at the weights' dtype. tests/test_estimate.py measures autograd's saved
tensors of the real code and checks these terms.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable, Sequence, Tuple

from qwenvl_ft import families


def dense_view(text, family: families.Family):
    """The text config as the family's dense layer formula should read it: its MLP is the shared expert (width
    shared_expert_intermediate_size), or none, since the routed experts are counted here."""
    if not family.expert_parameters:
        return text
    shared = getattr(text, "shared_expert_intermediate_size", None) or 0
    return SimpleNamespace(**{**text.to_dict(), "head_dim": getattr(text, "head_dim", None),
                              "intermediate_size": shared})


def _fused_shapes(text) -> dict:
    """(out, in) of one expert's slice of each fused weight."""
    h, inter = text.hidden_size, text.moe_intermediate_size
    return {"mlp.experts.gate_up_proj": (2 * inter, h), "mlp.experts.down_proj": (h, inter)}


def routed_bytes(text, family: families.Family, a: int, trainable: bool, adapted: Iterable[str]) -> int:
    """Saved bytes per token of one layer's router and routed experts (+ the shared expert's gate)."""
    if not family.expert_parameters:
        return 0
    k, experts, h, inter = text.num_experts_per_tok, text.num_experts, text.hidden_size, text.moe_intermediate_size
    total = 4 * experts + 4 + 4 * k + 8 * k + 24 * k + a * k + a * k * (3 * inter + h)
    keeps_input = {name for name in family.expert_parameters if trainable or name in set(adapted)}
    total += sum(a * k * _fused_shapes(text)[name][1] for name in keeps_input)
    if getattr(text, "shared_expert_intermediate_size", None):
        total += a * (h + 1)
    return total


def folded_weight_bytes(text, family: families.Family, weight_bytes: int, adapted: Iterable[str]) -> int:
    """Bytes per decoder layer of the LoRA-adapted expert stacks PEFT folds for the forward and autograd keeps."""
    if not family.expert_parameters:
        return 0
    shapes = _fused_shapes(text)
    offsets = 4 * text.num_experts  # the grouped matmuls' int32 group offsets
    return offsets + sum(weight_bytes * text.num_experts * shapes[name][0] * shapes[name][1] for name in set(adapted))


def layer_bytes(family: families.Family, text, a: int, trainable: bool, lora_in: Sequence[int], r: int,
                mask_bytes: int = 1, mlp_bytes=None, adapted: Iterable[str] = (),
                weight_bytes: int = 2) -> Tuple[int, int]:
    """(saved bytes per token, saved bytes per layer) of one decoder layer: the family's dense formula, plus the
    routed experts' terms of a mixture-of-experts family (0 per layer for a dense one)."""
    adapted = list(adapted)
    per_token = family.layer_bytes(dense_view(text, family), a, trainable, lora_in, r, mask_bytes, mlp_bytes=mlp_bytes)
    per_token += routed_bytes(text, family, a, trainable, adapted)
    return per_token, folded_weight_bytes(text, family, weight_bytes, adapted)


# ----------------------------------------------------------------------------------------------------------------
# parameters


def expert_weights(model, family: families.Family) -> int:
    """Parameters of the model's fused expert weights (every layer, every expert)."""
    if not family.expert_parameters:
        return 0
    return sum(p.numel() for name, p in model.named_parameters()
               if any(name.endswith(suffix) for suffix in family.expert_parameters))


def parameter_counts(model, family: families.Family, total: int) -> dict:
    """ParameterCounts' `experts` and `active` of a model of `total` parameters."""
    weights = expert_weights(model, family)
    return dict(experts=weights, active=active_parameters(total, weights, model.config.get_text_config()))


def active_parameters(total: int, experts: int, text) -> int:
    """Parameters a token runs through: all but the routed experts it is not sent to."""
    if not experts:
        return total
    return total - experts + experts * text.num_experts_per_tok // text.num_experts


def expert_lora(model, family: families.Family, adapted: Iterable[str], r: int) -> int:
    """LoRA parameters PEFT's target_parameters adds to the adapted fused weights: one rank-r pair per expert."""
    adapted = set(adapted)
    return sum(r * p.shape[0] * (p.shape[1] + p.shape[2]) for name, p in model.named_parameters()
               if any(name.endswith(suffix) for suffix in adapted))
