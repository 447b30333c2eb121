"""Builders for the processor, the model (optionally 4-bit), the adapter and the optimizer parameter groups.

Each is a pure function of its config group plus what it needs at run time.
"""

from __future__ import annotations

import logging
import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from qwenvl_ft.config.schema import AdapterConfig, AdapterMethod, DataConfig, ModelConfig, ModelFamily, \
    OptimizerConfig
from qwenvl_ft.modeling.varlen_attention import keep_cudnn_out_of_sdpa

log = logging.getLogger("qwenvl_ft")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    # Training batches are padded on the right, generation batches on the left (set per call).
    processor.tokenizer.padding_side = "right"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = "<|endoftext|>"
    return processor


def _model_class(family: ModelFamily):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {ModelFamily.qwen2_vl: Qwen2VLForConditionalGeneration,
            ModelFamily.qwen2_5_vl: Qwen2_5_VLForConditionalGeneration}[family]


def quantization_config(model_cfg: ModelConfig, adapter_cfg: AdapterConfig):
    if not adapter_cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    # Modules that train in full (merger / vision blocks kept out of LoRA) cannot be 4-bit.
    # transformers matches these from the start of a module's full name or as its suffix, so a bare "merger"
    # would only skip the container, not the Linear layers inside it: use regexes over the whole path.
    skip = ["lm_head"]
    if not model_cfg.freeze_merger:
        skip.append(r".*\.merger")
    if not model_cfg.freeze_vision_tower and not adapter_cfg.vision_lora:
        skip.append(r".*\.visual")
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


def build_base_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, source: Optional[str] = None) -> nn.Module:
    """The model before any adapter: loaded (in 4-bit and prepared for k-bit training when the adapter asks for
    it), with the freezing of full fine-tuning done. DPO hands it to TRL with `build_lora_config`'s config: a
    PeftModel TRL wraps itself gets the base with the adapter disabled as reference, where one wrapped here would
    get a second "ref" adapter copied from the first."""
    from qwenvl_ft.modeling.locate import loading

    keep_cudnn_out_of_sdpa()
    quant = quantization_config(model_cfg, adapter_cfg)
    source = source or model_source(model_cfg)
    with loading(source):
        model = _model_class(model_cfg.family).from_pretrained(
            source,
            dtype=DTYPES[model_cfg.dtype.value],
            attn_implementation=model_cfg.attn_implementation.value,
            quantization_config=quant,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    model.config.use_cache = False
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_4bit_weights_trainable_on_cpu(model)
    if adapter_cfg.method == AdapterMethod.full:
        apply_freezing(model, model_cfg)
    return model


def keep_4bit_weights_trainable_on_cpu(model: nn.Module) -> None:
    """bitsandbytes 0.50 repacks a Linear4bit's weight into an inference-only CPU layout the first time it runs in
    eval mode on an AVX512-BF16 CPU, and does not unpack it when training resumes: the next training step fails
    ("a view of a leaf Variable ... in-place"). Generation before/after or evaluation during training on CPU hits
    this, so the repacking is switched off per module through the flag bitsandbytes reads; GPUs never repack."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module not found in model")


def model_parts(model: nn.Module) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """(vision blocks + patch embedding container, merger, language model) of a Qwen2(.5)-VL model."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    return inner.visual, inner.visual.merger, inner.language_model


def apply_freezing(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Full fine-tuning: freeze the parts the config freezes. The merger lives inside `visual`, so it is set last."""
    visual, merger, _ = model_parts(model)
    for p in model.parameters():
        p.requires_grad_(not model_cfg.freeze_language_model)
    for p in visual.parameters():
        p.requires_grad_(not model_cfg.freeze_vision_tower)
    for p in merger.parameters():
        p.requires_grad_(not model_cfg.freeze_merger)


def build_lora_config(model: nn.Module, model_cfg: ModelConfig, adapter_cfg: AdapterConfig):
    """LoRA/DoRA on the chosen language-model projections (and the vision blocks when asked).

    Targets are a regex over full module names: leaf names alone (q_proj, ...) would also match the vision tower
    of Qwen2.5-VL, whose MLP uses gate/up/down_proj too.
    """
    from peft import LoraConfig

    visual, merger, language_model = model_parts(model)
    patterns = []
    if not model_cfg.freeze_language_model and adapter_cfg.target_modules:
        prefix = re.escape(_module_name(model, language_model))
        leaves = "|".join(re.escape(m) for m in adapter_cfg.target_modules)
        patterns.append(rf"{prefix}\..*\.({leaves})")
    if adapter_cfg.vision_lora:
        prefix = _module_name(model, visual)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".blocks.")]
        patterns += [re.escape(n) for n in names]
    modules_to_save: List[str] = []
    if not model_cfg.freeze_vision_tower and not adapter_cfg.vision_lora:
        # PEFT wraps modules, not ModuleLists: name each vision block.
        modules_to_save += ["patch_embed"] + [f"blocks.{i}" for i in range(len(visual.blocks))]
    if not model_cfg.freeze_merger:
        modules_to_save.append("merger")
    if not patterns:
        raise ValueError("the adapter has no target module: unfreeze the language model or set adapter.vision_lora")
    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        bias=adapter_cfg.bias,
        target_modules="^(" + "|".join(patterns) + ")$",
        modules_to_save=modules_to_save or None,
        use_dora=adapter_cfg.method == AdapterMethod.dora,
        task_type="CAUSAL_LM",
    )


def optimizer_param_groups(model: nn.Module, optimizer_cfg: OptimizerConfig, decay_names: List[str]) -> List[dict]:
    """Parameter groups with separate learning rates for vision tower and merger, and no decay on norms/biases."""
    visual, merger, _ = model_parts(model)
    merger_ids = {id(p) for p in merger.parameters()}
    visual_ids = {id(p) for p in visual.parameters()} - merger_ids
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
        n = p.numel()
        # 4-bit weights are packed two per byte
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
