"""The `Family` declaration type, and what the family modules share.

A family module (`qwenvl_ft/families/<name>.py`) declares one `Family`: data (the transformers classes by name,
attribute paths, patch and merge sizes, which inputs and outputs the hooks must carry) plus a few small functions
(`smart_resize`, the M-RoPE positions of one sample, the video placeholder, a random model's config and processor,
the estimate's per-block activation bytes). Code outside this package reads the declaration and never compares
family names, so adding a family is one module here plus one `conf/model/*.yaml`.

Nothing here imports torch or transformers at module level: `qwenvl_ft.config.schema` imports this package to
list the families, and composing a config must stay torch-free. The functions import what they need when called.
Every function a declaration holds is a module-level function, so that a collator carrying one (or a
`functools.partial` of one) pickles into DataLoader workers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.grounding.convention import BoxConvention

# Values of mm_token_type_ids (transformers' ProcessorMixin.create_mm_token_type_ids).
TEXT, IMAGE, VIDEO = 0, 1, 2

# The language-model projections of every Qwen decoder layer: what adapter.target_modules may name.
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What the MLP names of adapter.target_modules mean on a mixture-of-experts decoder layer, whose routed experts are
# fused 3-D parameters (experts x out x in) instead of Linear layers: the experts' MLPs. gate_proj and up_proj
# share one fused parameter (one LoRA per expert adapts both halves), down_proj has its own. A shared expert's
# Linear layers (Qwen3.5 MoE: mlp.shared_expert.{gate,up,down}_proj) carry the names themselves. The router
# (mlp.gate) is never a target: it stays as released.
EXPERT_MLP_TARGETS = (("gate_proj", "mlp.experts.gate_up_proj"), ("up_proj", "mlp.experts.gate_up_proj"),
                      ("down_proj", "mlp.experts.down_proj"))


@lru_cache(maxsize=None)
def load(name: str) -> Any:
    """A transformers class by name (`Qwen2VLConfig`), or any `module.path:attribute`, imported on first use."""
    module, _, attribute = name.rpartition(":")
    return getattr(import_module(module or "transformers"), attribute)


@dataclass
class ModelParts:
    """The modules of one model that freezing, LoRA, learning rates, hooks and the estimate address."""

    vision: Any  # the vision tower: patch embedding (+ learned positions), blocks, and the projectors inside it
    projectors: List[Any]  # vision features -> language-model width: the merger (+ DeepStack mergers)
    language_model: Any  # embeddings, decoder layers, final norm (not lm_head)
    vision_blocks: Any  # the ViT blocks (a ModuleList)
    decoder_layers: Any  # the decoder layers (a ModuleList)

    @property
    def merger(self) -> Any:
        return self.projectors[0]


@dataclass(frozen=True)
class VisionSizes:
    """What the estimate needs of one ViT block."""

    width: int
    mlp: int  # MLP width
    mlp_tensors: int  # MLP-width tensors alive at once in a frozen block's forward: 2 for a gated MLP, else 1
    linear_inputs: Tuple[int, ...]  # in_features of every Linear of one block (what adapter.vision_lora adapts)


def attribute(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name)
    return root


# ----------------------------------------------------------------------------------------------------------------
# M-RoPE positions of one sample (packing): the model's get_rope_index, per sample, on CPU


def mrope_positions(token_types: Sequence[int], image_grids: Sequence[Sequence[int]],
                    video_grids: Sequence[Sequence[int]], merge_size: int,
                    video_intervals: Optional[Sequence[float]] = None):
    """(3, len) M-RoPE positions of one sample, as `get_rope_index` numbers a batch of one.

    Text tokens count up on all three axes. A vision span starting at `start` gets (start + t * interval,
    start + row, start + column) on its merged grid, and the text after it resumes at start + max(rows, columns).
    `interval` is 1 unless `video_intervals` gives one per video (temporal positions spaced by time).
    """
    import torch

    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    intervals = iter(video_intervals) if video_intervals is not None else None
    pieces, current = [], 0
    for token_type, group in itertools.groupby(token_types):
        length = len(list(group))
        if token_type == TEXT:
            pieces.append(torch.arange(current, current + length).expand(3, -1))
            current += length
            continue
        t, h, w = next(grids[token_type])
        h, w = h // merge_size, w // merge_size
        if t * h * w != length:
            raise ValueError(f"a vision span has {length} tokens but its grid {t}x{h}x{w} needs {t * h * w}")
        interval = next(intervals) if token_type == VIDEO and intervals is not None else 1
        tt, hh, ww = torch.meshgrid((torch.arange(t) * interval).long(), torch.arange(h), torch.arange(w),
                                    indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
        current += max(h, w)
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def grids(sample: Dict[str, Any], key: str) -> List[List[int]]:
    value = sample.get(key)
    return value.tolist() if value is not None else []


def sample_positions(sample: Dict[str, Any], merge_size: int):
    """Positions of one encoded sample (input_ids, mm_token_type_ids, *_grid_thw): images and videos alike."""
    return mrope_positions(sample["mm_token_type_ids"].tolist(), grids(sample, "image_grid_thw"),
                           grids(sample, "video_grid_thw"), merge_size)


def merge_setting(config: Any) -> Dict[str, Any]:
    """What `positions` needs of a model config besides the sample."""
    return {"merge_size": config.vision_config.spatial_merge_size}


# ----------------------------------------------------------------------------------------------------------------
# video placeholders


def video_pad_tokens(grid: Sequence[int], frame_times: Sequence[float], temporal_patch_size: int, merge_size: int,
                     ids: Dict[str, int], encode: Callable[[str], List[int]]) -> List[int]:
    """What one <|video_pad|> expands to: one pad per visual token."""
    t, h, w = grid
    return [ids["video_pad"]] * (t * h * w // merge_size ** 2)


# ----------------------------------------------------------------------------------------------------------------
# random models


def no_problems(arch: Any) -> List[str]:
    return []


def special_token_ids(tokenizer) -> Dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>")}


def vision_token_ids(tokenizer) -> Dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def text_config(arch: Any, tokenizer, **extra) -> Dict[str, Any]:
    """The language model's config of a random model of these sizes (`extra`: family-specific keys)."""
    rope = {"rope_type": "default", "rope_theta": arch.rope_theta, "mrope_section": list(arch.mrope_section)}
    rope.update(extra.pop("rope_parameters", {}))
    return dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=1e-6, rope_parameters=rope, tie_word_embeddings=arch.tie_word_embeddings,
        **special_token_ids(tokenizer), **extra,
    )


