"""model.use_liger_kernel for the families whose Liger patch cannot run on the installed transformers: the
modules the family declares (`Family.liger_modules`) swapped for Liger Kernel's public module classes.

Why our own code instead of Liger's `apply_liger_kernel_to_*`: with liger-kernel 0.8.5 and transformers 5, the
patch modules of the families that declare `liger_modules` fail to import (they subclass output classes
transformers 5 removed), and the patches set names in transformers' modules. Here nothing of a library is patched:
each module of the model is replaced by a Liger module (`LigerRMSNorm`, `LigerLayerNorm`, `LigerSwiGLUMLP`) that
holds the same Parameter objects, or for an MLP the same Linear modules (LoRA and 4-bit layers included), so that
names, state dict keys, dtypes, devices and what trains are unchanged (the MLP's activation module goes: Liger's
kernel is the activation). RoPE stays transformers' (Liger's RoPE is reachable only by replacing functions of
transformers' modeling modules), and the LM head is TRL's fused one.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

RMS_NORM, LAYER_NORM, SWIGLU = "rms_norm", "layer_norm", "swiglu"
KINDS = (RMS_NORM, LAYER_NORM, SWIGLU)


def liger_rms_norm(module: nn.Module) -> nn.Module:
    """transformers' Llama-style RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype)`, the statistics
    in fp32): Liger's "llama" casting mode, no offset (the weight multiplies as it is, ones at init), the module's
    own eps. In-place backward (dY's buffer reused for dX), as Liger's own patches of these models set it."""
    from liger_kernel.transformers import LigerRMSNorm

    weight = module.weight
    with torch.device("meta"):
        liger = LigerRMSNorm(weight.shape[0], eps=module.variance_epsilon, offset=0.0, casting_mode="llama",
                             in_place=True)
    liger.weight = weight
    return liger


def liger_layer_norm(module: nn.LayerNorm) -> Optional[nn.Module]:
    """torch's LayerNorm over the last dimension, with weight and bias (None for any other: it stays eager)."""
    from liger_kernel.transformers import LigerLayerNorm

    if len(module.normalized_shape) != 1 or module.weight is None or module.bias is None:
        return None
    with torch.device("meta"):
        liger = LigerLayerNorm(module.normalized_shape[0], eps=module.eps, bias=True)
    liger.weight, liger.bias = module.weight, module.bias
    return liger


def liger_swiglu(module: nn.Module) -> Optional[nn.Module]:
    """A gated MLP `down_proj(act(gate_proj(x)) * up_proj(x))` with SiLU as `act_fn` (None for another activation:
    it stays eager). The Linear modules move over as they are (biases, LoRA wrappers and 4-bit layers with them)."""
    from liger_kernel.transformers import LigerSwiGLUMLP
    from transformers.activations import ACT2FN

    if not isinstance(getattr(module, "act_fn", None), (nn.SiLU, type(ACT2FN["silu"]))):
        return None
    sizes = SimpleNamespace(hidden_size=_in_features(module.gate_proj),
                            intermediate_size=_in_features(module.down_proj), hidden_act="silu")
    with torch.device("meta"):
        liger = LigerSwiGLUMLP(sizes)
    liger.gate_proj, liger.up_proj, liger.down_proj = module.gate_proj, module.up_proj, module.down_proj
    return liger


def _in_features(linear: nn.Module) -> int:
    return getattr(linear, "in_features", None) or linear.get_base_layer().in_features  # a PEFT LoRA layer


REPLACEMENTS = {RMS_NORM: liger_rms_norm, LAYER_NORM: liger_layer_norm, SWIGLU: liger_swiglu}


def liger_targets(model: nn.Module, classes: Sequence[Tuple[type, str]]) -> Dict[str, str]:
    """module name -> kind, for every module of `model` whose class is exactly one of `classes` (a subclass is a
    different module, with its own forward)."""
    kinds = dict(classes)
    return {name: kinds[type(module)] for name, module in model.named_modules() if type(module) in kinds}


def use_liger_modules(model: nn.Module, classes: Sequence[Tuple[type, str]]) -> Dict[str, Counter]:
    """Swap every module of the declared classes for its Liger module, in place. Returns, per kind, how many
    modules were swapped ("swapped") and how many stay eager ("eager": an activation or shape Liger has no module
    for)."""
    counts: Dict[str, Counter] = {}
    for name, kind in liger_targets(model, classes).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        liger = REPLACEMENTS[kind](getattr(parent, child))
        if liger is not None:
            setattr(parent, child, liger.train(parent.training))
        counts.setdefault(kind, Counter())["swapped" if liger is not None else "eager"] += 1
    return counts
