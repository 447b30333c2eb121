"""Builders for the processor, the model (optionally 4-bit), the adapter and the optimizer parameter groups.

Each is a pure function of its config group plus what it needs at run time. What differs between model families
(classes, where the vision tower, projectors and language model live, what must stay out of 4-bit) comes from the
family's declaration (qwenvl_ft/families), never from a comparison of family names.
"""

from __future__ import annotations

import logging
import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from qwenvl_ft import families
from qwenvl_ft.config.adapter import AdapterConfig, AdapterMethod, OptimizerConfig
from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.config.model import ModelConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.families import Family, ModelParts
from qwenvl_ft.modeling.frozen_vision import keep_frozen_vision_out_of_autograd
from qwenvl_ft.modeling.linear_attention import run_linear_attention_per_sample
from qwenvl_ft.modeling.patch_embed import embed_patches_as_matmul
from qwenvl_ft.modeling.peft_import import expose_bitsandbytes_to_peft, import_peft_without_bitsandbytes
from qwenvl_ft.modeling.varlen_attention import keep_cudnn_out_of_sdpa

log = logging.getLogger("qwenvl_ft")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def family_of(model_cfg: ModelConfig) -> Family:
    return families.get(model_cfg.family.value)


def model_class(model_cfg: ModelConfig):
    """The transformers class of model.family (`from_pretrained`, `_from_config`)."""
    return family_of(model_cfg).load_model_class()