def moe_settings(arch: Any) -> dict:
    """The text-config keys of a mixture-of-experts MLP (both MoE families)."""
    return dict(num_experts=arch.num_experts, num_experts_per_tok=arch.num_experts_per_tok,
                moe_intermediate_size=arch.moe_intermediate_size)


def moe_problems(arch: Any, family: str) -> List[str]:
    if arch.num_experts < 1 or arch.moe_intermediate_size is None:
        return [f"model.architecture.num_experts, num_experts_per_tok and moe_intermediate_size are required for "
                f"family={family}"]
    return []


def moe_config(dense: Any, config_class: str, text_class: str, **moe: Any):
    """The mixture-of-experts config of a dense family's random config: its text settings that the MoE text config
    has (the layer pattern, attention, rotary, token ids), the MoE MLP settings, and its vision config as it is."""
    import dataclasses

    import transformers

    fields = {f.name for f in dataclasses.fields(getattr(transformers, text_class))} - {"transformers_version",
                                                                                      "architectures"}
    text = {key: value for key, value in dense.text_config.to_dict().items() if key in fields}
    text.update(moe)
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return getattr(transformers, config_class)(text_config=text, vision_config=dense.vision_config.to_dict(),
                                               tie_word_embeddings=dense.tie_word_embeddings,
                                               **{key: getattr(dense, key) for key in ids})


