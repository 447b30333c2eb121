"""The speed switches of a run, turned into what the Trainer takes: batch layout (padded, length-grouped,
token-budget, packed), Liger kernels and vision-tower gradient checkpointing.

`speed_setup` is a pure function of the config plus the collator and rows; sft.py splices its result into the
SFTConfig and SFTTrainer it builds.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

from qwenvl_ft.config.schema import ConfigError, ModelConfig, TrainConfig

log = logging.getLogger("qwenvl_ft")


@dataclass
class SpeedSetup:
    train_dataset: Any
    collator: Callable
    arguments: Dict[str, Any] = field(default_factory=dict)  # extra SFTConfig / TrainingArguments
    callbacks: List[Any] = field(default_factory=list)


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

    visual, _, _ = model_parts(model)
    for block in visual.blocks:
        if enabled:  # non-reentrant, like every checkpointing qwenvl-ft sets up
            block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        block.gradient_checkpointing = enabled
    return len(visual.blocks)


def vision_checkpointing_callback(enabled: bool):
    """Applies `set_vision_checkpointing` when training starts, i.e. after the Trainer has enabled (or not)
    gradient checkpointing model-wide."""
    from transformers import TrainerCallback

    class VisionCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                set_vision_checkpointing(model, enabled)

    return VisionCheckpointing()


def speed_setup(typed: TrainConfig, collator, train_rows, model=None) -> SpeedSetup:
    from qwenvl_ft.data.batching import training_batches
    from qwenvl_ft.training import startup
    from qwenvl_ft.training.common import PHASES_BEFORE_TRAINER

    check_liger(typed.model)
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    startup.mark(PHASES_BEFORE_TRAINER)
    batches = training_batches(typed.data, typed.trainer.batch_size, collator, train_rows, typed.data.seed,
                               tokens_per_second=getattr(vision_config, "tokens_per_second", None))
    startup.mark("batch plan (row lengths)")
    log.info("batches: %s", batches.summary)
    if typed.data.packing and model is not None:
        from qwenvl_ft.modeling.varlen_attention import NAME, use_for_language_model

        # with sdpa, per-sample attention instead of a block-diagonal mask over the whole pack
        if use_for_language_model(model):
            log.info("packing: language model attention switched from sdpa to %s (per-sample SDPA)", NAME)
    arguments: Dict[str, Any] = {"per_device_train_batch_size": batches.per_device_batch_size}
    if batches.sampling_strategy is not None:
        arguments["train_sampling_strategy"] = batches.sampling_strategy
    if typed.model.use_liger_kernel:
        arguments["use_liger_kernel"] = True
    callbacks = []
    if typed.model.vision_checkpointing != typed.model.gradient_checkpointing:
        callbacks.append(vision_checkpointing_callback(typed.model.vision_checkpointing))
    return SpeedSetup(batches.dataset, batches.collator, arguments, callbacks)
