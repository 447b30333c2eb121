"""The `model` group: which checkpoint to load, the sizes of a randomly initialised one, and what of it trains.

Imports only the standard library and the torch-free family registry (`qwenvl_ft.families`, model.family's
choices): `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional, Union

from qwenvl_ft import families
from qwenvl_ft.errors import check as _check


# One choice per module of qwenvl_ft/families (a family is declared there, not here).
ModelFamily = Enum("ModelFamily", {name: name for name in families.names()}, type=str, module=__name__,
                   qualname="ModelFamily")


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AttnImplementation(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class VarlenAttention(str, Enum):
    """How packed rows and the images of a batch attend apart (qwenvl_ft/modeling/varlen_attention.py)."""

    auto = "auto"  # torch where it runs (CUDA, torch >= 2.10, bf16/fp16), else per_sample
    torch = "torch"  # torch's varlen_attn kernel: one call per layer for a pack, per block for all images
    per_sample = "per_sample"  # one SDPA call per packed sample and per image


@dataclass
class ArchitectureConfig:
    """Sizes of a randomly initialised model (`model.random_init=true`).

    The `tiny*` options use small values for CPU tests; the full-size options carry the real numbers of the
    released models, so that GPU speed and memory benchmarks can run on random weights without downloading
    anything, and `qwenvl-ft estimate` works offline. A family reads the fields it has
    (qwenvl_ft/families/<family>.py: `random_config`) and says which it needs (`architecture_problems`).
    """

    vocab_size: int = 151936  # embedding rows; must be >= the tokenizer's length
    hidden_size: int = 1536  # language model width
    intermediate_size: int = 8960  # language model MLP width
    num_hidden_layers: int = 28  # language model decoder layers
    num_attention_heads: int = 12  # query heads per decoder layer
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention)
    head_dim: Optional[int] = None  # width of one attention head (None: hidden_size / num_attention_heads)
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    rope_theta: float = 1000000.0  # rotary position base
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])  # sums to the rotary width / 2
    max_position_embeddings: int = 32768  # longest sequence the positions cover
    vision_depth: int = 32  # vision transformer blocks
    vision_embed_dim: int = 1280  # vision transformer width
    vision_num_heads: int = 16  # attention heads per vision block
    vision_mlp_ratio: int = 4  # MLP width / vision_embed_dim, for a vision MLP without vision_intermediate_size
    patch_size: int = 14  # pixels per side of a vision patch
    temporal_patch_size: int = 2  # frames per patch (an image is repeated to fill them)
    spatial_merge_size: int = 2  # patches per side merged into one language-model token
    vision_intermediate_size: Optional[int] = None  # width of the vision MLP, where a family gives it directly
    # Window attention over windows of this many pixels, full attention in the listed blocks, and M-RoPE temporal
    # positions of videos spaced by this many per second.
    vision_window_size: int = 112
    vision_fullatt_block_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])  # full attention
    tokens_per_second: int = 2  # M-RoPE temporal positions per second of video
    # Learned vision positions on a square grid of this many, and the vision blocks whose output also feeds the
    # language model through a merger of its own (DeepStack).
    vision_num_position_embeddings: int = 2304
    deepstack_visual_indexes: List[int] = field(default_factory=list)  # DeepStack: blocks with their own merger
    # Hybrid language models: every full_attention_interval-th decoder layer is softmax attention, the
    # others Gated DeltaNet (linear attention: a causal depthwise conv of this kernel, then the gated delta rule
    # over these heads); rotary positions on partial_rotary_factor of each attention head.
    full_attention_interval: Optional[int] = None  # None: every layer is softmax attention
    linear_conv_kernel_dim: int = 4  # width of a linear-attention layer's causal depthwise conv
    linear_key_head_dim: int = 128  # width of one key (and query) head of the delta rule
    linear_value_head_dim: int = 128  # width of one value head of the delta rule
    linear_num_key_heads: int = 16  # key (and query) heads of a linear-attention layer
    linear_num_value_heads: int = 32  # value heads of a linear-attention layer (a multiple of the key heads)
    partial_rotary_factor: float = 1.0  # share of each attention head that carries rotary positions
    # Mixture-of-experts language models: each decoder layer's MLP is num_experts experts of moe_intermediate_size,
    # num_experts_per_tok of them per token.
    num_experts: int = 0  # 0: a dense MLP in every layer
    num_experts_per_tok: int = 0  # experts routed to per token
    moe_intermediate_size: Optional[int] = None  # MLP width of one expert
    shared_expert_intermediate_size: Optional[int] = None  # MLP width of a shared expert, where a family has one
    init_seed: int = 0  # the random weights are a pure function of the sizes and this seed

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        _check(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
               "model.architecture.hidden_size must be divisible by num_attention_heads (or set head_dim)")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "model.architecture.num_attention_heads must be divisible by num_key_value_heads")
        rotary = int(self.attention_head_dim * self.partial_rotary_factor)
        width = "head_dim/2" if self.partial_rotary_factor == 1.0 else "head_dim x partial_rotary_factor / 2"
        _check(sum(self.mrope_section) * 2 == rotary,
               f"model.architecture.mrope_section {list(self.mrope_section)} must sum to {width} = {rotary // 2}")
        _check(self.full_attention_interval is None or self.full_attention_interval >= 1,
               "model.architecture.full_attention_interval must be >= 1 (or null: every layer is attention)")
        _check(self.num_experts == 0 or 0 < self.num_experts_per_tok <= self.num_experts,
               "model.architecture.num_experts_per_tok must be between 1 and num_experts")
        _check(self.linear_num_value_heads % self.linear_num_key_heads == 0,
               "model.architecture.linear_num_value_heads must be divisible by linear_num_key_heads")
        _check(self.vision_embed_dim % self.vision_num_heads == 0,
               "model.architecture.vision_embed_dim must be divisible by vision_num_heads")


@dataclass
class StartFromConfig:
    """model.start_from: the weights a run starts from are the `final/` of another training run, which
    `qwenvl-ft train` trains first (in-process) when it has none yet; eval, infer and merge load it as the base
    (until it exists, the model group's own weights, with a warning). It must be a full model (a recipe with
    adapter=full). The model group still names the architecture and the processor, which data-check and estimate
    use. Delete its folder to train it again."""

    recipe: str = "???"  # the recipe of that run (required)
    output_dir: str = "???"  # where it is (or will be) trained; its final/ is the starting model (required)
    overrides: List[str] = field(default_factory=list)  # overrides of that run, as on the command line


@dataclass
class ModelConfig:
    """Which checkpoint to load and what of it to train."""

    name_or_path: str = "tiny"  # hub id or local folder; ignored when random_init is true
    family: ModelFamily = ModelFamily(families.DEFAULT)  # qwenvl_ft/families/<family>.py declares it
    random_init: bool = False  # build from `architecture` with random weights and an in-process tokenizer
    architecture: Optional[ArchitectureConfig] = None
    dtype: Dtype = Dtype.bfloat16  # weight dtype (4-bit adapters use it as compute dtype)
    # Attention kernel (flash_attention_2 needs flash-attn)
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    # With sdpa: packed rows (language model) and the images of a batch (vision tower) attend per sequence through
    # torch's varlen_attn kernel (one call) or per-sample SDPA (one call per sample / image); auto takes the kernel
    # on CUDA with torch >= 2.10. flash_attention_2 and eager are left as they are.
    varlen_attention: VarlenAttention = VarlenAttention.auto
    # Non-reentrant, on the decoder layers and (transformers' default) the vision blocks too. true, false, or auto: off
    # where the estimated peak fits the GPU without it at a large enough batch (qwenvl_ft/estimate/autofit.py).
    gradient_checkpointing: Union[bool, str] = True
    # Vision blocks only (None: follow gradient_checkpointing). Recomputing the ViT pays off only when it trains
    # on large images; false keeps it off while the language model is checkpointed.
    vision_gradient_checkpointing: Optional[bool] = None
    # Liger's Triton kernels (RMSNorm, LayerNorm, SwiGLU, RoPE, MoE experts, as far as each family gets them):
    # Liger's own patch via the Trainer, or the family's modules swapped for Liger's (Family.liger_modules); needs
    # the [liger] extra and CUDA. Its fused linear cross-entropy stays off: TRL's trainers already fuse the LM
    # head and loss.
    use_liger_kernel: bool = False
    # Regional torch.compile: each decoder layer compiled on its own (one graph reused by every layer), the rest
    # eager. With data.packing every pack is padded to exactly the token budget, so the graph is traced once.
    compile: bool = False
    freeze_vision_tower: bool = True  # the ViT blocks and patch embedding
    freeze_merger: bool = True  # the patch merger that projects vision features into the language model
    freeze_language_model: bool = False  # embeddings, decoder layers and lm_head
    trust_remote_code: bool = False  # allow a checkpoint's own Python code (transformers' flag)
    # Mixture-of-experts models: the router's load-balancing loss, times this, is added to the trained loss
    # (transformers' output_router_logits and router_aux_loss_coef); 0 leaves it out. Dense models ignore it.
    router_aux_loss_coef: float = 0.001
    start_from: Optional[StartFromConfig] = None  # start from the result of another run (see StartFromConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto",
               f"model.gradient_checkpointing must be true, false or auto, not {self.gradient_checkpointing!r}")
        _check(not self.random_init or self.architecture is not None,
               "model.random_init=true needs model.architecture (use model=tiny or a full-size option)")
        if self.random_init:
            problems = families.get(self.family.value).architecture_problems(self.architecture)
            _check(not problems, "; ".join(problems))

    @property
    def vision_checkpointing(self) -> bool:
        """Whether the vision blocks are checkpointed: vision_gradient_checkpointing, else gradient_checkpointing."""
        vision = self.vision_gradient_checkpointing
        return self.gradient_checkpointing if vision is None else vision