def qwen_processor(processor_class: str, tokenizer, arch: Any, chat_template: str, image_processor: Dict,
                   video_processor_class: str, video_processor: Dict):
    """A processor around the in-process tokenizer, sized as `arch` says."""
    sizes = dict(patch_size=arch.patch_size, temporal_patch_size=arch.temporal_patch_size,
                 merge_size=arch.spatial_merge_size)
    return load(processor_class)(
        image_processor=load("Qwen2VLImageProcessor")(**sizes, **image_processor),
        video_processor=load(video_processor_class)(**sizes, **video_processor),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


# ----------------------------------------------------------------------------------------------------------------
# activation bytes (the estimate), per token / per patch, from the saved tensors of transformers' code;
# tests/test_estimate.py measures autograd's saved tensors of the real code on CPU and checks these against them


LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"  # transformers' config.layer_types


def layer_kinds(text: Any) -> List[str]:
    """The kind of each decoder layer, as the config lays them out (`layer_types`; all attention without it)."""
    return list(getattr(text, "layer_types", None) or [FULL_ATTENTION] * text.num_hidden_layers)


def lora_bytes(in_features: int, r: int, a: int, mask_bytes: int) -> int:
    """lora_A keeps its dropped-out input, lora_B keeps lora_A's output, dropout keeps its mask (a bool on CUDA;
    PyTorch's CPU dropout multiplies by a float mask instead, hence the parameter)."""
    return (a + mask_bytes) * in_features + a * r


def head_dim(text: Any) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def language_linear_inputs(text: Any) -> Dict[str, int]:
    """in_features of each projection of one decoder layer."""
    h = text.hidden_size
    return {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": text.num_attention_heads * head_dim(text),
            "gate_proj": h, "up_proj": h, "down_proj": text.intermediate_size}


def decoder_layer_bytes(text: Any, a: int, trainable: bool, lora_in: Sequence[int], r: int, mask_bytes: int = 1,
                        qk_norm: bool = False, mlp_bytes: Optional[int] = None) -> int:
    """Saved tensors of one decoder layer, per token.

    Always: both RMSNorms keep an fp32 copy of their input and its rsqrt (4h + 4 each); attention keeps q and k
    after RoPE, v, its output and the log-sum-exp (flash / memory-efficient kernels, GQA without repeating k/v);
    the MLP keeps the gate output, SiLU's output and the up projection (3 x intermediate). With `qk_norm` (an
    RMSNorm over each head of q and k before RoPE), those norms keep an fp32 copy of q and k and an rsqrt per head.
    Trainable weights add what the weight gradients need: the normalised inputs of the norm weights (2h, plus q and
    k with qk_norm), the q/k/v and gate/up inputs (2h) and the down_proj input (intermediate); o_proj's input is
    the attention output already kept. Frozen weights add nothing: y = xW needs only W for dx. LoRA adds
    `lora_bytes` per adapted Linear. `mlp_bytes`: bytes per element of the MLP's three tensors, `a` unless the
    projections are 4-bit: bitsandbytes casts a Linear4bit's output back to its input's dtype, and under QLoRA
    with adapter.qlora_fp32_upcast that input is the fp32 residual stream (tests/test_estimate_qlora.py measures
    this on the real modules).
    """
    m = a if mlp_bytes is None else mlp_bytes
    h, inter, heads, kv_heads = text.hidden_size, text.intermediate_size, text.num_attention_heads, \
        text.num_key_value_heads
    q, kv = heads * head_dim(text), kv_heads * head_dim(text)
    total = 8 * h + 8 + a * (2 * q + 2 * kv) + 4 * heads + 3 * m * inter
    if qk_norm:
        total += 4 * (q + kv) + 4 * (heads + kv_heads)
    if trainable:
        total += a * (4 * h + inter) + (a * (q + kv) if qk_norm else 0)
    return total + sum(lora_bytes(n, r, a, mask_bytes) for n in lora_in)


def layernorm_vision_block_bytes(sizes: VisionSizes, heads: int, a: int, trainable: bool, lora_in: Sequence[int],
                                 r: int, mask_bytes: int = 1, activation_tensors: int = 2) -> int:
    """Saved tensors of one ViT block with LayerNorms and a plain (fc1, activation, fc2) MLP, per patch.

    Always: both LayerNorm inputs and statistics, q and k after RoPE, v (a view that keeps the whole fused qkv
    output alive: 3d), the attention output and log-sum-exp, and what the activation keeps of its input
    (`activation_tensors` x mlp: QuickGELU keeps its input and the sigmoid, tanh-GELU its input only).
    Trainable weights add the qkv, proj and fc1 inputs (3d) and the fc2 input (mlp).
    """
    d, mlp = sizes.width, sizes.mlp
    total = a * (2 * d + 2 * d + 3 * d + d) + 16 + 4 * heads + activation_tensors * a * mlp
    if trainable:
        total += a * (3 * d + mlp)
    return total + sum(lora_bytes(n, r, a, mask_bytes) for n in lora_in)


def merger_bytes(vision: Any, a: int, patches: int, tokens: int) -> int:
    """The merger over a batch: its LayerNorm over the patches, its MLP over the merged tokens."""
    return a * patches * (3 * vision_width(vision)) + a * tokens * (4 * vision_width(vision))


def vision_width(vision: Any) -> int:
    return getattr(vision, "embed_dim", None) or vision.hidden_size


# ----------------------------------------------------------------------------------------------------------------
# the declaration


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family: everything the rest of qwenvl-ft needs to know about it."""

    # identity: `name` is both the model.family value and transformers' config.model_type
    name: str
    title: str  # for messages: "Qwen2-VL"
    model_class: str  # transformers classes, by name (imported on use: `load`)
    processor_class: str
    config_class: str
    tokenizer_class: str = "Qwen2Tokenizer"  # also tells apart families that share a processor class
    added_tokens: Tuple[str, ...] = ()  # plain added tokens after Qwen's special ones (a random model's tokenizer)
    vision_block_class: str  # FSDP wrap units, with decoder_layer_class
    decoder_layer_class: str
    # the decoder's recurrent (linear-attention) layer class, for families that have one: packed rows run it per
    # sample (modeling/linear_attention.py)
    linear_attention_class: Optional[str] = None
    # A mixture-of-experts language model: its sparse MoE block (router + experts; a ZeRO-3 leaf module, gathered
    # whole, so that a rank whose tokens reach no copy of an expert does not wait for the others) and, for each
    # fused expert weight (a 3-D parameter, by the suffix of its name), the adapter.target_modules names that adapt
    # it through PEFT's target_parameters (EXPERT_MLP_TARGETS). `expert_parameters` lists the fused weights.
    moe_block_class: Optional[str] = None
    expert_lora_targets: Tuple[Tuple[str, str], ...] = ()  # (target name, fused parameter)
    test_model: str  # the conf/model option of its tiny random model (tests, demos)
    # model.use_liger_kernel done by qwenvl-ft, not Liger's own patch (which fails on transformers 5 for these):
    # (module class, kind) pairs, every module of that exact class swapped for Liger's module class of that kind
    # (modeling/liger.py). A class by name in the model's modeling module, or "module:Class".
    liger_modules: Tuple[Tuple[str, str], ...] = ()

    # vision geometry: a patch_size x patch_size patch, merge_size x merge_size patches per visual token
    patch_size: int
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_max_pixels: int  # the released processor's upper bound per image (the estimate's default image)

    # where things live, as attribute paths from the model class (PEFT's base model)
    vision_tower: str = "model.visual"
    vision_stem: Tuple[str, ...] = ("model.visual.patch_embed",)  # trains with the blocks, before them
    vision_blocks: str = "model.visual.blocks"
    projectors: Tuple[str, ...] = ("model.visual.merger",)  # model.freeze_merger / optimizer.merger_lr
    language_model: str = "model.language_model"
    decoder_layers: str = "model.language_model.layers"
    embeddings: str = "model.language_model.embed_tokens"
    # kept out of 4-bit whatever trains: module names or patterns, as bitsandbytes' llm_int8_skip_modules reads them
    # (from the start of a module's name, as a regex, or as a suffix)
    never_quantized: Tuple[str, ...] = ("lm_head",)
    language_lora_targets: Tuple[str, ...] = LANGUAGE_PROJECTIONS

    # inputs and outputs
    video_seconds_input: Optional[str] = None  # model input holding seconds per temporal patch of each video
    vision_output_fields: Tuple[str, ...] = ("pooler_output", "last_hidden_state")  # tensors, or lists of them
    language_model_token_inputs: Tuple[str, ...] = ()  # (batch, length) inputs of the language model's forward
    qk_norm: bool = False  # RMSNorm on each head of q and k (the estimate)
    box_convention: BoxConvention  # how its answers write boxes and points (qwenvl_ft/grounding/convention.py)

    # functions (module-level, so that they pickle)
    smart_resize: str = "transformers.models.qwen2_vl.image_processing_qwen2_vl:smart_resize"
    positions: Callable[..., Any] = sample_positions  # (sample, **position_settings(config)) -> (3, len)
    position_settings: Callable[[Any], Dict[str, Any]] = merge_setting
    video_tokens: Callable[..., List[int]] = video_pad_tokens
    chat_template: str
    random_config: Callable[[Any, Any], Any]  # (model.architecture, tokenizer) -> transformers config
    random_processor: Callable[[Any, Any, str], Any]  # (tokenizer, model.architecture, chat_template) -> processor
    architecture_problems: Callable[[Any], List[str]] = no_problems  # what is wrong with model.architecture
    vision_sizes: Callable[[Any], VisionSizes]
    vision_block_bytes: Callable[..., int]  # (VisionSizes, heads, a, trainable, lora_in, r, mask_bytes)
    projector_bytes: Callable[[Any, int, int, int], int] = merger_bytes  # (vision config, a, patches, tokens)
    # a language model whose layers differ in kind (`layer_types`: Gated DeltaNet and attention): the saved bytes
    # per token of a layer of each kind, (text config, kind, a, trainable, lora_in, r, mask_bytes, linear bytes)
    kind_layer_bytes: Optional[Callable[..., float]] = None

    # -- classes -------------------------------------------------------------------------------------------------

    def load_model_class(self):
        return load(self.model_class)

    def load_config_class(self):
        return load(self.config_class)

    def wrap_classes(self) -> Tuple[Any, Any]:
        """(decoder layer, vision block) classes: the units FSDP shards and checkpoints."""
        return self.load_decoder_layer_class(), self.load_vision_block_class()

    def load_decoder_layer_class(self):
        return _module_class(self.model_class, self.decoder_layer_class)

    def load_vision_block_class(self):
        return _module_class(self.model_class, self.vision_block_class)

    def load_moe_block_class(self):
        return _module_class(self.model_class, self.moe_block_class) if self.moe_block_class else None

    def load_liger_classes(self) -> List[Tuple[Any, str]]:
        return [(load(name) if ":" in name else _module_class(self.model_class, name), kind)
                for name, kind in self.liger_modules]

    def load_linear_attention_class(self):
        return _module_class(self.model_class, self.linear_attention_class) if self.linear_attention_class else None

    def resize_function(self) -> Callable:
        """The processor's `smart_resize(height, width, factor, min_pixels, max_pixels)`."""
        return load(self.smart_resize)

    # -- mixture of experts ---------------------------------------------------------------------------------------

    @property
    def expert_parameters(self) -> Tuple[str, ...]:
        """The fused expert weights of one decoder layer (suffixes of parameter names); () for a dense family."""
        return tuple(dict.fromkeys(parameter for _, parameter in self.expert_lora_targets))

    def adapted_experts(self, target_modules: Sequence[str]) -> List[str]:
        """The fused expert weights LoRA adapts when adapter.target_modules names these."""
        return list(dict.fromkeys(p for name, p in self.expert_lora_targets if name in target_modules))

    # -- a model's parts -----------------------------------------------------------------------------------------

    def parts(self, model: Any) -> ModelParts:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return ModelParts(vision=attribute(base, self.vision_tower),
                          projectors=[attribute(base, p) for p in self.projectors],
                          language_model=attribute(base, self.language_model),
                          vision_blocks=attribute(base, self.vision_blocks),
                          decoder_layers=attribute(base, self.decoder_layers))

    def layer_bytes(self, text: Any, a: int, trainable: bool, lora_in: Sequence[int], r: int,
                    mask_bytes: int = 1, mlp_bytes: Optional[int] = None) -> int:
        """Saved tensors of one decoder layer per token (`decoder_layer_bytes` for this family's layers)."""
        return decoder_layer_bytes(text, a, trainable, lora_in, r, mask_bytes, qk_norm=self.qk_norm,
                                   mlp_bytes=mlp_bytes)

    def layer_kind_bytes(self, text: Any, kind: str, a: int, trainable: bool, lora_in: Sequence[int], r: int,
                         mask_bytes: int = 1, mlp_bytes: Optional[int] = None) -> float:
        """Saved tensors per token of one decoder layer of `kind` (a `layer_types` value); every layer is alike
        unless the family declares `kind_layer_bytes`."""
        if self.kind_layer_bytes is None:
            return self.layer_bytes(text, a, trainable, lora_in, r, mask_bytes, mlp_bytes)
        return self.kind_layer_bytes(text, kind, a, trainable, lora_in, r, mask_bytes, mlp_bytes)

    @property
    def factor(self) -> int:
        """Pixels per visual token along each side."""
        return self.patch_size * self.merge_size


def _module_class(model_class: str, name: str):
    """A class of the modeling module that defines `model_class` (transformers does not export block classes)."""
    return getattr(import_module(load(model_class).__module__), name)
