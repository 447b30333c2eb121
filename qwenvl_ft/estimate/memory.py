"""Peak GPU memory of a training run, predicted from the config before anything loads (`qwenvl-ft estimate`).

Parameters are counted on a model built on PyTorch's meta device (estimate/counts.py), by the same builders the
run uses, so the estimate cannot disagree with the run about what is trained.

Bytes:
  weights      dtype bytes per parameter; 4-bit NF4: 0.5 byte + its absmax (1 byte per 64 with double
               quantisation, else 4 per 64); every parameter that is not 4-bit (embeddings, lm_head, norms,
               biases) stays in model.dtype, unless adapter.qlora_fp32_upcast casts it to fp32 (PEFT's
               `prepare_model_for_kbit_training`); adapters: `adapter_bytes`
  gradients    one per trainable parameter, in its dtype
  optimizer    AdamW: two states per trainable parameter in its dtype; 8-bit AdamW: two bytes
  activations  autograd's saved tensors, counted per token from transformers' code of the model's family (the
               family declares its per-block terms: qwenvl_ft/families, `decoder_layer_bytes`,
               `vision_block_bytes`), plus the backward's working set; tests/test_estimate.py measures the saved
               tensors of the real code on CPU, for every family, and checks the formulas against them
A batch is the worst case of the configured layout (estimate/budget.py): padded rows of data.max_length, or a
full pack / token budget, each row holding its image budget (data.max_visual_tokens, else the images at
data.max_pixels, else at the family's processor default).
Not counted: the CUDA context (~0.5 GiB, outside PyTorch's allocator) and fragmentation (typically 5-15%).
The prediction is for `torch.cuda.max_memory_allocated()`. On an H200 it was 4-5% above the measured peak for the
largest batch a run saw (2B LoRA padded and packed, QLoRA packed; docs/performance.md, "Memory estimate").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from qwenvl_ft import families, methods
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.config.trainer import Precision
from qwenvl_ft.estimate import experts
from qwenvl_ft.estimate.budget import BatchBudget, batch_budget
from qwenvl_ft.estimate.counts import ParameterCounts, count_parameters, hf_config, meta_model
from qwenvl_ft.estimate.layers import hybrid_layer_bytes, recurrent_state_rows
from qwenvl_ft.families.base import FULL_ATTENTION, language_linear_inputs, layer_kinds

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # TRL's fused LM head works on tiles of this many tokens x vocabulary rows


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
              weight's dtype; fp32 under QLoRA with adapter.qlora_fp32_upcast (it casts norms and embeddings)
              and for an fp32 model under bf16 autocast. The LM head weight has it too, and TRL's fused head
              casts that weight to the autocast dtype one vocabulary tile at a time.
    linear    a Linear's output: the autocast dtype, except a 4-bit one's, which bitsandbytes casts back to its
              input's dtype (the residual's: a norm's output, or the output of the 4-bit Linears before it)
    """

    autocast: int
    residual: int
    linear: int

    @classmethod
    def of(cls, counts: ParameterCounts, weight_bytes: int, autocast: int) -> "ActivationDtypes":
        residual = 4 if counts.fp32_base else weight_bytes
        return cls(autocast, residual, residual if counts.quantized else autocast)


