"""The speed switches every method shares: Liger kernels (checked here, passed through TrainingArguments),
vision-tower gradient checkpointing apart from the decoder's, and per-sample attention for packed rows. The batch
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


def packed_attention(models: Sequence) -> None:
    """With data.packing on sdpa, the language model of each model attends per sample (`sdpa_varlen`) instead of
    through a block-diagonal mask over the whole pack, whose size grows with the square of the pack length."""
    from qwenvl_ft.modeling.varlen_attention import NAME, use_for_language_model

    for model in models:
        if model is not None and use_for_language_model(model):
            log.info("packing: language model attention switched from sdpa to %s (per-sample SDPA)", NAME)
