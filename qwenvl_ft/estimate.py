"""`qwenvl-ft estimate`: peak GPU memory of a training run, predicted from the config before anything loads.

Parameters are counted on a model built on PyTorch's meta device from the architecture (no weights are read or
allocated): `model.architecture` when the option carries it, else the checkpoint's config.json. Which of them
train, which are 4-bit and which get LoRA factors is decided by the same builders the run uses
(`apply_freezing`, `quantization_config`, `build_lora_config`), so the estimate cannot disagree with the run about
what is trained.

Bytes:
  weights      dtype bytes per parameter; 4-bit NF4: 0.5 byte + its absmax (1 byte per 64 with double
               quantisation, else 4 per 64); QLoRA's `prepare_model_for_kbit_training` casts every parameter that
               is not 4-bit (embeddings, lm_head, norms, biases) to fp32, and PEFT keeps LoRA factors in fp32
  gradients    one per trainable parameter, in its dtype
  optimizer    AdamW: two states per trainable parameter in its dtype; 8-bit AdamW: two bytes
  activations  autograd's saved tensors, counted per token from transformers' code of the model's family (the
               family declares its per-block terms: qwenvl_ft/families, `decoder_layer_bytes`,
               `vision_block_bytes`), plus the backward's working set; tests/test_estimate.py measures the saved
               tensors of the real code on CPU, for every family, and checks the formulas against them
A batch is the worst case of the configured layout: padded rows of data.max_length, or a full pack / token
budget, each row holding its image budget (data.max_visual_tokens, else the images at data.max_pixels, else at
the family's processor default).
Not counted: the CUDA context (~0.5 GiB, outside PyTorch's allocator) and fragmentation (typically 5-15%).
The prediction is for `torch.cuda.max_memory_allocated()`. On an H200 it was 4-5% above the measured peak for the
largest batch a run saw (2B LoRA padded and packed, QLoRA packed; docs/performance.md, "Memory estimate").
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import DictConfig

from qwenvl_ft import families, methods
from qwenvl_ft.config.schema import AdapterMethod, DataConfig, ModelConfig, Precision, TrainConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.families.base import language_linear_inputs

log = logging.getLogger("qwenvl_ft")

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # TRL's fused LM head works on tiles of this many tokens x vocabulary rows


# ----------------------------------------------------------------------------------------------------------------
# the model, without weights


def hf_config(model_cfg: ModelConfig):
    """The transformers config of the run's model, without downloading weights."""
    if model_cfg.architecture is not None:
        from qwenvl_ft.modeling.random_init import build_tokenizer, model_config

        return model_config(model_cfg.architecture, build_tokenizer(), model_cfg.family.value)
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
    fp32_base: int  # base parameters held in fp32 (QLoRA's cast, or model.dtype=float32)
    base_other: int  # base parameters held in model.dtype
    lora: int
    saved_copies: int  # modules_to_save: PEFT trains a copy next to the frozen original
    lora_modules: Dict[str, int] = field(default_factory=dict)  # leaf name -> how many modules got LoRA


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
    fp32_base = total - quantized if (quant is not None or dtype_fp32) else 0
    base_other = total - quantized - fp32_base

    if adapter_cfg.method == AdapterMethod.full:
        apply_freezing(model, model_cfg)
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        return ParameterCounts(total, by_part, trainable, quantized, fp32_base, base_other, 0, 0)

    lora_cfg = build_lora_config(model, model_cfg, adapter_cfg)
    pattern = re.compile(lora_cfg.target_modules)
    lora, leaves = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern.fullmatch(name):
            lora += adapter_cfg.r * (module.in_features + module.out_features)
            if adapter_cfg.method == AdapterMethod.dora:
                lora += module.out_features  # the magnitude vector
            leaf = name.rsplit(".", 1)[-1]
            leaves[leaf] = leaves.get(leaf, 0) + 1
    saved = sum(p.numel() for key in lora_cfg.modules_to_save or [] for p in model.get_submodule(key).parameters())
    return ParameterCounts(total, by_part, lora + saved, quantized, fp32_base, base_other, lora, saved, leaves)


# ----------------------------------------------------------------------------------------------------------------
# the batch