def estimate_memory(cfg: TrainConfig, model=None, budget: Optional[BatchBudget] = None) -> Estimate:
    """The predicted peak of `cfg`, for the worst-case batch of its layout unless `budget` gives another batch
    (bench/gpu_throughput.py checks the formulas against the largest batch a run really saw)."""
    model_cfg, adapter_cfg, data_cfg, trainer_cfg = cfg.model, cfg.adapter, cfg.data, cfg.trainer
    model = model if model is not None else meta_model(model_cfg)
    counts = count_parameters(cfg, model)
    config = model.config
    text, vision = config.get_text_config(), config.vision_config
    family = families.of_config(config)
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
        why = ("adapter.qlora_fp32_upcast casts every non-4-bit parameter to fp32" if counts.quantized and w != 4
               else "model.dtype=float32")
        rows.append(("weights (fp32)", counts.fp32_base * 4, f"{counts.fp32_base / 1e9:.2f}B params x 4 B ({why})"))
    if counts.base_other:
        rows.append((f"weights ({model_cfg.dtype.value})", counts.base_other * w,
                     f"{counts.base_other / 1e9:.2f}B params x {w} B"))

    if adapter_cfg.is_peft:
        factor, copy = adapter_bytes(counts, w, trainer_cfg.precision != Precision.fp32)
        weights = (counts.lora - counts.dora_magnitudes) * factor + counts.dora_magnitudes * 4
        weights += counts.saved_copies * copy
        rows.append(("adapter weights", weights,
                     f"LoRA r={adapter_cfg.r}: {counts.lora / 1e6:.1f}M params, {factor} B each"
                     + (f" + {counts.saved_copies / 1e6:.1f}M modules_to_save copies" if counts.saved_copies else "")
                     + (" (TRL's bf16 cast on a 4-bit base)" if counts.quantized else "")))
        grad_bytes = weights
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
    budget = budget or batch_budget(method.batch_data(cfg), trainer_cfg.batch_size, family,
                                    pairs=method.sequences_per_row() == 2)
    rows += _activation_rows(cfg, counts, family, text, vision, budget, ActivationDtypes.of(counts, w, a), model)
    return Estimate(rows, counts, budget)


