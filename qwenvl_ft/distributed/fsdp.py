"""FSDP2 through accelerate: full shard, with the decoder layers and vision blocks as wrap units.

A wrap unit is gathered for its own forward and backward and freed again, so the peak holds one unit's full
weights plus everyone's shards. For Qwen-VL models the natural units are the language model's decoder layers and
the vision tower's blocks; what is left (embeddings, merger, norms, lm_head) forms the root unit.
"""

from __future__ import annotations

from typing import Dict, List

from qwenvl_ft.config.dist import FsdpStateDict
from qwenvl_ft.config.schema import TrainConfig

_STATE_DICT_TYPES = {FsdpStateDict.sharded: "SHARDED_STATE_DICT", FsdpStateDict.full: "FULL_STATE_DICT"}


def wrap_classes(cfg: TrainConfig) -> List[str]:
    """Class names of the wrap units: dist.fsdp.wrap_classes, else the model family's declaration (its decoder
    layer and its vision block, qwenvl_ft/families/). Names, not an instance: the arguments are built before the
    model exists."""
    if cfg.dist.fsdp.wrap_classes:
        return list(cfg.dist.fsdp.wrap_classes)
    from qwenvl_ft import families

    family = families.get(cfg.model.family.value)
    return [family.decoder_layer_class, family.vision_block_class]


def fsdp_arguments(cfg: TrainConfig) -> Dict:
    """TrainingArguments for dist.engine=fsdp. With model.gradient_checkpointing and
    dist.fsdp.activation_checkpointing, FSDP's checkpoint wrapper replaces transformers' gradient checkpointing
    (transformers warns that its own one gathers every unit twice in the backward)."""
    fsdp_cfg = cfg.dist.fsdp
    fsdp_checkpointing = cfg.model.gradient_checkpointing and fsdp_cfg.activation_checkpointing
    return dict(
        fsdp=True,
        fsdp_config={
            "version": 2,
            "reshard_after_forward": fsdp_cfg.reshard_after_forward,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": wrap_classes(cfg),
            "activation_checkpointing": fsdp_checkpointing,
            "cpu_offload": fsdp_cfg.cpu_offload,
            "state_dict_type": _STATE_DICT_TYPES[fsdp_cfg.state_dict_type],
            "cpu_ram_efficient_loading": fsdp_cfg.cpu_ram_efficient_loading,
        },
        gradient_checkpointing=cfg.model.gradient_checkpointing and not fsdp_checkpointing,
    )