@dataclass
class BatchBudget:
    rows: int  # sequences per device step
    tokens: int  # language-model tokens per device step
    visual_tokens: int  # of which image tokens (after the 2x2 merge)
    vision_patches: int  # ViT tokens (before the merge)
    note: str
    row_patches: int = 0  # ViT patches of one row's images (the FLOPs estimate treats them as one image)


def batch_budget(data_cfg: DataConfig, batch_size: int, family: families.Family, pairs: bool = False) -> BatchBudget:
    """The worst-case batch of one device step, for a model of `family` (its merge size, pixels per visual token
    and default image size). `pairs`: DPO, trainer.batch_size pairs = a chosen and a rejected sequence each, whose
    images the vision tower encodes once (modeling/padding_free.py: share_pair_images)."""
    merge, factor = family.merge_size, family.factor
    max_length = data_cfg.max_length
    if max_length is None and data_cfg.max_tokens_per_batch is None:
        raise ConfigError("estimate needs data.max_length or data.max_tokens_per_batch to size a batch")
    encoded_rows = None
    if pairs:
        if max_length is None:
            raise ConfigError("estimate of a DPO run needs data.max_length to size a batch")
        rows, tokens, encoded_rows = 2 * batch_size, 2 * batch_size * max_length, batch_size
        note = f"{batch_size} pairs = {rows} rows (chosen, rejected) of data.max_length={max_length}"
        if data_cfg.packing:
            note += " (run without their padding; the worst case has none)"
    elif data_cfg.packing or data_cfg.max_tokens_per_batch is not None:
        from qwenvl_ft.data.batching import token_budget

        tokens = token_budget(data_cfg, batch_size)
        rows = max(1, tokens // max_length) if max_length else 1
        layout = "a full pack" if data_cfg.packing else "a full token budget"
        note = f"{layout} of {tokens} tokens = {rows} rows of {max_length or tokens}"
    else:
        rows, tokens = batch_size, batch_size * max_length
        note = f"{rows} padded rows of data.max_length={max_length}"
    if data_cfg.resized_height is not None:
        pixels, source = data_cfg.resized_height * data_cfg.resized_width, "the fixed resize"
    else:
        pixels = data_cfg.max_pixels or family.image_max_pixels
        source = "data.max_pixels" if data_cfg.max_pixels else "the processor's default max_pixels"
    per_image = max(1, pixels // (factor * factor))
    per_row = per_image * (data_cfg.max_images_per_row or 1)
    if data_cfg.max_visual_tokens is not None:
        per_row, source = min(per_row, data_cfg.max_visual_tokens), "data.max_visual_tokens"
    per_row = min(per_row, tokens // rows)
    note += f", each with {per_row} image tokens ({source})"
    if encoded_rows is not None:
        note += ", encoded once per pair"
    encoded = (encoded_rows or rows) * per_row  # image tokens through the vision tower
    return BatchBudget(rows, tokens, encoded, encoded * merge * merge, note, per_row * merge * merge)


# ----------------------------------------------------------------------------------------------------------------
# activations (bytes per token): the family's per-block terms (qwenvl_ft/families), summed over the batch


@dataclass
class Estimate:
    rows: List[tuple]  # (component, bytes, how)
    counts: ParameterCounts
    budget: BatchBudget

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def table(self) -> str:
        lines = [f"{'component':<26} {'GiB':>8}  how", "-" * 100]
        lines += [f"{name:<26} {b / GiB:8.2f}  {how}" for name, b, how in self.rows]
        lines += ["-" * 100, f"{'predicted peak':<26} {self.total / GiB:8.2f}  torch.cuda.max_memory_allocated(); "
                  f"add ~0.5 GiB CUDA context and 5-15% fragmentation for nvidia-smi"]
        return "\n".join(lines)


@dataclass(frozen=True)
class ActivationDtypes:
    """Bytes per element of the activations that are not all in the autocast dtype.

    residual  the residual stream (decoder layer inputs, which gradient checkpointing keeps, and the final hidden
              states the LM head keeps): the embedding's dtype, since RMSNorm multiplies by its weight in the
              weight's dtype; fp32 under QLoRA (prepare_model_for_kbit_training casts norms and embeddings) and
              for an fp32 model under bf16 autocast. The LM head weight has it too, and TRL's fused head casts
              that weight to the autocast dtype one vocabulary tile at a time.
    linear    a Linear's output: the autocast dtype, except a 4-bit one's, which bitsandbytes casts back to its
              input's dtype (the fp32 residual under QLoRA)
    """

    autocast: int
    residual: int
    linear: int

    @classmethod
    def of(cls, counts: ParameterCounts, weight_bytes: int, autocast: int) -> "ActivationDtypes":
        return cls(autocast, 4 if counts.quantized else weight_bytes, 4 if counts.quantized else autocast)


def estimate_memory(cfg: TrainConfig, model=None, budget: Optional[BatchBudget] = None) -> Estimate:
    """The predicted peak of `cfg`, for the worst-case batch of its layout unless `budget` gives another batch
    (bench/gpu_throughput.py checks the formulas against the largest batch a run really saw)."""
    model_cfg, adapter_cfg, data_cfg, trainer_cfg = cfg.model, cfg.adapter, cfg.data, cfg.trainer
    model = model if model is not None else meta_model(model_cfg)
    counts = count_parameters(cfg, model)
    config = model.config
    text, vision = config.get_text_config(), config.vision_config
    w = DTYPE_BYTES[model_cfg.dtype.value]
    # activation dtype: autocast's under bf16/fp16 mixed precision, else the weights' (the estimate is for a GPU,
    # where precision=auto means bf16)
    a = 4 if (trainer_cfg.precision == Precision.fp32 and w == 4) else 2
    rows: List[tuple] = []

    if counts.quantized:
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if adapter_cfg.bnb_4bit_use_double_quant else 4 / 64)
        rows.append(("weights (4-bit)", int(counts.quantized * per_param),
                     f"{counts.quantized / 1e9:.2f}B params x {per_param:.3f} B (NF4 + absmax)"))
    if counts.fp32_base:
        why = "QLoRA casts every non-4-bit parameter to fp32" if counts.quantized else "model.dtype=float32"
        rows.append(("weights (fp32)", counts.fp32_base * 4, f"{counts.fp32_base / 1e9:.2f}B params x 4 B ({why})"))
    if counts.base_other:
        rows.append((f"weights ({model_cfg.dtype.value})", counts.base_other * w,
                     f"{counts.base_other / 1e9:.2f}B params x {w} B"))

    if adapter_cfg.is_peft:
        # PEFT keeps LoRA factors in fp32; modules_to_save copies keep the original's dtype (fp32 under QLoRA)
        copy_bytes = 4 if counts.quantized or w == 4 else w
        adapter_bytes = counts.lora * 4 + counts.saved_copies * copy_bytes
        rows.append(("adapter weights", adapter_bytes,
                     f"LoRA r={adapter_cfg.r}: {counts.lora / 1e6:.1f}M fp32 params"
                     + (f" + {counts.saved_copies / 1e6:.1f}M modules_to_save copies" if counts.saved_copies else "")))
        grad_bytes = adapter_bytes
    else:
        grad_bytes = counts.trainable * w
    rows.append(("gradients", grad_bytes, f"{counts.trainable / 1e6:.1f}M trainable params, each in its dtype"))
    # AdamW keeps two states like each parameter (its dtype); bitsandbytes' 8-bit AdamW one byte each
    eight_bit = "8bit" in cfg.optimizer.name
    state_bytes = 2 * counts.trainable if eight_bit else 2 * grad_bytes
    rows.append(("optimizer states", state_bytes,
                 f"{cfg.optimizer.name}: two states per trainable param ({'1 B' if eight_bit else 'its dtype'})"))

    method = methods.get(trainer_cfg.kind)
    rows += method.memory_rows(cfg, counts, w)  # e.g. DPO's frozen reference copy
    rows += generation_rows(cfg, method, w)  # e.g. GRPO's sampled completions
    family = families.of_config(config)
    budget = budget or batch_budget(method.batch_data(cfg), trainer_cfg.batch_size, family,
                                    pairs=method.sequences_per_row() == 2)
    rows += _activation_rows(cfg, counts, family, text, vision, budget, ActivationDtypes.of(counts, w, a))
    return Estimate(rows, counts, budget)


def generation_rows(cfg: TrainConfig, method: methods.Method, weight_bytes: int) -> List[tuple]:
    """What a method samples before its loss forward (`Method.generation_batch`; GRPO: trainer.batch_size x
    gradient_accumulation_steps completions, sampled at once): its KV cache and the pixel values TRL keeps for every
    completion (it processes each copy of a prompt's images, in float32)."""
    batch = method.generation_batch(cfg)
    if batch is None:
        return []
    rows = []
    config = hf_config(cfg.model)
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    completions = batch.completions
    if batch.kv_cache:
        tokens = completions * (batch.prompt_tokens + batch.new_tokens)
        per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * weight_bytes
        rows.append(("generation: KV cache", per_token * tokens,
                     f"{completions} completions x ({batch.prompt_tokens} prompt + {batch.new_tokens} "
                     f"generated) tokens x {per_token} B; freed before the loss forward, so an upper bound"))
    one = batch_budget(method.batch_data(cfg), 1, families.of_config(config))
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    if one.vision_patches:
        rows.append(("generation: pixel values", completions * one.vision_patches * patch * 4,
                     f"{completions} completions x {one.vision_patches} patches x {patch} fp32 (each completion "
                     f"carries its prompt's images)"))
    return rows


def _lora_inputs(cfg: TrainConfig, counts: ParameterCounts, family: families.Family, text, vision) -> tuple:
    """in_features of the LoRA'd Linears of one decoder layer and of one vision block."""
    if not cfg.adapter.is_peft:
        return [], []
    width = language_linear_inputs(text)
    layers = text.num_hidden_layers
    lm = []
    for leaf, n in counts.lora_modules.items():
        if leaf in width:
            lm += [width[leaf]] * max(1, n // layers)
    if not cfg.adapter.vision_lora:
        return lm, []
    return lm, list(family.vision_sizes(vision).linear_inputs)


def _activation_rows(cfg, counts, family: families.Family, text, vision, budget: BatchBudget,
                     dtypes: ActivationDtypes) -> List[tuple]:
    model_cfg, adapter_cfg = cfg.model, cfg.adapter
    a, residual = dtypes.autocast, dtypes.residual
    h, layers = text.hidden_size, text.num_hidden_layers
    sizes, depth, vision_heads = family.vision_sizes(vision), vision.depth, vision.num_heads
    d = sizes.width
    lm_trainable = not adapter_cfg.is_peft and not model_cfg.freeze_language_model
    vision_trainable = not adapter_cfg.is_peft and not model_cfg.freeze_vision_tower
    if adapter_cfg.is_peft and not model_cfg.freeze_vision_tower and not adapter_cfg.vision_lora:
        vision_trainable = True  # modules_to_save: the blocks train in full
    lm_lora, vision_lora = _lora_inputs(cfg, counts, family, text, vision)
    r = adapter_cfg.r
    T, P = budget.tokens, budget.vision_patches
    rows = []

    mask = 1 if adapter_cfg.dropout > 0 else 0  # no dropout: no mask (adapters on q/k/v then share one input)
    layer = family.layer_bytes(text, a, lm_trainable, lm_lora, r, mask, mlp_bytes=dtypes.linear)
    if model_cfg.gradient_checkpointing:
        saved = layers * residual * h * T
        working = layer * T  # one layer recomputed in the backward
        how = (f"checkpointed: {layers} layer inputs ({residual} B) x {T} tokens, + one layer recomputed "
               f"({layer} B/token)")
    else:
        saved, working = layers * layer * T, 0
        how = f"{layers} layers x {T} tokens x {layer} B/token"
    rows.append(("activations: LM", saved + working, how))

    # TRL's fused LM head keeps the final hidden states; its backward works on token x vocabulary tiles and
    # accumulates the hidden-state gradient (and the head's own, when it trains) in fp32. A head weight that is
    # not in the autocast dtype is cast one vocabulary tile at a time.
    vocab = text.vocab_size
    tile = min(T, TOKEN_TILE) * min(vocab, VOCAB_TILE) * a
    head = residual * h * T + 2 * tile + 4 * h * T
    how = f"fused head: hidden states, two {min(T, TOKEN_TILE)}x{min(vocab, VOCAB_TILE)} tiles, fp32 gradients"
    if residual != a:
        head += min(vocab, VOCAB_TILE) * h * a
        how += ", a weight tile cast"
    if lm_trainable:
        head += 4 * vocab * h
    rows.append(("activations: LM head", head, how))

    grads_reach_vision = vision_trainable or bool(vision_lora)
    if P and grads_reach_vision:
        block = family.vision_block_bytes(sizes, vision_heads, a, vision_trainable, vision_lora, r, mask)
        if model_cfg.vision_checkpointing:
            vis, how = depth * a * d * P + block * P, f"checkpointed: {depth} block inputs x {P} patches + one block"
        else:
            vis, how = depth * block * P, f"{depth} blocks x {P} patches x {block} B/patch"
        if vision_trainable:
            vis += a * P * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2  # patch embed
        rows.append(("activations: vision", vis, how))
    elif P:
        working_set = dtypes.linear * P * (3 * d + sizes.mlp_tensors * sizes.mlp) + a * h * budget.visual_tokens
        rows.append(("activations: vision", working_set,
                     f"frozen: no saved tensors; one block's working set over {P} patches"))
    if P and (not model_cfg.freeze_merger or grads_reach_vision):
        rows.append(("activations: merger", family.projector_bytes(vision, a, P, budget.visual_tokens),
                     f"{len(family.projectors)} projector module(s) over {P} patches"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# model FLOPs of a training step (MFU: qwenvl_ft/training/telemetry.py divides them by the device's peak)


@dataclass
class StepWork:
    """What a training step processed, by what model FLOPs scale with: counted from the real batches by the run's
    telemetry (`batch_work`), or the worst-case batch for the estimate (`worst_case_work`)."""

    tokens: float = 0  # real (non-padding) language-model tokens
    token_pairs: float = 0  # sum over sequences of length^2: causal attention stays within each sequence
    patches: float = 0  # ViT patches the vision tower encodes
    frame_pairs: float = 0  # sum over frames of (patches per frame)^2: full-attention ViT blocks
    window_pairs: float = 0  # sum over windows of (patches per window)^2: window-attention blocks (Qwen2.5-VL)

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple:
        return self.tokens, self.token_pairs, self.patches, self.frame_pairs, self.window_pairs


@dataclass
class TrainingFlops:
    """Model FLOPs of one training step, per unit of `StepWork` (forward + backward, and DPO's reference forward).

    Convention (PaLM's and torchtitan's model FLOPs): 2 per multiply-add of every Linear (and the patch embedding);
    the backward costs 2 for the input gradient wherever gradients pass and 2 more for the weight gradient where
    weights train, so 6N for trained, 4N for frozen layers gradients pass through, 2N for a frozen vision tower
    they never reach (4-bit weights count as the matmuls they stand for; LoRA factors add 6 r (in + out)).
    Attention adds 4 x width per (query, key) pair per layer forward, twice that backward; causal attention is
    counted over the whole square, as in those formulas and torch.utils.flop_counter. Not counted: elementwise
    work (norms, activations, RoPE, softmax), gradient-checkpointing recomputation (hardware FLOPs would be about
    a third higher with it), DoRA's per-step weight norms, and input gradients skipped before the first trained
    layer (the first decoder layer's projections under LoRA). tests/test_telemetry.py checks the formulas against
    torch.utils.flop_counter.FlopCounterMode on the real model code.
    """

    per_token: float
    per_token_pair: float
    per_patch: float
    per_frame_pair: float
    per_window_pair: float

    def step(self, work: StepWork) -> float:
        return (self.per_token * work.tokens + self.per_token_pair * work.token_pairs + self.per_patch * work.patches
                + self.per_frame_pair * work.frame_pairs + self.per_window_pair * work.window_pairs)

    def __add__(self, other: "TrainingFlops") -> "TrainingFlops":
        return TrainingFlops(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple:
        return self.per_token, self.per_token_pair, self.per_patch, self.per_frame_pair, self.per_window_pair


@dataclass
class _PartMatmuls:
    """Multiply-adds per item of one part of the model (what each of its Linears / the patch embedding holds)."""

    base: int = 0  # weights of the base model's Linears
    trained: int = 0  # of which train (full fine-tuning, or PEFT's modules_to_save copies)
    lora: int = 0  # LoRA factors r x (in + out) on this part's Linears


def _part_matmuls(cfg: TrainConfig, model) -> Dict[str, _PartMatmuls]:
    """Linear weights of the patch embedding, ViT blocks, merger, decoder and LM head, and which of them train,
    decided by the run's own builders (`apply_freezing`, `build_lora_config`) as in `count_parameters`."""
    from torch import nn

    from qwenvl_ft.families.base import attribute
    from qwenvl_ft.modeling.build import apply_freezing, build_lora_config, model_parts

    model_cfg, adapter_cfg = cfg.model, cfg.adapter
    found, family = model_parts(model), families.of_model(model)
    stem = [attribute(model, path) for path in family.vision_stem]  # patch embedding (+ learned positions)
    owner = {}
    for part, modules in (("decoder", [found.language_model]), ("vision", [found.vision]),
                          ("merger", found.projectors), ("patch_embed", stem)):  # the last match wins: nested
        for module in modules:                                                  # parts override
            owner.update({id(m): part for m in module.modules()})
    lora_pattern, saved = None, []
    if adapter_cfg.method == AdapterMethod.full:
        apply_freezing(model, model_cfg)
    else:
        lora_cfg = build_lora_config(model, model_cfg, adapter_cfg)
        lora_pattern, saved = re.compile(lora_cfg.target_modules), list(lora_cfg.modules_to_save or [])
    parts = {name: _PartMatmuls() for name in ("patch_embed", "vision", "merger", "decoder", "lm_head")}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv3d)):
            continue
        part = parts[owner.get(id(module), "lm_head")]
        weights = module.weight.numel()
        part.base += weights
        if lora_pattern is None:
            part.trained += weights if module.weight.requires_grad else 0
            continue
        if lora_pattern.fullmatch(name):
            part.lora += adapter_cfg.r * (module.in_features + module.out_features)
        if any(name == key or name.startswith(key + ".") for key in saved):  # full paths (build_lora_config)
            part.trained += weights
    return parts


def training_flops(cfg: TrainConfig, model=None) -> TrainingFlops:
    """Model FLOPs per unit of work of one training step of this config (see `TrainingFlops`), from the model's
    architecture on the meta device: the same config objects and builders the memory estimate uses."""
    model = model if model is not None else meta_model(cfg.model)
    config = model.config
    text, vision = config.get_text_config(), config.vision_config
    parts = _part_matmuls(cfg, model)
    merge_unit = vision.spatial_merge_size ** 2  # the projectors run once per merge_unit patches
    trains = {name: bool(p.trained or p.lora) for name, p in parts.items()}
    vision_reached = trains["patch_embed"] or trains["vision"]

    def matmuls(part: _PartMatmuls, reached: bool) -> float:
        return 2 * part.base + (2 * part.base if reached else 0) + 2 * part.trained + 6 * part.lora

    # the patch embedding's input is the pixels: it never needs an input gradient
    per_patch = (matmuls(parts["patch_embed"], False) + matmuls(parts["vision"], vision_reached)
                 + matmuls(parts["merger"], vision_reached or trains["merger"]) / merge_unit)
    per_token = matmuls(parts["decoder"], True) + matmuls(parts["lm_head"], True)
    heads = text.num_attention_heads
    lm_width = heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
    per_token_pair = 3 * 4 * lm_width * text.num_hidden_layers
    vision_width, full_blocks, window_blocks = vision_attention_blocks(config)
    vision_attention = (3 if vision_reached else 1) * 4 * vision_width
    flops = TrainingFlops(per_token, per_token_pair, per_patch, vision_attention * full_blocks,
                          vision_attention * window_blocks)
    for _ in range(methods.get(cfg.trainer.kind).reference_forwards(cfg)):
        flops = flops + _base_forward(parts, config)
    return flops


def forward_flops(cfg: TrainConfig, model=None) -> TrainingFlops:
    """One forward of the base model, without adapters: what DPO's reference policy costs per step (the adapter
    disabled, or the frozen copy), in the units of `TrainingFlops`."""
    model = model if model is not None else meta_model(cfg.model)
    return _base_forward(_part_matmuls(cfg, model), model.config)


def _base_forward(parts: Dict[str, _PartMatmuls], config) -> TrainingFlops:
    text, vision = config.get_text_config(), config.vision_config
    heads = text.num_attention_heads
    lm_width = heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
    vision_width, full_blocks, window_blocks = vision_attention_blocks(config)
    merge_unit = vision.spatial_merge_size ** 2
    return TrainingFlops(2 * (parts["decoder"].base + parts["lm_head"].base),
                         4 * lm_width * text.num_hidden_layers,
                         2 * (parts["patch_embed"].base + parts["vision"].base + parts["merger"].base / merge_unit),
                         4 * vision_width * full_blocks, 4 * vision_width * window_blocks)


def vision_attention_blocks(config) -> tuple:
    """(attention width, blocks attending over a whole frame, blocks attending within windows) of the model config's
    ViT: a ViT config that names full-attention blocks and a window size attends within windows in the other
    blocks; one without them attends over each frame in every block."""
    vision = config.vision_config
    width = families.of_config(config).vision_sizes(vision).width
    if getattr(vision, "window_size", None) and getattr(vision, "fullatt_block_indexes", None) is not None:
        full = len(vision.fullatt_block_indexes)
        return width, full, vision.depth - full
    return width, vision.depth, 0


def vision_attention_pairs(grid_thw, vision) -> tuple:
    """(frame pairs, window pairs) of `StepWork` for images/videos of these (t, h, w) patch grids, as tensors on
    the grids' device (no host synchronisation): every frame attends within itself; a window-attention block
    within windows of `window_size` pixels, i.e. `window_size // merge // patch` merged units a side, the last
    window of a row or column holding the remainder (transformers' `get_vision_window_index`)."""
    grid = grid_thw.long()
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    frame_pairs = (t * (h * w) ** 2).sum()
    window_size = getattr(vision, "window_size", None)
    if not window_size or getattr(vision, "fullatt_block_indexes", None) is None:
        return frame_pairs, frame_pairs * 0
    merge = vision.spatial_merge_size
    side = window_size // merge // vision.patch_size

    def squares(units):  # sum of squared window extents along one axis, in merged units
        return (units // side) * side * side + (units % side) ** 2

    window_pairs = (t * merge ** 4 * squares(h // merge) * squares(w // merge)).sum()
    return frame_pairs, window_pairs


def worst_case_work(budget: BatchBudget, vision) -> StepWork:
    """The estimate's batch as work: every row at its full length, each row's image budget in one image."""
    per_row_tokens = budget.tokens / budget.rows
    images = budget.vision_patches / budget.row_patches if budget.row_patches else 0
    window = getattr(vision, "window_size", None)
    side = window // vision.patch_size if window else 0
    return StepWork(budget.tokens, budget.rows * per_row_tokens ** 2, budget.vision_patches,
                    images * budget.row_patches ** 2, budget.vision_patches * min(side * side, budget.row_patches))


# ----------------------------------------------------------------------------------------------------------------
# the command


def estimate(composed: DictConfig) -> Dict:
    from qwenvl_ft.config.compose import validate

    cfg: TrainConfig = validate(composed)
    model = meta_model(cfg.model)
    result = estimate_memory(cfg, model)
    c, b = result.counts, result.budget
    parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(c.by_part.items()))
    print(f"model: {cfg.model.name_or_path} ({cfg.model.family.value}), {c.total / 1e9:.3f}B parameters "
          f"({parts})")
    print(f"training: {cfg.adapter.method.value}, {c.trainable / 1e6:.2f}M trainable "
          f"({100 * c.trainable / c.total:.2f}%), gradient checkpointing "
          f"{'on' if cfg.model.gradient_checkpointing else 'off'}")
    print(f"batch per device step: {b.note}")
    print(result.table())
    flops = training_flops(cfg, model)
    work = worst_case_work(b, model.config.vision_config)
    step_flops = flops.step(work)
    reference = ", reference forward" if _has_reference(cfg) else ""
    print(f"model FLOPs per device step of this batch: {step_flops / 1e12:.2f} TFLOP, "
          f"{step_flops / b.tokens / 1e9:.2f} GFLOP per token (forward + backward{reference}; "
          f"the run's telemetry divides the FLOP/s of its real batches by the GPU's peak for MFU)")
    sharded, fits = sharding(cfg, result, model)
    out = {"predicted_peak_gib": round(result.total / GiB, 2), "parameters": c.total, "trainable": c.trainable,
           "tokens_per_step": b.tokens, "components_gib": {n: round(v / GiB, 3) for n, v, _ in result.rows},
           "model_tflop_per_step": round(step_flops / 1e12, 3), "model_flops_per_token": step_flops / b.tokens,
           "per_gpu_gib_by_dist": sharded, "fits": fits}
    measured = measured_data(cfg)
    if measured is not None:
        data_cfg, source = measured
        again = estimate_memory(dataclasses.replace(cfg, data=data_cfg))
        print(f"with the measured data ({source}): longest row {data_cfg.max_length} tokens, at most "
              f"{data_cfg.max_visual_tokens} visual tokens per row -> batch: {again.budget.note}")
        print(f"{'predicted peak (measured)':<26} {again.total / GiB:8.2f}")
        out["predicted_peak_gib_measured_data"] = round(again.total / GiB, 2)
    return out


def _has_reference(cfg: TrainConfig) -> bool:
    return methods.get(cfg.trainer.kind).reference_forwards(cfg) > 0


# ----------------------------------------------------------------------------------------------------------------
# the sharding section: per GPU for each dist option and world size (qwenvl_ft/distributed/memory.py)


def single_process_parts(cfg: TrainConfig, result: Estimate, model):
    """The single-process estimate in the terms the engines shard by."""
    from qwenvl_ft.distributed import memory
    from qwenvl_ft.distributed.fsdp import wrap_classes

    by_name = {name: b for name, b, _ in result.rows}
    weights = sum(b for name, b, _ in result.rows if name.startswith("weights"))
    w = DTYPE_BYTES[cfg.model.dtype.value]
    if cfg.adapter.is_peft:
        trained = by_name.get("adapter weights", 0)
    else:
        trained = result.counts.trainable * w
    classes = set(wrap_classes(cfg))
    unit = max((sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in classes),
               default=0)
    return memory.SingleProcess(
        frozen_weights=weights - (0 if cfg.adapter.is_peft else trained), trained_weights=trained,
        gradients=by_name["gradients"], optimizer=by_name["optimizer states"],
        reference=by_name.get("reference model", 0),
        activations=sum(b for name, b, _ in result.rows if name.startswith("activations")),
        trained_params=result.counts.trainable, base_params=result.counts.total,
        adapter_params=result.counts.trainable if cfg.adapter.is_peft else 0,
        quantized_params=result.counts.quantized, quantized_bytes=by_name.get("weights (4-bit)", 0), unit_params=unit,
        dtype_bytes=w, mixed_precision=cfg.trainer.precision != Precision.fp32)


def sharding(cfg: TrainConfig, result: Estimate, model) -> tuple:
    from qwenvl_ft.distributed import memory

    dist = cfg.dist
    worlds = list(memory.WORLD_SIZES)
    if dist.num_processes is not None:
        worlds.append(dist.num_processes * dist.num_machines)
    table, gib, fits = memory.table(single_process_parts(cfg, result, model), tuple(worlds), dist.gpu_memory_gib)
    print(f"\nper GPU by dist option and world size (GiB, same per-device batch; what each engine keeps: "
          f"qwenvl_ft/distributed/memory.py):\n{table}")
    if cfg.adapter.load_in_4bit:
        print("(QLoRA: zero3 and fsdp cannot split 4-bit weights, so only ddp and zero2 are listed)")
    print("\n".join(fits))
    return gib, fits


def measured_data(cfg: TrainConfig):
    """(data config bounded by what the data check measured, where from), or None.

    The worst case above assumes rows of data.max_length holding the whole image budget. When the run folder
    holds a data_check.json of the same data, settings and training method (`qwenvl-ft data-check`, or a training
    start, with the same run_name), its longest row and its most visual tokens in one row bound the batch instead:
    the data check measured every row once (a pair's longer side for DPO, a prompt for GRPO, whose completion
    `Method.batch_data` adds), and its numbers are reused rather than estimated again.
    """
    import json
    from pathlib import Path

    from qwenvl_ft.data.cache import data_key

    path = Path(cfg.output_dir) / "data_check.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        train = report["summary"]["train"]
        same_method = report["settings"].get("method", "sft") == methods.get(cfg.trainer.kind).name
        if report["settings"].get("data_key") != data_key(cfg.data) or not same_method:
            log.info("%s describes other data or settings; not used", path)
            return None
        longest = int(train["sequence_length"]["max"])
        visual = int(train.get("visual_tokens_per_row", {}).get("max", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    d = cfg.data
    max_length = min(longest, d.max_length) if d.max_length else longest
    visual = max(1, min(visual, d.max_visual_tokens) if d.max_visual_tokens else visual)
    return dataclasses.replace(d, max_length=max_length, max_visual_tokens=visual), str(path)
