"""Keep a vision tower that does not train out of autograd.

Why: transformers' `enable_input_require_grads` (called by the Trainer when it turns gradient checkpointing on for
a PEFT model, and by PEFT) hooks the input embeddings of every sub-model it finds, and the vision tower's input
embedding is its patch embedding. The patch embeddings then require grad even when nothing in the tower trains,
so autograd records the whole ViT: each block keeps its checkpointed input, and the backward recomputes and
differentiates every block for gradients nobody uses. On an H200 (Qwen2-VL-2B and 7B LoRA, frozen tower) that was
about 82 KB per image patch (32 blocks x 1280 x 2 bytes; 1.5 GiB for a pack of 18,808 patches), twice that under
QLoRA with adapter.qlora_fp32_upcast, where the tower's residual stream is fp32 (docs/performance.md).

A forward pre-hook on the first ViT block detaches its input while no parameter of the tower's stem or blocks
(the family's declaration: `vision_stem`, `vision_blocks`) requires grad, checked on each call, so a tower that trains (vision LoRA, an unfrozen tower) is left
alone. The projectors after the blocks still train when they are meant to: their parameters need the blocks'
outputs, not gradients through them. Nothing before the cut trains, so no gradient is lost whichever kind of
checkpointing runs (qwenvl-ft asks for the non-reentrant kind; TRL switches PEFT under ZeRO-3 to the reentrant
one); tests/test_frozen_vision.py checks that every gradient is unchanged.
"""

from __future__ import annotations

from typing import Tuple

from torch import nn

from qwenvl_ft import families


def keep_frozen_vision_out_of_autograd(model: nn.Module, family: families.Family) -> None:
    """Registers the detaching hook on the first block of `model`'s vision tower (once per model)."""
    parts = family.parts(model)
    if getattr(parts.vision, "_qwenvl_ft_detach_hook", None) is not None:
        return
    # what the family declares trains before and with the blocks, by name relative to the tower: names survive
    # PEFT swapping a module that trains in full for a wrapper holding a copy
    before_the_cut = tuple(path[len(family.vision_tower) + 1:] + "."
                           for path in family.vision_stem + (family.vision_blocks,))
    parts.vision._qwenvl_ft_detach_hook = parts.vision_blocks[0].register_forward_pre_hook(
        _detach_unless_training(parts.vision, before_the_cut), with_kwargs=True)


def tower_trains(tower: nn.Module, before_the_cut: Tuple[str, ...]) -> bool:
    """Whether a parameter of the tower's stem or blocks (names starting with one of `before_the_cut`) requires
    grad. Read on each call: adapters added later (vision LoRA) and freezing done later both count."""
    return any(p.requires_grad for name, p in tower.named_parameters() if name.startswith(before_the_cut))


def _detach_unless_training(tower: nn.Module, before_the_cut: Tuple[str, ...]):
    def hook(module, args, kwargs):
        if tower_trains(tower, before_the_cut):
            return None
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"].detach())

    return hook