def adapter_bytes(counts: ParameterCounts, weight_bytes: int, autocast: bool) -> tuple:
    """Bytes per LoRA factor and per parameter of a modules_to_save copy. PEFT makes LoRA factors fp32
    (autocast_adapter_dtype) and copies keep their original's dtype (model.dtype, or fp32 under
    adapter.qlora_fp32_upcast). On a 4-bit base TRL's trainers then cast every trainable parameter but DoRA's
    magnitude vectors to bf16, and in a run without autocast training/trainer.py's restore_fully_trained_modules
    gives the copies model.dtype back."""
    if not counts.quantized:
        return 4, weight_bytes
    return 2, 2 if autocast else weight_bytes


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
        attention_layers = layer_kinds(text).count(FULL_ATTENTION)  # recurrent layers keep a state instead
        per_token = 2 * attention_layers * text.num_key_value_heads * head_dim * weight_bytes
        rows.append(("generation: KV cache", per_token * tokens,
                     f"{completions} completions x ({batch.prompt_tokens} prompt + {batch.new_tokens} "
                     f"generated) tokens x {per_token} B; freed before the loss forward, so an upper bound"))
        rows += recurrent_state_rows(text, completions)
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
    width = language_linear_inputs(experts.dense_view(text, family))  # MoE: the shared expert's Linears
    layers = text.num_hidden_layers
    lm = []
    for leaf, n in counts.lora_modules.items():
        if leaf in width:
            lm += [width[leaf]] * max(1, n // layers)
    if not cfg.adapter.vision_lora:
        return lm, []
    return lm, list(family.vision_sizes(vision).linear_inputs)


def _decoder_row(cfg, counts, family: families.Family, text, T: int, dtypes: ActivationDtypes, trainable: bool,
                 lm_lora, mask: int) -> tuple:
    """The decoder layers' saved tensors: per token (the family's formula, with expert terms for a
    mixture-of-experts family) and per layer (LoRA-folded expert weights; estimate/experts.py)."""
    model_cfg, adapter_cfg = cfg.model, cfg.adapter
    residual, h, layers = dtypes.residual, text.hidden_size, text.num_hidden_layers
    adapted = family.adapted_experts(adapter_cfg.target_modules) if counts.expert_lora else []
    layer, folded = experts.layer_bytes(family, text, dtypes.autocast, trainable, lm_lora, adapter_cfg.r, mask,
                                        dtypes.linear, adapted, DTYPE_BYTES[model_cfg.dtype.value])
    if model_cfg.gradient_checkpointing:
        saved = layers * residual * h * T
        working = layer * T + folded  # one layer recomputed in the backward
        how = (f"checkpointed: {layers} layer inputs ({residual} B) x {T} tokens, + one layer recomputed "
               f"({layer} B/token)")
    else:
        saved, working = layers * (layer * T + folded), 0
        how = f"{layers} layers x {T} tokens x {layer} B/token"
    if adapted:
        how += f", + {folded / GiB:.2f} GiB per layer of LoRA-folded expert weights"
    return "activations: LM", saved + working, how


def _activation_rows(cfg, counts, family: families.Family, text, vision, budget: BatchBudget,
                     dtypes: ActivationDtypes, model=None) -> List[tuple]:
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
    if family.kind_layer_bytes is not None:  # layers of different kinds (Gated DeltaNet and attention)
        rows.append(_kinds_of_layers_row(cfg, counts, family, text, T, dtypes, lm_trainable, mask, model))
    else:
        rows.append(_decoder_row(cfg, counts, family, text, T, dtypes, lm_trainable, lm_lora, mask))

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


def _layers_row(checkpointing: bool, layers: int, layer: int, residual: int, hidden: int, tokens: int) -> tuple:
    """The language model's activations when every layer is alike: `layer` bytes per token each; checkpointing
    keeps each layer's input (`hidden` values of `residual` bytes per token) and recomputes one layer."""
    if checkpointing:
        how = (f"checkpointed: {layers} layer inputs ({residual} B) x {tokens} tokens, + one layer recomputed "
               f"({layer} B/token)")
        return ("activations: LM", layers * residual * hidden * tokens + layer * tokens, how)
    return ("activations: LM", layers * layer * tokens, f"{layers} layers x {tokens} tokens x {layer} B/token")


def _kinds_of_layers_row(cfg, counts, family: families.Family, text, tokens: int, dtypes: ActivationDtypes,
                         lm_trainable: bool, mask: int, model) -> tuple:
    """The language model's activations when its layers differ in kind (estimate/layers.py), on transformers'
    torch path of the Gated DeltaNet layers (flash-linear-attention's kernels keep less)."""
    model = model if model is not None else meta_model(cfg.model)
    lora_modules = counts.lora_modules if cfg.adapter.is_peft else {}
    adapted = family.adapted_experts(cfg.adapter.target_modules) if counts.expert_lora else []
    # a mixture-of-experts layer: the kind's formula with the shared expert as its MLP, plus the routed experts
    found = hybrid_layer_bytes(model, family, experts.dense_view(text, family), lora_modules, dtypes.autocast,
                               lm_trainable, cfg.adapter.r, mask, dtypes.linear,
                               extra=experts.routed_bytes(text, family, dtypes.autocast, lm_trainable, adapted))
    folded = experts.folded_weight_bytes(text, family, DTYPE_BYTES[cfg.model.dtype.value], adapted)
    if cfg.model.gradient_checkpointing:
        layers = len(found.per_layer)
        saved = layers * dtypes.residual * text.hidden_size * tokens
        working = max(found.per_layer) * tokens + folded  # the largest layer recomputed in the backward
        how = (f"checkpointed: {layers} layer inputs ({dtypes.residual} B) x {tokens} tokens, + the largest layer "
               f"recomputed ({found.describe()}; DeltaNet on the torch path)")
    else:
        saved, working = sum(found.per_layer) * tokens + len(found.per_layer) * folded, 0
        how = f"{found.describe()}, x {tokens} tokens (DeltaNet on the torch path)"
    if adapted:
        how += f", + {folded / GiB:.2f} GiB per layer of LoRA-folded expert weights"
    return ("activations: LM", int(saved + working), how)
