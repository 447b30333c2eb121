"""The speed switches every method shares: Liger kernels (checked here, passed through TrainingArguments),
vision-tower gradient checkpointing apart from the decoder's, and the varlen attention of packed rows and images. The batch
layouts (padded, length-grouped, token budget, packed) are data/batching.py's, chosen by the SFT method."""

from __future__ import annotations

import importlib.util
import logging
from typing import Sequence

from qwenvl_ft.config.model import ModelConfig
from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")


def check_liger(model_cfg: ModelConfig) -> None:
    if model_cfg.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.use_liger_kernel=true needs the liger-kernel package (pip install liger-kernel; "
                          "its Triton kernels run on CUDA GPUs only)")


def set_vision_checkpointing(model, enabled: bool) -> int:
    """Turn gradient checkpointing of the vision blocks on or off, leaving the decoder layers as they are.

    transformers' `gradient_checkpointing_enable` flags every checkpointable layer, ViT blocks included; this
    re-sets the flag on the vision blocks only. Returns how many blocks were set.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from qwenvl_ft.modeling.build import model_parts

    blocks = model_parts(model).vision_blocks
    for block in blocks:
        if enabled:  # non-reentrant, like every checkpointing qwenvl-ft sets up
            block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        block.gradient_checkpointing = enabled
    return len(blocks)


def vision_checkpointing_callback(enabled: bool):
    """Applies `set_vision_checkpointing` when training starts, i.e. after the Trainer has enabled (or not)
    gradient checkpointing model-wide."""
    from transformers import TrainerCallback

    class VisionCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                set_vision_checkpointing(model, enabled)

    return VisionCheckpointing()


def varlen_attention(models: Sequence, model_cfg: ModelConfig, packing: bool) -> str:
    """Set up the varlen attention path (`model.varlen_attention`, qwenvl_ft/modeling/varlen_attention.py) on each
    model (a DPO reference model too) and say in the run log which one runs. The language model switches only for
    packed rows (a padded batch has nothing to gain), the vision tower for every batch under `torch` (all images
    of a batch in one call per block). A model on flash_attention_2 or eager keeps its own kernels. Returns the
    log line."""
    from qwenvl_ft.modeling.varlen_attention import NAME, TORCH, TORCH_NAME, choose, use_for_language_model, \
        use_for_vision

    choice = choose(model_cfg.varlen_attention.value, model_cfg.dtype.value)
    kernel = choice.path == TORCH
    language = vision = False
    for model in models:
        if model is None:
            continue
        if packing:
            language |= use_for_language_model(model, TORCH_NAME if kernel else NAME)
        if kernel:
            vision |= use_for_vision(model)
    if not (language or vision or model_cfg.attn_implementation.value == "sdpa"):
        line = (f"attention: model.attn_implementation={model_cfg.attn_implementation.value} everywhere "
                f"(model.varlen_attention applies to sdpa)")
    elif kernel:
        line = (f"varlen attention: torch's varlen_attn ({choice.reason}); "
                + ("packed rows: one kernel call per decoder layer; " if language else "")
                + "vision tower: all images of a batch in one kernel call per block")
    else:
        line = (f"varlen attention: per-sample SDPA ({choice.reason}); "
                + ("packed rows: one SDPA call per sample; " if language else "")
                + "vision tower: one SDPA call per image")
    log.info(line)
    return line
