"""The model without weights, and its parameters counted.

Parameters are counted on a model built on PyTorch's meta device from the architecture (no weights are read or
allocated): `model.architecture` when the option carries it, else the checkpoint's config.json. Which of them
train, which are 4-bit and which get LoRA factors is decided by the same builders the run uses
(`apply_freezing`, `quantization_config`, `build_lora_config`), so the estimate cannot disagree with the run about
what is trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict

from qwenvl_ft import families
from qwenvl_ft.config.adapter import AdapterMethod
from qwenvl_ft.config.model import ModelConfig
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.estimate import experts


def hf_config(model_cfg: ModelConfig):
    """The transformers config of the run's model, without downloading weights."""
    if model_cfg.architecture is not None:
        from qwenvl_ft.modeling.random_init import build_tokenizer, model_config

        family = model_cfg.family.value
        return model_config(model_cfg.architecture, build_tokenizer(family=family), family)
    from transformers import AutoConfig

    from qwenvl_ft.modeling.locate import check_model_available

    check_model_available(model_cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as err:
        raise ConfigError(f"estimate needs the model's sizes: model.architecture, or a config.json for "
                          f"{model_cfg.name_or_path} (local folder or reachable hub): {err}") from None


def meta_model(model_cfg: ModelConfig):
    """The model with every parameter on the meta device: shapes only, built in a fraction of a second."""
    import torch

    from qwenvl_ft.modeling.build import model_class

    config = hf_config(model_cfg)
    with torch.device("meta"):
        return model_class(model_cfg)._from_config(config)


@dataclass
class ParameterCounts:
    total: int  # parameters of the base model (tied weights once)
    by_part: Dict[str, int]  # vision blocks + patch embedding, merger, embeddings, decoder layers, lm_head
    trainable: int  # what the optimizer updates (LoRA factors, modules_to_save copies, or base weights)
    quantized: int  # base parameters held in 4 bits
    fp32_base: int  # base parameters held in fp32 (adapter.qlora_fp32_upcast's cast, or model.dtype=float32)
    base_other: int  # base parameters held in model.dtype
    lora: int
    saved_copies: int  # modules_to_save: PEFT trains a copy next to the frozen original
    lora_modules: Dict[str, int] = field(default_factory=dict)  # leaf name -> how many modules got LoRA
    experts: int = 0  # base parameters in fused expert weights (mixture of experts; estimate/experts.py)
    active: int = 0  # base parameters a token runs through: all but the routed experts it is not sent to
    expert_lora: int = 0  # of `lora`, the LoRA factors on fused expert weights
    dora_magnitudes: int = 0  # of `lora`, DoRA's magnitude vectors


def count_parameters(cfg: TrainConfig, model=None) -> ParameterCounts:
    from torch import nn

    from qwenvl_ft.modeling.build import apply_freezing, build_lora_config, model_parts, quantization_config

    model_cfg, adapter_cfg = cfg.model, cfg.adapter
    model = model if model is not None else meta_model(model_cfg)
    found = model_parts(model)
    params = dict(model.named_parameters())  # tied weights appear once
    parts = [*[("merger", projector) for projector in found.projectors], ("vision", found.vision),
             ("embeddings", found.language_model.get_input_embeddings()),
             ("decoder", found.language_model)]  # first match wins: the projectors sit inside the vision tower
    owner = {}
    for part, module in reversed(parts):
        owner.update({id(p): part for p in module.parameters()})
    by_part: Dict[str, int] = {}
    for p in params.values():
        part = owner.get(id(p), "lm_head")
        by_part[part] = by_part.get(part, 0) + p.numel()
    total = sum(p.numel() for p in params.values())

    quant = quantization_config(model_cfg, adapter_cfg)
    quantized_names = set()
    if quant is not None:
        # transformers' own rule for which Linears bitsandbytes replaces
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = quant.llm_int8_skip_modules or []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and should_convert_module(name, skip):
                quantized_names.add(f"{name}.weight")
    quantized = sum(params[n].numel() for n in quantized_names if n in params)
    dtype_fp32 = model_cfg.dtype.value == "float32"
    upcast = quant is not None and adapter_cfg.qlora_fp32_upcast  # modeling/build.py: prepare_4bit_model
    fp32_base = total - quantized if (upcast or dtype_fp32) else 0
    base_other = total - quantized - fp32_base

    family = families.of_model(model)
    moe = experts.parameter_counts(model, family, total)
    if adapter_cfg.method == AdapterMethod.full:
        apply_freezing(model, model_cfg)
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        return ParameterCounts(total, by_part, trainable, quantized, fp32_base, base_other, 0, 0, **moe)

    lora_cfg = build_lora_config(model, model_cfg, adapter_cfg)
    pattern = re.compile(lora_cfg.target_modules)
    lora, magnitudes, leaves = 0, 0, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern.fullmatch(name):
            lora += adapter_cfg.r * (module.in_features + module.out_features)
            if adapter_cfg.method == AdapterMethod.dora:
                magnitudes += module.out_features  # the magnitude vector
            leaf = name.rsplit(".", 1)[-1]
            leaves[leaf] = leaves.get(leaf, 0) + 1
    expert_lora = experts.expert_lora(model, family, lora_cfg.target_parameters or [], adapter_cfg.r)
    lora += expert_lora + magnitudes
    saved = sum(p.numel() for key in lora_cfg.modules_to_save or [] for p in model.get_submodule(key).parameters())
    return ParameterCounts(total, by_part, lora + saved, quantized, fp32_base, base_other, lora, saved, leaves,
                           expert_lora=expert_lora, dora_magnitudes=magnitudes, **moe)
