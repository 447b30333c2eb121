"""Typed schema of every config group.

One dataclass per group (`model`, `data`, `adapter`, `optimizer`, `trainer`) plus the root `TrainConfig`.
They are registered in Hydra's ConfigStore as `*_schema` and the primary configs list them first in their
defaults, so every YAML option and every command-line override is merged into a typed node: a key that does not
exist or a value of the wrong type fails at compose time. Choice fields are `str` Enums, so a wrong value fails
with the list of valid choices. Range checks that types cannot express live in `__post_init__` and run in
`validate()` (OmegaConf.to_object instantiates the dataclasses).

This module imports only the standard library, omegaconf and hydra: `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another value."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------------------------
# model


class ModelFamily(str, Enum):
    qwen2_vl = "qwen2_vl"
    qwen2_5_vl = "qwen2_5_vl"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AttnImplementation(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


@dataclass
class ArchitectureConfig:
    """Sizes of a randomly initialised model (`model.random_init=true`).

    The `tiny` option uses small values for CPU tests; the full-size options carry the real Qwen2-VL numbers so
    that GPU speed and memory benchmarks can run on random weights without downloading anything.
    """

    vocab_size: int = 151936  # embedding rows; must be >= the tokenizer's length
    hidden_size: int = 1536  # language model width
    intermediate_size: int = 8960  # language model MLP width
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 1000000.0
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])  # sums to head_dim / 2
    max_position_embeddings: int = 32768
    vision_depth: int = 32
    vision_embed_dim: int = 1280
    vision_num_heads: int = 16
    vision_mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    init_seed: int = 0  # the random weights are a pure function of the sizes and this seed

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_attention_heads == 0,
               "model.architecture.hidden_size must be divisible by num_attention_heads")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "model.architecture.num_attention_heads must be divisible by num_key_value_heads")
        head_dim = self.hidden_size // self.num_attention_heads
        _check(sum(self.mrope_section) * 2 == head_dim,
               f"model.architecture.mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
        _check(self.vision_embed_dim % self.vision_num_heads == 0,
               "model.architecture.vision_embed_dim must be divisible by vision_num_heads")


@dataclass
class ModelConfig:
    """Which checkpoint to load and what of it to train."""

    name_or_path: str = "tiny"  # hub id or local folder; ignored when random_init is true
    family: ModelFamily = ModelFamily.qwen2_vl
    random_init: bool = False  # build from `architecture` with random weights and an in-process tokenizer
    architecture: Optional[ArchitectureConfig] = None
    dtype: Dtype = Dtype.bfloat16  # weight dtype (4-bit adapters use it as compute dtype)
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    gradient_checkpointing: bool = True  # non-reentrant, on the language model
    freeze_vision_tower: bool = True  # the ViT blocks and patch embedding
    freeze_merger: bool = True  # the patch merger that projects vision features into the language model
    freeze_language_model: bool = False  # embeddings, decoder layers and lm_head
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(not self.random_init or self.architecture is not None,
               "model.random_init=true needs model.architecture (use model=tiny or a full-size option)")
        _check(not (self.random_init and self.family != ModelFamily.qwen2_vl),
               "model.random_init is implemented for family=qwen2_vl only")


# ----------------------------------------------------------------------------------------------------------------
# data


class DataFormat(str, Enum):
    shapes = "shapes"  # generated offline: coloured shapes and questions about them (the demo)
    llava = "llava"  # `conversations` with from/value and <image> placeholders, `image` path(s) or base64
    messages = "messages"  # OpenAI / TRL style `messages` with content lists and an `images` column
    self_llm = "self_llm"  # caption layout: image path between <|vision_start|> and <|vision_end|> in user text
    amazon = "amazon"  # column formatter for philschmid/amazon-product-descriptions-vlm


@dataclass
class ShapesConfig:
    """The generated demo dataset."""

    num_train: int = 240
    num_eval: int = 24
    image_size: int = 56  # square, a multiple of 28
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_train > 0 and self.num_eval >= 0, "data.shapes.num_train must be > 0, num_eval >= 0")
        _check(self.image_size % 28 == 0, "data.shapes.image_size must be a multiple of 28")


@dataclass
class DataConfig:
    """Where the examples come from, how they become chat messages, and how images are sized."""

    format: DataFormat = DataFormat.shapes
    path: Optional[str] = None  # JSON/JSONL file, dataset folder, or hub id (format-dependent)
    split: str = "train"  # split name for Hugging Face datasets
    image_folder: Optional[str] = None  # relative image paths resolve here (default: the data file's folder)
    system_message: Optional[str] = None  # prepended as a system turn when set
    prompt: Optional[str] = None  # user prompt template for formatter-based formats (amazon, self_llm)
    eval_size: float = 0.0  # held-out rows: 0 none, <1 a fraction, >=1 a count
    eval_path: Optional[str] = None  # a separate held-out file instead of eval_size
    shuffle: bool = True  # shuffle (seeded) before splitting off eval rows
    seed: int = 42
    max_samples: Optional[int] = None  # keep only the first N training rows (quick experiments)
    max_length: Optional[int] = 2048  # tokens per sequence; never cuts inside a vision span
    min_pixels: Optional[int] = None  # image resolution bounds (None: the processor's defaults)
    max_pixels: Optional[int] = None
    resized_height: Optional[int] = None  # fixed resize, rounded to a multiple of 28
    resized_width: Optional[int] = None
    num_workers: int = 0  # DataLoader worker processes doing decoding and tokenisation
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    def __post_init__(self) -> None:
        _check(self.format == DataFormat.shapes or self.path is not None,
               f"data.path is required for data.format={self.format.value}")
        _check(self.eval_size >= 0, "data.eval_size must be >= 0")
        _check(self.eval_size < 1 or float(self.eval_size).is_integer(),
               "data.eval_size >= 1 is a row count and must be a whole number")
        _check(self.max_length is None or self.max_length > 0, "data.max_length must be positive")
        _check((self.resized_height is None) == (self.resized_width is None),
               "data.resized_height and data.resized_width must be set together")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        if self.min_pixels is not None and self.max_pixels is not None:
            _check(self.min_pixels <= self.max_pixels, "data.min_pixels must be <= data.max_pixels")


# ----------------------------------------------------------------------------------------------------------------
# adapter


class AdapterMethod(str, Enum):
    full = "full"  # every unfrozen weight is trained
    lora = "lora"
    dora = "dora"  # weight-decomposed LoRA
    qlora = "qlora"  # LoRA on a 4-bit NF4 base


@dataclass
class AdapterConfig:
    """Full fine-tuning or a (Q)LoRA/DoRA adapter. LoRA fields are ignored for method=full."""

    method: AdapterMethod = AdapterMethod.lora
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Leaf names of the language-model Linear layers that get adapters.
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    vision_lora: bool = False  # also put adapters on every Linear of the vision tower blocks
    bias: str = "none"
    # 4-bit quantisation of the base (bitsandbytes), used by method=qlora
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True

    def __post_init__(self) -> None:
        _check(self.r > 0, "adapter.r must be > 0")
        _check(self.alpha > 0, "adapter.alpha must be > 0")
        _check(0.0 <= self.dropout < 1.0, "adapter.dropout must be in [0, 1)")
        _check(self.bias in ("none", "all", "lora_only"), "adapter.bias must be one of [none, all, lora_only]")
        _check(self.bnb_4bit_quant_type in ("nf4", "fp4"), "adapter.bnb_4bit_quant_type must be one of [nf4, fp4]")
        _check(not (self.load_in_4bit and self.method == AdapterMethod.full),
               "adapter.load_in_4bit cannot be combined with method=full (4-bit weights are not trainable)")
        _check(not (self.vision_lora and self.method == AdapterMethod.full),
               "adapter.vision_lora needs a LoRA method (lora, dora, qlora)")
        _check(len(self.target_modules) > 0 or self.vision_lora or self.method == AdapterMethod.full,
               "adapter.target_modules is empty and vision_lora is off: nothing would be trained")

    @property
    def is_peft(self) -> bool:
        return self.method != AdapterMethod.full


# ----------------------------------------------------------------------------------------------------------------
# optimizer


class LrScheduler(str, Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_min_lr = "cosine_with_min_lr"


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw_torch"  # any transformers `optim` name: adamw_torch_fused, paged_adamw_8bit, ...
    lr: float = 2e-4
    vision_lr: Optional[float] = None  # separate lr for the vision tower (None: lr)
    merger_lr: Optional[float] = None  # separate lr for the merger (None: lr)
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: LrScheduler = LrScheduler.constant
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.lr must be > 0")
        for name in ("vision_lr", "merger_lr"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"optimizer.{name} must be >= 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas must be two values in [0, 1)")
        _check(0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "optimizer.max_grad_norm must be >= 0")


# ----------------------------------------------------------------------------------------------------------------
# trainer


class TrainerKind(str, Enum):
    sft = "sft"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class TrainerConfig:
    """The training loop: length, batch, precision, logging and checkpoints."""

    kind: TrainerKind = TrainerKind.sft
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # per device
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    precision: Precision = Precision.bf16  # mixed-precision autocast
    tf32: bool = False  # TF32 matmuls on Ampere and newer GPUs (ignored without CUDA)
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    # Generate on the held-out rows before and after training and report the metric (needs eval rows).
    eval_generation: bool = True
    max_new_tokens: int = 64
    num_predictions_to_print: int = 4
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs > 0 or self.max_steps > 0, "trainer.epochs or trainer.max_steps must be > 0")
        _check(self.batch_size > 0 and self.eval_batch_size > 0, "trainer batch sizes must be > 0")
        _check(self.gradient_accumulation_steps > 0, "trainer.gradient_accumulation_steps must be > 0")
        _check(self.logging_steps > 0 and self.save_steps > 0, "trainer.logging_steps and save_steps must be > 0")
        _check(self.max_new_tokens > 0, "trainer.max_new_tokens must be > 0")
        valid_reporters = {"tensorboard", "wandb", "none"}
        unknown = set(self.report_to) - valid_reporters
        _check(not unknown, f"trainer.report_to has {sorted(unknown)}; valid: {sorted(valid_reporters)}")


# ----------------------------------------------------------------------------------------------------------------
# root


@dataclass
class TrainConfig:
    """The whole run. `output_dir` defaults to Hydra's run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "outputs/run"
    seed: int = 42

    def __post_init__(self) -> None:
        _check(not (self.adapter.method == AdapterMethod.qlora and not self.adapter.load_in_4bit),
               "adapter.method=qlora needs adapter.load_in_4bit=true")
        m = self.model
        if self.adapter.is_peft:
            trains_something = (not m.freeze_language_model and bool(self.adapter.target_modules)) \
                or self.adapter.vision_lora or not m.freeze_merger
        else:
            trains_something = not (m.freeze_language_model and m.freeze_merger and m.freeze_vision_tower)
        _check(trains_something, "model.freeze_* and the adapter settings leave nothing to train")


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "adapter": AdapterConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
}


def register_schemas() -> None:
    """Register the root schema so that the primary config can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