def check_family(model_cfg: ModelConfig, source: str) -> None:
    """A checkpoint of another family would load into model.family's class with a warning and garbage weights: say
    so before loading. Reads only config.json."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code).model_type
    except (OSError, ValueError):
        return  # from_pretrained will say what is missing
    family = family_of(model_cfg)
    if model_type != family.name and model_type in families.names():
        raise ConfigError(f"model.family={family.name} but {source} is a {model_type} checkpoint (its config.json); "
                          f"set model.family={model_type}, or pick the model option of that family")


def model_source(model_cfg: ModelConfig, weights: bool = True) -> str:
    """Hub id or folder to load from; random models are written to a cache folder first. With model.start_from,
    that run's final/ once it exists (`qwenvl-ft train` trains it first); before, the model group's own, which that
    run starts from too (a warning says so when weights, not just the processor, are loaded from it)."""
    start = model_cfg.start_from
    if start is not None:
        from pathlib import Path

        final = Path(start.output_dir).expanduser() / "final"
        if final.is_dir():
            return str(final)
        if weights:
            log.warning("model.start_from: %s is not trained yet (qwenvl-ft train with this config trains it "
                        "first); loading the model group's own weights instead", final)
    if model_cfg.random_init:
        from qwenvl_ft.modeling.random_init import materialize

        return str(materialize(model_cfg.architecture, model_cfg.dtype.value, model_cfg.family.value))
    from qwenvl_ft.modeling.locate import check_model_available

    check_model_available(model_cfg.name_or_path)  # a one-screen error naming it, before anything loads
    return model_cfg.name_or_path


def build_processor(model_cfg: ModelConfig, data_cfg: DataConfig, source: Optional[str] = None):
    from transformers import AutoProcessor

    from qwenvl_ft.modeling.locate import loading

    source = source or model_source(model_cfg, weights=False)
    with loading(source):
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    if data_cfg.min_pixels is not None or data_cfg.max_pixels is not None:
        # Image resolution bounds through `size` (min/max_pixels keywords are deprecated in transformers 5);
        # videos keep their own bounds (data.video_min/max_pixels, applied by the collator).
        size = processor.image_processor.size
        processor.image_processor.size = {
            "shortest_edge": data_cfg.min_pixels or size["shortest_edge"],
            "longest_edge": data_cfg.max_pixels or size["longest_edge"],
        }
    # Which family the processor serves: families sharing a processor and a tokenizer class (a dense family and its
    # mixture-of-experts variant) cannot be told apart by the processor itself (families.of_processor reads this first).
    setattr(processor, families.PROCESSOR_FAMILY, model_cfg.family.value)
    # Training batches are padded on the right, generation batches on the left (set per call).
    processor.tokenizer.padding_side = "right"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = "<|endoftext|>"
    return processor


def quantization_config(model_cfg: ModelConfig, adapter_cfg: AdapterConfig):
    if not adapter_cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    expose_bitsandbytes_to_peft()  # the one place a run asks for bitsandbytes (modeling/peft_import.py)

    # Modules that train in full (projectors / vision blocks kept out of LoRA) cannot be 4-bit. transformers
    # matches each pattern from the start of a module's full name up to a module boundary, so the family's
    # attribute paths skip the Linear layers inside those modules.
    family = family_of(model_cfg)
    skip = list(family.never_quantized)
    if not model_cfg.freeze_merger:
        skip += [re.escape(path) for path in family.projectors]
    if not model_cfg.freeze_vision_tower and not adapter_cfg.vision_lora:
        skip.append(re.escape(family.vision_tower))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=adapter_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=DTYPES[model_cfg.dtype.value],
        llm_int8_skip_modules=skip,
    )


def build_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, source: Optional[str] = None) -> nn.Module:
    """The base model, quantised when the adapter asks for 4-bit, with the adapter applied and freezing done."""
    model = build_base_model(model_cfg, adapter_cfg, source)
    if not adapter_cfg.is_peft:
        return model
    from peft import get_peft_model

    return get_peft_model(model, build_lora_config(model, model_cfg, adapter_cfg))


def build_base_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, source: Optional[str] = None,
                     device_map=None) -> nn.Module:
    """The model before any adapter: loaded (in 4-bit and prepared for LoRA on it when the adapter asks for it),
    with the freezing of full fine-tuning done. DPO hands it to TRL with `build_lora_config`'s config: a
    PeftModel TRL wraps itself gets the base with the adapter disabled as reference, where one wrapped here would
    get a second "ref" adapter copied from the first."""
    from qwenvl_ft.modeling.locate import loading

    import_peft_without_bitsandbytes()
    keep_cudnn_out_of_sdpa()
    quant = quantization_config(model_cfg, adapter_cfg)
    source = source or model_source(model_cfg)
    with loading(source):
        check_family(model_cfg, source)
        model = model_class(model_cfg).from_pretrained(
            source,
            dtype=DTYPES[model_cfg.dtype.value],
            attn_implementation=model_cfg.attn_implementation.value,
            quantization_config=quant,
            trust_remote_code=model_cfg.trust_remote_code,
            device_map=device_map,  # a distributed QLoRA run: each process's GPU (distributed/placement.py)
        )
    model.config.use_cache = False
    train_the_router_balance(model, model_cfg.router_aux_loss_coef)
    keep_frozen_vision_out_of_autograd(model, family_of(model_cfg))
    embed_patches_as_matmul(model)  # on a CPU, 6-8x faster than Conv3d, same values
    run_linear_attention_per_sample(model)  # packed rows keep their samples apart in recurrent layers too
    if quant is not None:
        model = prepare_4bit_model(model, model_cfg, adapter_cfg)
    if adapter_cfg.method == AdapterMethod.full:
        apply_freezing(model, model_cfg)
    return model


def prepare_4bit_model(model: nn.Module, model_cfg: ModelConfig, adapter_cfg: AdapterConfig) -> nn.Module:
    """A 4-bit base made ready for LoRA: every base weight frozen, non-reentrant gradient checkpointing on when asked.

    adapter.qlora_fp32_upcast runs PEFT's `prepare_model_for_kbit_training`, which also casts every weight that is
    not 4-bit to fp32 (embeddings, LM head, norms, the vision tower's), and with them the residual stream. By
    default they stay in model.dtype, as TRL >= 1.16 leaves them (trl#4335, trl#4577): the rest of what PEFT's
    function does is done here. Non-reentrant checkpointing needs no input that requires grad (the Trainer's
    `enable_input_require_grads` still runs; modeling/frozen_vision.py keeps it off a frozen tower). LoRA factors
    are added later (PEFT makes them fp32; TRL's trainers then cast the trainable weights of a 4-bit model to bf16).
    """
    if adapter_cfg.qlora_fp32_upcast:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_4bit_weights_trainable_on_cpu(model)
    return model


def train_the_router_balance(model: nn.Module, coefficient: float) -> None:
    """A mixture-of-experts model adds its router's load-balancing loss, times `coefficient`, to the loss it returns
    (transformers' output_router_logits and router_aux_loss_coef), so the Trainer trains it; dense models have
    neither setting and are left alone."""
    text = model.config.get_text_config()
    if hasattr(text, "router_aux_loss_coef"):
        text.router_aux_loss_coef = coefficient
        text.output_router_logits = coefficient > 0


def describe_experts(model: nn.Module, lora_config) -> None:
    """Say at run start what a mixture-of-experts run does with its experts and router (docs/moe.md)."""
    family = families.of_model(model)
    if not family.expert_parameters:
        return
    text = model.config.get_text_config()
    adapted = list(getattr(lora_config, "target_parameters", None) or [])
    if lora_config is None:
        experts = "the experts and the router train in full where the language model does"
    elif adapted:
        experts = f"LoRA on the fused experts {adapted} (PEFT target_parameters, one per expert), the router frozen"
    else:
        experts = "the experts and the router frozen, without LoRA"
    balance = (f"x {text.router_aux_loss_coef} in the trained loss" if text.output_router_logits
               else "off (model.router_aux_loss_coef=0)")
    log.info("%s: %d of %d experts per token; %s; the router's load-balancing loss %s", family.title,
             text.num_experts_per_tok, text.num_experts, experts, balance)


def keep_4bit_weights_trainable_on_cpu(model: nn.Module) -> None:
    """bitsandbytes 0.50 repacks a Linear4bit's weight into an inference-only CPU layout the first time it runs in
    eval mode on an AVX512-BF16 CPU, and does not unpack it when training resumes: the next training step fails
    ("a view of a leaf Variable ... in-place"). Generation before/after or evaluation during training on CPU hits
    this, so the repacking is switched off per module through the flag bitsandbytes reads; GPUs never repack."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def model_parts(model: nn.Module) -> ModelParts:
    """Vision tower, projectors, language model, vision blocks and decoder layers of a model (PEFT-wrapped or not),
    where its family declares them."""
    return families.of_model(model).parts(model)


def apply_freezing(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Full fine-tuning: freeze the parts the config freezes. The projectors live inside the vision tower, so they
    are set last."""
    parts = model_parts(model)
    for p in model.parameters():
        p.requires_grad_(not model_cfg.freeze_language_model)
    for p in parts.vision.parameters():
        p.requires_grad_(not model_cfg.freeze_vision_tower)
    for projector in parts.projectors:
        for p in projector.parameters():
            p.requires_grad_(not model_cfg.freeze_merger)


def build_lora_config(model: nn.Module, model_cfg: ModelConfig, adapter_cfg: AdapterConfig):
    """LoRA/DoRA on the chosen language-model projections (and the vision blocks when asked).

    Targets are a regex over full module names: leaf names alone (q_proj, ...) would also match a vision tower
    whose MLP uses gate/up/down_proj too. On a mixture-of-experts family the MLP names also adapt the fused expert
    weights they stand for (`Family.adapted_experts`, PEFT's target_parameters: one LoRA per expert); config/schema.py
    has refused what PEFT's parameter LoRA cannot do (dropout, DoRA).
    """
    from peft import LoraConfig

    family = families.of_model(model)
    patterns, expert_parameters = [], []
    if not model_cfg.freeze_language_model and adapter_cfg.target_modules:
        unknown = sorted(set(adapter_cfg.target_modules) - set(family.language_lora_targets))
        if unknown:
            raise ConfigError(f"adapter.target_modules has {unknown}, which {family.title}'s decoder layers do not "
                              f"have; valid: {list(family.language_lora_targets)}")
        expert_parameters = family.adapted_experts(adapter_cfg.target_modules)
        leaves = "|".join(re.escape(m) for m in adapter_cfg.target_modules)
        patterns.append(rf"{re.escape(family.language_model)}\..*\.({leaves})")
    if adapter_cfg.vision_lora:
        prefix = family.vision_blocks + "."
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]
        patterns += [re.escape(n) for n in names]
    modules_to_save: List[str] = []
    if not model_cfg.freeze_vision_tower and not adapter_cfg.vision_lora:
        modules_to_save += wrappable(model, family.vision_stem + (family.vision_blocks,))
    if not model_cfg.freeze_merger:
        modules_to_save += wrappable(model, family.projectors)
    if not patterns:
        raise ValueError("the adapter has no target module: unfreeze the language model or set adapter.vision_lora")
    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        bias=adapter_cfg.bias,
        target_modules="^(" + "|".join(patterns) + ")$",
        target_parameters=expert_parameters or None,
        modules_to_save=modules_to_save or None,
        use_dora=adapter_cfg.method == AdapterMethod.dora,
        task_type="CAUSAL_LM",
    )


def wrappable(model: nn.Module, paths) -> List[str]:
    """Full names of the modules PEFT's modules_to_save wraps for these paths: PEFT wraps modules, not
    ModuleLists, so a ModuleList (the vision blocks, DeepStack mergers) is named block by block. PEFT matches a
    name as a suffix of the module's name, which a full path from the model's top matches exactly once."""
    names = []
    for path in paths:
        module = model.get_submodule(path)
        names += [f"{path}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [path]
    return names


def optimizer_param_groups(model: nn.Module, optimizer_cfg: OptimizerConfig, decay_names: List[str]) -> List[dict]:
    """Parameter groups with separate learning rates for vision tower and merger, and no decay on norms/biases."""
    parts = model_parts(model)
    merger_ids = {id(p) for projector in parts.projectors for p in projector.parameters()}
    visual_ids = {id(p) for p in parts.vision.parameters()} - merger_ids
    decay = set(decay_names)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in merger_ids and optimizer_cfg.merger_lr is not None:
            lr = optimizer_cfg.merger_lr
        elif id(param) in visual_ids and optimizer_cfg.vision_lr is not None:
            lr = optimizer_cfg.vision_lr
        else:
            lr = optimizer_cfg.lr
        wd = optimizer_cfg.weight_decay if name in decay else 0.0
        groups.setdefault((lr, wd), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partitioned parameter's numel() is its shard
        # 4-bit weights are packed two per byte
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
