"""Every rank runs the vision tower and the merger every step, images or not.

With FSDP and ZeRO-3 each vision block's weights are gathered by a collective when the block runs. A step where
one rank's batch holds images and another's holds only text would run those collectives on some ranks only: the
image ranks wait forever (the best-known Qwen2-VL hang under ZeRO-3/FSDP). Under DDP the same batch leaves the
trainable vision parameters without gradients on the text-only rank, which DDP refuses. The fix: a batch without
images or videos sends one minimal dummy image (a single merged token's patches, zeros) through the vision tower
and merger, and adds its output times zero to the input embeddings. Forward values and gradients are unchanged
(x + 0 * y is x, and the vision parameters get zero gradients from that rank, which is what "no image" means);
tests/test_distributed.py checks both.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


def multimodal_module(model: nn.Module) -> nn.Module:
    """The inner model that owns `visual` and embeds the inputs , under any wrapper."""
    for module in model.modules():
        if "visual" in module._modules and hasattr(module, "get_image_features"):
            return module
    raise ValueError(f"{type(model).__name__} has no vision tower to keep in step")


def dummy_image(visual: nn.Module, vision_config):
    """(pixel_values, image_grid_thw) of the smallest image the tower takes: merge x merge patches, one frame."""
    import torch

    merge = vision_config.spatial_merge_size
    channels = getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3))
    features = channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    parameter = next(visual.parameters())
    pixels = torch.zeros(merge * merge, features, dtype=parameter.dtype, device=parameter.device)
    grid = torch.tensor([[1, merge, merge]], device=parameter.device)
    return pixels, grid


# The fields of the vision output that the model's forward consumes: the merged image features, and the features
# some families inject into decoder layers (deepstack). Only these: a tensor the real forward leaves unused must not
# get a gradient here either, or ZeRO-3's trace of the backward (one entry per output tensor reached) would differ
# between a text-only rank and an image rank, which DeepSpeed refuses.
CONSUMED_OUTPUTS = ("pooler_output", "deepstack_features")


def _tensors(value) -> Iterable:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def zero_vision_term(inner: nn.Module):
    """0 x (what the vision tower and merger produce for a dummy image): a scalar that is exactly zero and carries
    the tower into the autograd graph."""
    pixels, grid = dummy_image(inner.visual, inner.config.vision_config)
    output = inner.get_image_features(pixels, grid)
    consumed = [t for name in CONSUMED_OUTPUTS for t in _tensors(getattr(output, name, None))]
    return sum(t.float().sum() for t in consumed) * 0.0


def keep_vision_in_step(model: nn.Module, always: bool):
    """Install the dummy pass on `model`; returns the hook handle. `always`: also in evaluation and generation
    (sharded engines gather weights in every forward); else only in training forwards that build a graph (DDP
    needs the gradients, nothing else)."""
    import torch

    inner = multimodal_module(model)

    def pre_hook(module, args, kwargs):
        if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")):
            return None
        if not always and not (module.training and torch.is_grad_enabled()):
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds + zero_vision_term(module).to(embeds.dtype)
            return args, kwargs
        # The term joins the token embeddings right after they are computed, inside the forward: the same module
        # order as an image batch (embeddings, then the vision tower: the same collectives under ZeRO-3/FSDP), and
        # input_ids stay for what reads them (positions; some families refuse input_ids together with inputs_embeds).
        embedding = module.get_input_embeddings()

        def add_zero_term(_embedding, _inputs, output):
            once.remove()
            return output + zero_vision_term(module).to(output.dtype)

        once = embedding.register_forward_hook(add_zero_term)
        return None

    return inner.register_forward_pre_hook(pre_hook, with_kwargs=True)


def vision_in_step_callback(always: bool):
    """A Trainer callback that installs `keep_vision_in_step` when training begins (on the model the callbacks
    get; its hooks run inside any DDP / FSDP / DeepSpeed wrapper)."""
    from transformers import TrainerCallback

    class KeepVisionInStep(TrainerCallback):
        handle = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and self.handle is None:
                self.handle = keep_vision_in_step(model, always)

    return KeepVisionInStep()
