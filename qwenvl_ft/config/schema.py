"""Typed schema of every config group.

One dataclass per group (`model`, `data`, `adapter`, `optimizer`, `trainer`) plus the root `TrainConfig`.
They are registered in Hydra's ConfigStore as `*_schema` and the primary configs list them first in their
defaults, so every YAML option and every command-line override is merged into a typed node: a key that does not
exist or a value of the wrong type fails at compose time. Choice fields are `str` Enums, so a wrong value fails
with the list of valid choices. Range checks that types cannot express live in `__post_init__` and run in
`validate()` (OmegaConf.to_object instantiates the dataclasses).

This module imports only the standard library, omegaconf, hydra and the torch-free registries it lists choices
from (`qwenvl_ft.families` for model.family, `qwenvl_ft.methods`): `--cfg job` must not pay for torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Union

from qwenvl_ft import families, methods
from qwenvl_ft.errors import ConfigError, check as _check


# ----------------------------------------------------------------------------------------------------------------
# model


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
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])  # sums to head_dim / 2
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
    init_seed: int = 0  # the random weights are a pure function of the sizes and this seed

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        _check(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
               "model.architecture.hidden_size must be divisible by num_attention_heads (or set head_dim)")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "model.architecture.num_attention_heads must be divisible by num_key_value_heads")
        head_dim = self.attention_head_dim
        _check(sum(self.mrope_section) * 2 == head_dim,
               f"model.architecture.mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
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
    # Non-reentrant, on the decoder layers and (transformers' default) the vision blocks too.
    gradient_checkpointing: bool = True
    # Vision blocks only (None: follow gradient_checkpointing). Recomputing the ViT pays off only when it trains
    # on large images; false keeps it off while the language model is checkpointed.
    vision_gradient_checkpointing: Optional[bool] = None
    # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) via the Trainer; needs `pip install liger-kernel` and CUDA.
    # Its fused linear cross-entropy stays off: TRL's SFTTrainer already fuses the LM head and loss.
    use_liger_kernel: bool = False
    freeze_vision_tower: bool = True  # the ViT blocks and patch embedding
    freeze_merger: bool = True  # the patch merger that projects vision features into the language model
    freeze_language_model: bool = False  # embeddings, decoder layers and lm_head
    trust_remote_code: bool = False  # allow a checkpoint's own Python code (transformers' flag)
    start_from: Optional[StartFromConfig] = None  # start from the result of another run (see StartFromConfig)

    def __post_init__(self) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# data


class _DataFormatBase(str, Enum):
    @property
    def method(self):
        """The training method that reads this format (qwenvl_ft/methods/)."""
        return methods.format_owner(self)

    @property
    def is_generated(self) -> bool:
        """Made in-process (the demos' shapes): no data.path."""
        return self.value in self.method.generated_formats


# Every training method declares the formats it reads (`Method.data_formats`: SFT the conversation layouts
# shapes, llava, messages, self_llm, amazon, columns and auto; DPO the preference-pair layouts; ...), so a new
# method brings its own formats without an edit here.
DataFormat = _DataFormatBase("DataFormat", [(name, name) for method in methods.registry().values()
                                            for name in method.data_formats])


@dataclass
class ShapesConfig:
    """The generated demo dataset."""

    num_train: int = 240  # generated training rows
    num_eval: int = 24  # generated held-out rows
    image_size: int = 56  # square; resized like any image (model.family's patch x merge size rounds it)
    seed: int = 0  # seed of the generated images and questions

    def __post_init__(self) -> None:
        _check(self.num_train > 0 and self.num_eval >= 0, "data.shapes.num_train must be > 0, num_eval >= 0")
        _check(self.image_size > 0, "data.shapes.image_size must be > 0")


class Overlength(str, Enum):
    """What happens to a sample longer than data.max_length. A cut never falls inside a vision span (that is what
    makes the model fail with "image features and image tokens do not match")."""

    truncate_text = "truncate_text"  # cut the text after the last vision span; a row that cannot be cut so is dropped
    drop = "drop"  # drop the row
    error = "error"  # the row is invalid: data-check and training stop on it (unless data.skip_invalid)


@dataclass
class ColumnsConfig:
    """data.format=columns: how the columns of a table become one user turn and one assistant answer."""

    images: Optional[str] = "image"  # column holding one image or a list of images (None: text-only rows)
    answer: str = "answer"  # column holding the assistant's answer
    # The user text is data.prompt formatted with every column, by name ({Product Name}) and by snake_case name
    # ({product_name}); without data.prompt it is the column named here.
    prompt: Optional[str] = "question"


class DuplicateIds(str, Enum):
    """What happens to rows of one file that share an id (data.id_field)."""

    warn = "warn"  # keep them all; data-check and training list them
    drop = "drop"  # keep the first of each id, leave the others out (counted and listed)
    error = "error"  # the later ones are invalid rows: data-check and training stop on them (data.skip_invalid)
    allow = "allow"  # not checked


@dataclass
class SourceConfig:
    """One data file of a mixture (data.sources). Unset fields take the data group's value."""

    path: str = "???"  # JSON/JSONL/CSV/TSV file, dataset folder or hub id
    format: Optional[DataFormat] = None  # None: data.format
    image_folder: Optional[str] = None  # None: data.image_folder, else the file's folder
    split: Optional[str] = None  # Hugging Face split (None: data.split)
    # Share of the training rows drawn from this source (relative to the other sources' weights). Give every
    # source a weight, or none: then the sources are concatenated.
    weight: Optional[float] = None
    max_rows: Optional[int] = None  # read at most this many rows of the source (after its seeded shuffle)


class CacheMode(str, Enum):
    on = "on"  # reuse a cached data check whose key matches, else compute and store it
    refresh = "refresh"  # compute it again and replace the stored one (e.g. after images changed in place)
    off = "off"  # neither read nor write


@dataclass
class DataConfig:
    """Where the examples come from, how they become chat messages, and how images are sized."""

    format: DataFormat = DataFormat.shapes  # layout of the rows, and with it the training method that reads them
    path: Optional[str] = None  # JSON/JSONL/CSV/TSV file, dataset folder, or hub id (format-dependent)
    # Several files mixed into one training set, each read, checked and reported on its own (instead of `path`):
    # [{path, format, image_folder, split, weight or max_rows}, ...]. Weights draw the training rows in those
    # proportions, interleaved; without weights the sources are concatenated. Held-out rows (data.eval_size) are
    # taken from each source before mixing.
    sources: List[SourceConfig] = field(default_factory=list)
    # Training rows drawn by weight (None: as many as the sources give without repeating a row; more repeats the
    # sources whose share needs it).
    mixture_rows: Optional[int] = None
    split: str = "train"  # split name for Hugging Face datasets
    image_folder: Optional[str] = None  # relative image paths resolve here (default: the data file's folder)
    system_message: Optional[str] = None  # prepended as a system turn when set
    prompt: Optional[str] = None  # user prompt template for formatter-based formats (amazon, self_llm)
    eval_size: float = 0.0  # held-out rows: 0 none, <1 a fraction, >=1 a count
    eval_path: Optional[str] = None  # a separate held-out file instead of eval_size
    shuffle: bool = True  # shuffle (seeded) before splitting off eval rows
    seed: int = 42  # seed of the shuffle and of the held-out split
    max_samples: Optional[int] = None  # keep only the first N training rows (quick experiments)
    max_length: Optional[int] = 2048  # tokens per sequence; never cuts inside a vision span
    min_pixels: Optional[int] = None  # image resolution bounds (None: the processor's defaults)
    max_pixels: Optional[int] = None  # upper bound of an image's pixels (None: the processor's default)
    resized_height: Optional[int] = None  # fixed resize, rounded to a multiple of patch x merge size (28, 32)
    resized_width: Optional[int] = None  # fixed resize width, rounded as resized_height
    # DataLoader worker processes per rank doing decoding and tokenisation (training and data-check): a number, or
    # auto: on a GPU, the rank's share of the CPUs up to a cap, persistent and prefetching; on CPU-only runs what
    # measured fastest (qwenvl_ft/data/workers.py and docs/performance.md say how it was chosen).
    num_workers: Union[int, str] = "auto"
    # Batch layout of training (docs/performance.md). Default: trainer.batch_size rows, right-padded.
    # packing: padding-free; rows are concatenated into one sequence of at most max_tokens_per_batch tokens per
    # device step, each keeping its own M-RoPE positions and attending only to itself (trainer.batch_size unused).
    # With trainer=dpo: each batch of trainer.batch_size pairs runs as one such sequence, without its padding.
    packing: bool = False
    # Token budget per device step. With packing: the pack size (None: trainer.batch_size x max_length). Without:
    # padded batches of rows of similar length, as many as fit in this many padded tokens.
    max_tokens_per_batch: Optional[int] = None
    group_by_length: bool = False  # padded batches of trainer.batch_size rows of similar length (less padding)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # used by format=columns only
    # http(s) images are off by default: a run should not depend on the network or on someone else's server.
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0  # per image download
    remote_max_bytes: int = 20_000_000  # a larger download is refused
    # Decompression-bomb guard: an image with more pixels is an invalid row (PIL's own limit is set to this too).
    max_image_pixels: int = 100_000_000
    max_images_per_row: Optional[int] = None  # a row with more images is invalid
    # Visual tokens (images + videos) of one sample; a video's frames shrink to fit, a row still over is invalid.
    max_visual_tokens: Optional[int] = None
    video_min_pixels: Optional[int] = None  # per frame (None: the processor's video defaults)
    video_max_pixels: Optional[int] = None  # per frame (None: the processor's video default)
    video_fps: Optional[float] = None  # frames sampled per second of video (None: 2.0, qwen-vl-utils' default)
    video_nframes: Optional[int] = None  # a fixed number of frames per video instead of video_fps
    video_max_frames: int = 768  # cap on sampled frames with video_fps
    overlength: Overlength = Overlength.truncate_text  # samples over max_length (see Overlength)
    # Rows that fail validation are dropped and counted instead of stopping data-check and training.
    skip_invalid: bool = False
    # The record field that identifies a row (None: the first of id, uid, sample_id, question_id a row has), and
    # what happens to rows of one file that share one.
    id_field: Optional[str] = None
    on_duplicate_id: DuplicateIds = DuplicateIds.warn  # warn (and list them), drop the repeats, error, allow
    # The data check's results (rows read and converted, each row's tokens, visual tokens and validity) are stored
    # under cache_dir (None: data_cache/ in the run folder, the sweep's folder for -m jobs), keyed by the data
    # files (path, size, modification time) and every setting that changes them; a resumed run, the other jobs
    # of a sweep and the other ranks of a distributed run read them instead of decoding every image again.
    cache: CacheMode = CacheMode.on
    cache_dir: Optional[str] = None  # where cache entries live (None: data_cache/ in the run or sweep folder)
    # Loss on the whole sequence (system and user turns, template tokens) instead of the answers only, as some
    # tutorials train; image and video tokens are never targets. SFT only.
    train_on_prompt: bool = False

    def __post_init__(self) -> None:
        if self.sources:
            _check(self.path is None, "data.path and data.sources are alternatives: set one (data.path=null)")
            self._check_sources()
        else:
            _check(self.format.is_generated or self.path is not None,
                   f"data.path is required for data.format={self.format.value} (or data.sources)")
            _check(self.mixture_rows is None, "data.mixture_rows needs data.sources with weights")
        for name in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "resized_height",
                     "resized_width", "max_visual_tokens"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"data.{name} must be > 0")
        if self.video_min_pixels is not None and self.video_max_pixels is not None:
            _check(self.video_min_pixels <= self.video_max_pixels,
                   "data.video_min_pixels must be <= data.video_max_pixels")
        _check(self.remote_timeout_s > 0 and self.remote_max_bytes > 0,
               "data.remote_timeout_s and data.remote_max_bytes must be > 0")
        _check(self.max_image_pixels > 0, "data.max_image_pixels must be > 0")
        _check(self.max_images_per_row is None or self.max_images_per_row >= 0, "data.max_images_per_row must be >= 0")
        _check(self.video_fps is None or self.video_nframes is None,
               "data.video_fps and data.video_nframes are alternatives: set one")
        _check(self.video_fps is None or self.video_fps > 0, "data.video_fps must be > 0")
        _check(self.video_nframes is None or self.video_nframes >= 2, "data.video_nframes must be >= 2")
        _check(self.video_max_frames >= 2, "data.video_max_frames must be >= 2")
        _check(self.eval_size >= 0, "data.eval_size must be >= 0")
        _check(self.eval_size < 1 or float(self.eval_size).is_integer(),
               "data.eval_size >= 1 is a row count and must be a whole number")
        _check(self.max_length is None or self.max_length > 0, "data.max_length must be positive")
        _check((self.resized_height is None) == (self.resized_width is None),
               "data.resized_height and data.resized_width must be set together")
        _check(self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0),
               f"data.num_workers must be auto or a number >= 0, not {self.num_workers!r}")
        _check(self.max_samples is None or self.max_samples > 0,
               f"data.max_samples={self.max_samples}: must be > 0 (or null: every row)")
        _check(self.max_tokens_per_batch is None or self.max_tokens_per_batch > 0,
               "data.max_tokens_per_batch must be > 0")
        _check(not self.packing or self.max_tokens_per_batch is not None or self.max_length is not None,
               "data.packing with data.max_length=null needs data.max_tokens_per_batch (the pack size)")
        _check(self.max_tokens_per_batch is None or self.max_length is None
               or self.max_tokens_per_batch >= self.max_length,
               f"data.max_tokens_per_batch={self.max_tokens_per_batch} is below data.max_length={self.max_length}: "
               f"a row of max_length tokens would not fit in a batch")
        _check(not (self.group_by_length and (self.packing or self.max_tokens_per_batch is not None)),
               "data.group_by_length is for padded batches of trainer.batch_size rows; packing and "
               "max_tokens_per_batch already group rows by length")
        if self.min_pixels is not None and self.max_pixels is not None:
            _check(self.min_pixels <= self.max_pixels, "data.min_pixels must be <= data.max_pixels")

    def _check_sources(self) -> None:
        weights = [s.weight for s in self.sources]
        for index, source in enumerate(self.sources):
            where = f"data.sources[{index}]"
            _check(source.path not in (None, "", "???"), f"{where}.path is required")
            fmt = source.format or self.format
            _check(not fmt.is_generated, f"{where}.format={fmt.value}: generated data cannot be a source")
            _check(fmt.method.name == self.format.method.name,
                   f"{where}.format={fmt.value} and data.format={self.format.value}: all sources must hold "
                   f"{self.format.method.row_kind} (the rows of trainer={self.format.method.name}); "
                   f"{fmt.value} holds {fmt.method.row_kind}")
            _check(source.weight is None or source.weight > 0, f"{where}.weight must be > 0")
            _check(source.max_rows is None or source.max_rows > 0, f"{where}.max_rows must be > 0")
        _check(all(w is None for w in weights) or all(w is not None for w in weights),
               "data.sources: give every source a weight (drawn in those proportions) or none (concatenated)")
        _check(self.mixture_rows is None or (self.mixture_rows > 0 and weights[0] is not None),
               "data.mixture_rows must be > 0 and needs weights on data.sources")

    def source_list(self) -> List[SourceConfig]:
        """data.sources, or data.path as the one source."""
        return list(self.sources) if self.sources else [SourceConfig(path=self.path)]

    @property
    def weighted(self) -> bool:
        return bool(self.sources) and self.sources[0].weight is not None

    def describe_path(self) -> str:
        """What the data is, for messages: the path, the sources, or the generator."""
        if self.sources:
            return " + ".join(s.path for s in self.sources)
        return self.path or self.format.value


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

    method: AdapterMethod = AdapterMethod.lora  # full fine-tuning, or an adapter: lora, dora, qlora (4-bit base)
    r: int = 8  # LoRA rank: adapter width, trainable parameters grow with it
    alpha: int = 16  # LoRA scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    # Leaf names of the language-model Linear layers that get adapters.
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    vision_lora: bool = False  # also put adapters on every Linear of the vision tower blocks
    bias: str = "none"  # biases trained too: "none", "all" or "lora_only" (PEFT's bias)
    # 4-bit quantisation of the base (bitsandbytes), used by method=qlora
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # 4-bit data type: "nf4" (QLoRA) or "fp4"
    bnb_4bit_use_double_quant: bool = True  # quantise the quantisation constants too (saves ~0.4 bit/param)

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
    lr: float = 2e-4  # peak learning rate (of the language model; see vision_lr, merger_lr)
    vision_lr: Optional[float] = None  # separate lr for the vision tower (None: lr)
    merger_lr: Optional[float] = None  # separate lr for the merger (None: lr)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's beta1, beta2
    eps: float = 1e-8  # AdamW's epsilon
    scheduler: LrScheduler = LrScheduler.constant  # learning-rate schedule after the warmup
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up
    warmup_steps: Optional[int] = None  # warm up for this many optimizer steps instead (warmup_ratio must be 0)
    max_grad_norm: float = 1.0  # gradient clipping norm (0: no clipping)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.lr must be > 0")
        for name in ("vision_lr", "merger_lr"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"optimizer.{name} must be >= 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas must be two values in [0, 1)")
        _check(0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio must be in [0, 1)")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
        _check(self.warmup_steps is None or self.warmup_ratio == 0,
               "optimizer.warmup_steps and optimizer.warmup_ratio are alternatives: set one (warmup_ratio=0)")
        _check(self.max_grad_norm >= 0, "optimizer.max_grad_norm must be >= 0")


# ----------------------------------------------------------------------------------------------------------------
# trainer


# One choice per registered training method (qwenvl_ft/methods/: sft, dpo, ...).
TrainerKind = Enum("TrainerKind", [(name, name) for name in methods.names()], type=str)


class Precision(str, Enum):
    auto = "auto"  # bf16 where the accelerator supports it, else fp32 (CPU)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class SaveStrategy(str, Enum):
    steps = "steps"  # a checkpoint every trainer.save_steps optimizer steps
    epoch = "epoch"  # a checkpoint at the end of every epoch


class Tracker(str, Enum):
    """Experiment trackers (transformers' own integrations). Each but TensorBoard is an optional extra:
    pip install "qwenvl-ft[wandb]", "qwenvl-ft[swanlab]", "qwenvl-ft[mlflow]"."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    swanlab = "swanlab"
    mlflow = "mlflow"
    none = "none"  # alone: no tracker (same as [])


@dataclass
class TrackerConfig:
    """What the experiment trackers of trainer.report_to call the run (TensorBoard needs none of it)."""

    # W&B and SwanLab project, MLflow experiment (None: the tracker's environment variable WANDB_PROJECT,
    # SWANLAB_PROJECT or MLFLOW_EXPERIMENT_NAME, else "qwenvl-ft")
    project: Optional[str] = None
    run_name: Optional[str] = None  # the run's name in the tracker (None: the run folder's name)
    tags: List[str] = field(default_factory=list)  # W&B and SwanLab tags, MLflow tag keys
    # Held-out rows shown in the prediction gallery (image, prompt, prediction, reference) before training, at
    # each evaluation (trainer.eval_steps) and after training; 0: no gallery.
    gallery_size: int = 8

    def __post_init__(self) -> None:
        _check(self.gallery_size >= 0, "trainer.tracker.gallery_size must be >= 0")
        _check(all(tag.strip() for tag in self.tags), "trainer.tracker.tags has an empty tag")


@dataclass
class TrainerSettings:
    """The training loop: length, batch, precision, logging and checkpoints. `TrainerConfig` below adds one
    sub-config per training method that has settings of its own (`trainer.dpo.*`, ...)."""

    kind: TrainerKind = TrainerKind.sft  # the training method (qwenvl_ft/methods/); trainer=NAME sets it
    epochs: float = 1.0  # passes over the training rows (fractions allowed)
    max_steps: int = -1  # > 0 overrides epochs; -1: not set
    batch_size: int = 4  # per device
    eval_batch_size: int = 8  # per device, for generation and evaluation
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    precision: Precision = Precision.auto  # mixed-precision autocast (auto: bf16 where supported, else fp32)
    tf32: bool = False  # TF32 matmuls on Ampere and newer GPUs (ignored without CUDA)
    logging_steps: int = 10  # log the training loss every this many optimizer steps
    save_strategy: SaveStrategy = SaveStrategy.steps  # when checkpoints are written: every save_steps, or per epoch
    save_steps: int = 500  # with save_strategy=steps: a checkpoint every this many optimizer steps
    save_total_limit: Optional[int] = 2  # checkpoints kept (the oldest deleted; None: all)
    # Experiment trackers, any of tensorboard, wandb, swanlab, mlflow ([] or [none]: none); trainer.tracker names
    # the run. Each gets the resolved config, the training curves, the held-out metrics and the prediction gallery.
    report_to: List[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    # Any other field of the method's TRL config (SFTConfig, DPOConfig, GRPOConfig; TrainingArguments' included), e.g.
    # {lr_scheduler_kwargs: {min_lr: 1e-6}, torch_compile: true}. Keys are checked against that dataclass.
    extra_args: Dict[str, Any] = field(default_factory=dict)
    # Generate on the held-out rows before and after training and report the metric (needs eval rows).
    eval_generation: bool = True
    max_new_tokens: int = 64  # tokens generated per held-out row
    num_predictions_to_print: int = 4  # held-out predictions shown in the log
    disable_tqdm: bool = False  # no progress bar (logs only)
    # Dense bf16 peak of one GPU in TFLOP/s, the denominator of the MFU every run logs (None: looked up from the
    # GPU's name in qwenvl_ft/training/telemetry.py; a GPU not in that table logs no MFU until this is set).
    peak_tflops: Optional[float] = None
    # Resuming: "auto" continues from the newest complete checkpoint-* in output_dir (a fresh start when there is
    # none), a path names a checkpoint folder, null always starts fresh. A fixed `run_name` makes the same command
    # land in the same output_dir, so running it again after an interruption resumes.
    resume_from: Optional[str] = "auto"
    # Evaluation during training, on the held-out rows: loss every eval_steps optimizer steps (None: never).
    eval_steps: Optional[int] = None
    load_best_model_at_end: bool = False  # final/ gets the best checkpoint by metric_for_best_model
    metric_for_best_model: str = "eval_loss"  # what load_best_model_at_end and early stopping compare
    greater_is_better: Optional[bool] = None  # None: False for metrics ending in "loss", else True
    early_stopping_patience: Optional[int] = None  # stop after this many evaluations without improvement
    early_stopping_threshold: float = 0.0  # an improvement must beat the best by more than this

    def __post_init__(self) -> None:
        # -1 is transformers' "not set": train trainer.epochs. Any other value below 1 is a mistake, not a request.
        _check(self.max_steps == -1 or self.max_steps > 0,
               f"trainer.max_steps={self.max_steps}: must be > 0, or -1 to train trainer.epochs")
        _check(self.epochs > 0 or self.max_steps > 0, "trainer.epochs or trainer.max_steps must be > 0")
        _check(self.batch_size > 0 and self.eval_batch_size > 0, "trainer batch sizes must be > 0")
        _check(self.gradient_accumulation_steps > 0, "trainer.gradient_accumulation_steps must be > 0")
        _check(self.logging_steps > 0 and self.save_steps > 0, "trainer.logging_steps and save_steps must be > 0")
        _check(self.save_total_limit is None or self.save_total_limit > 0,
               f"trainer.save_total_limit={self.save_total_limit}: must be > 0 (or null: keep every checkpoint)")
        _check(self.max_new_tokens > 0, "trainer.max_new_tokens must be > 0")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "trainer.peak_tflops must be > 0")
        _check(Tracker.none not in self.report_to or len(self.report_to) == 1,
               "trainer.report_to: none cannot be combined with a tracker (use [] or [none] for no tracker)")
        _check(len(set(self.report_to)) == len(self.report_to), "trainer.report_to lists a tracker twice")
        _check(self.resume_from is None or self.resume_from.strip() != "",
               "trainer.resume_from must be auto, a checkpoint folder or null")
        _check(self.eval_steps is None or self.eval_steps > 0, "trainer.eval_steps must be > 0")
        needs_eval = [name for name, on in (("load_best_model_at_end", self.load_best_model_at_end),
                                            ("early_stopping_patience", self.early_stopping_patience is not None))
                      if on]
        _check(not needs_eval or self.eval_steps is not None,
               f"trainer.{needs_eval[0] if needs_eval else ''} needs trainer.eval_steps (evaluation during training)")
        # The Trainer can only load the best checkpoint if every evaluation step is also a save step.
        _check(not self.load_best_model_at_end or self.save_strategy == SaveStrategy.steps,
               "trainer.load_best_model_at_end needs trainer.save_strategy=steps (a checkpoint at every evaluation)")
        _check(not self.load_best_model_at_end or self.eval_steps is None or self.save_steps % self.eval_steps == 0,
               "trainer.load_best_model_at_end needs trainer.save_steps to be a multiple of trainer.eval_steps")
        _check(self.early_stopping_patience is None or self.early_stopping_patience > 0,
               "trainer.early_stopping_patience must be > 0")
        _check(self.early_stopping_threshold >= 0, "trainer.early_stopping_threshold must be >= 0")


TrainerConfig = make_dataclass(
    "TrainerConfig",
    [(m.name, m.settings, field(default_factory=m.settings)) for m in methods.registry().values() if m.settings],
    bases=(TrainerSettings,),
)
TrainerConfig.__doc__ = TrainerSettings.__doc__


# ----------------------------------------------------------------------------------------------------------------
# dist: how many processes, on how many machines, and which engine shares the work (qwenvl_ft/distributed/)


class DistEngine(str, Enum):
    none = "none"  # one process (dist=single)
    ddp = "ddp"  # PyTorch DistributedDataParallel: a whole copy of the model per process, gradients all-reduced
    fsdp = "fsdp"  # PyTorch FSDP2 through accelerate: parameters, gradients and optimizer states sharded
    deepspeed = "deepspeed"  # DeepSpeed ZeRO through accelerate: dist.zero.stage says what is partitioned


class OffloadDevice(str, Enum):
    none = "none"
    cpu = "cpu"


class FsdpStateDict(str, Enum):
    sharded = "sharded"  # one file per rank: fast, and no rank ever holds the whole model
    full = "full"  # gathered on rank 0 into one file per checkpoint


@dataclass
class FsdpConfig:
    """FSDP2 settings (dist.engine=fsdp). Each wrap unit is gathered for its forward and backward only."""

    # true: full shard, each unit's parameters are freed after its forward and gathered again for the backward
    # (ZeRO-3-like); false: kept gathered between forward and backward (more memory, one all-gather less).
    reshard_after_forward: bool = True
    # With model.gradient_checkpointing: FSDP's own checkpoint wrapper on the wrap units instead of transformers'
    # (which would gather every unit a second time in the backward).
    activation_checkpointing: bool = True
    cpu_offload: bool = False  # parameters and gradients in CPU memory between uses (slow; for tight GPUs)
    state_dict_type: FsdpStateDict = FsdpStateDict.sharded  # checkpoint-*/ layout; final/ is always consolidated
    # Wrap units by class name. Empty: the model's decoder layers and vision blocks (read off the model family).
    wrap_classes: List[str] = field(default_factory=list)
    # Load the checkpoint on rank 0 only and broadcast it while sharding (CPU memory of one copy per machine
    # instead of one per process).
    cpu_ram_efficient_loading: bool = False


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings (dist.engine=deepspeed). The DeepSpeed JSON is generated from these and the rest of
    the config (qwenvl_ft/distributed/zero.py), never kept by hand."""

    stage: int = 2  # 1: optimizer states, 2: + gradients, 3: + parameters partitioned over the processes
    offload_optimizer: OffloadDevice = OffloadDevice.none  # optimizer states (and the step) in CPU memory
    offload_param: OffloadDevice = OffloadDevice.none  # parameters in CPU memory between uses (stage 3 only)
    overlap_comm: bool = True  # overlap gradient reduction with the backward
    contiguous_gradients: bool = True  # gradients copied into one buffer as produced (less fragmentation)
    # Stage 3: gather the partitioned weights when saving, so that final/ is one ordinary model (on rank 0).
    gather_16bit_weights_on_model_save: bool = True


@dataclass
class DistConfig:
    """How the run is spread over processes and machines. `single` runs one process; the others start one process
    per GPU (`qwenvl-ft train` launches them itself through torch's launcher; `torchrun`, `accelerate launch` and
    `srun` work too). See docs/distributed.md."""

    engine: DistEngine = DistEngine.none  # set by the option: none (single), ddp, fsdp or deepspeed (zero*)
    # Processes on this machine. None: one per visible GPU; on a machine without GPUs one process (a warning says
    # so): set it to run N CPU processes over gloo.
    num_processes: Optional[int] = None
    num_machines: int = 1  # machines in the run, each starting num_processes processes
    machine_rank: int = 0  # this machine's number, 0 .. num_machines-1 (machine 0 hosts the rendezvous)
    # Address of machine 0, reachable from all; needed with num_machines > 1 (inside a SLURM job: the first node)
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500  # the rendezvous port on machine 0
    backend: Optional[str] = None  # torch.distributed backend; None: nccl with GPUs, gloo on CPU
    timeout_s: int = 1800  # a collective waiting longer than this fails the run instead of hanging it
    # Restarts of the whole process group after a failure (torch elastic); each restart resumes from the newest
    # complete checkpoint like a re-run of the same command.
    max_restarts: int = 0
    # Filled in when the run starts (processes x machines) so that config.yaml records it; not set by hand.
    world_size: Optional[int] = None
    gpu_memory_gib: Optional[float] = None  # one GPU's memory: `qwenvl-ft estimate` says which options fit it
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def __post_init__(self) -> None:
        _check(self.num_processes is None or self.num_processes >= 1, "dist.num_processes must be >= 1")
        _check(self.num_machines >= 1, "dist.num_machines must be >= 1")
        _check(0 <= self.machine_rank < self.num_machines,
               f"dist.machine_rank must be in 0..{self.num_machines - 1} (dist.num_machines={self.num_machines})")
        _check(0 < self.main_process_port < 65536, "dist.main_process_port must be a port number")
        _check(self.timeout_s > 0 and self.max_restarts >= 0, "dist.timeout_s must be > 0, dist.max_restarts >= 0")
        _check(self.engine != DistEngine.none or (self.num_processes in (None, 1) and self.num_machines == 1),
               "dist=single runs one process; pick dist=ddp, fsdp, zero2, zero3 or zero3_offload for more")
        _check(self.zero.stage in (0, 1, 2, 3), "dist.zero.stage must be 0, 1, 2 or 3")
        _check(self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "dist.gpu_memory_gib must be > 0")
        _check(self.zero.offload_param == OffloadDevice.none or self.zero.stage == 3,
               "dist.zero.offload_param needs dist.zero.stage=3 (only stage 3 partitions the parameters)")

    @property
    def is_sharded(self) -> bool:
        """Whether parameters are split over the processes (every process must then run every module)."""
        return self.engine == DistEngine.fsdp or (self.engine == DistEngine.deepspeed and self.zero.stage == 3)


# ----------------------------------------------------------------------------------------------------------------
# hub


# A Hub repository id: "name" (under the logged-in user) or "owner/name"; the Hub's own rule, checked here so that a
# typo fails at compose time rather than after training.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class HubConfig:
    """Uploading the result to the Hugging Face Hub: `final/` after `qwenvl-ft train`, `merged/` after `qwenvl-ft
    merge` (model card included). Authentication is huggingface_hub's own: `hf auth login` or HF_TOKEN."""

    push: bool = False  # upload after the command finished (a failed upload leaves everything saved in place)
    repo_id: Optional[str] = None  # "name" or "owner/name"; created when missing
    private: bool = True  # visibility of a repository created by the push (an existing one keeps its own)
    revision: Optional[str] = None  # branch to commit to (None: main)
    commit_message: Optional[str] = None  # None: "qwenvl-ft: <run folder>"

    def __post_init__(self) -> None:
        _check(not self.push or self.repo_id is not None, "hub.push=true needs hub.repo_id=NAME or OWNER/NAME")
        _check(self.repo_id is None or (len(self.repo_id) <= 96 and bool(_REPO_ID.match(self.repo_id))
                                        and ".." not in self.repo_id and "--" not in self.repo_id),
               f"hub.repo_id={self.repo_id!r} is not a Hub repository id (NAME or OWNER/NAME: letters, digits, "
               f"'-', '_', '.', at most 96 characters)")


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
    dist: DistConfig = field(default_factory=DistConfig)
    output_dir: str = "outputs/run"  # where the run writes (the primary configs: outputs/<recipe>/<run_name>)
    seed: int = 42  # seed of initialisation, dropout and data order
    run_name: str = "run"  # names the output folder outputs/<recipe>/<run_name> (the primary configs: a timestamp)
    # What a Hydra sweeper optimises (sweep=optuna): the job returns this metric, a metrics.json key or the last
    # logged value of a log_history.json key (eval_loss, eval_exact_match_after, train_loss, ...).
    objective: Optional[str] = None
    hub: HubConfig = field(default_factory=HubConfig)  # upload final/ (train) or merged/ (merge) to the Hub

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
        # Each data format belongs to the method that reads it; the method checks the rest of its settings.
        method, owner = methods.get(self.trainer.kind), self.data.format.method
        _check(owner is method, f"trainer={method.name} needs {method.row_kind}, but data.format="
                                f"{self.data.format.value} holds {owner.row_kind}: train it with trainer={owner.name}, "
                                f"or use data={', data='.join(method.data_formats)}")
        method.check_config(self)
        self._check_dist(method)

    def _check_dist(self, method) -> None:
        """What the distributed engines cannot do with the rest of the config."""
        dist = self.dist
        _check(method.distributed or dist.engine == DistEngine.none,
               f"trainer={method.name} runs in one process only: use dist=single")
        if self.adapter.load_in_4bit and dist.is_sharded:
            engine = "dist=fsdp" if dist.engine == DistEngine.fsdp else "dist.zero.stage=3"
            raise ConfigError(f"adapter=qlora cannot be combined with {engine}: bitsandbytes' packed 4-bit weights "
                              f"are not split over processes here. QLoRA fits one GPU; use dist=ddp (a 4-bit copy "
                              f"per GPU) or dist=zero2 to train it on several")
        _check(dist.zero.offload_optimizer == OffloadDevice.none or dist.zero.stage >= 1,
               "dist.zero.offload_optimizer needs dist.zero.stage >= 1 (stage 0 keeps no optimizer partition)")


# ----------------------------------------------------------------------------------------------------------------
# eval / infer / merge: the train groups (so that a recipe means the same model, data and adapter) plus one group
# for the command


@dataclass
class GenerationSettings:
    """Decoding settings handed to `model.generate` (eval and infer)."""

    max_new_tokens: int = 64  # tokens generated per answer at most
    do_sample: bool = False  # False: greedy (or beam search with num_beams > 1); the sampling fields are ignored
    temperature: float = 1.0  # with do_sample: < 1 sharper, > 1 flatter
    top_p: float = 1.0  # with do_sample: nucleus sampling mass (1: off)
    top_k: int = 50  # with do_sample: sample among the k likeliest tokens (0: off)
    num_beams: int = 1  # beam search width (1: none)
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "generation.max_new_tokens must be > 0")
        _check(self.temperature > 0, "generation.temperature must be > 0")
        _check(0 < self.top_p <= 1, "generation.top_p must be in (0, 1]")
        _check(self.top_k >= 0, "generation.top_k must be >= 0")
        _check(self.num_beams >= 1, "generation.num_beams must be >= 1")
        _check(self.repetition_penalty > 0, "generation.repetition_penalty must be > 0")

    def kwargs(self) -> dict:
        out = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams,
                   repetition_penalty=self.repetition_penalty)
        if self.do_sample:  # passing them with do_sample=False only earns a warning from transformers
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return out


EVAL_METRICS = ("exact_match", "bleu", "rouge_l")  # implemented in qwenvl_ft/evaluation/metrics.py


@dataclass
class EvalConfig:
    """`qwenvl-ft eval`: generate on the held-out rows with the base and the fine-tuned model, side by side."""

    # The fine-tuned adapter or model folder (a run's final/, a checkpoint-*, a merged folder); null: base only.
    # eval.yaml defaults it to the final/ of the run named by run_name.
    model_path: Optional[str] = None
    compare_base: bool = True  # also generate with the base model (model group) and report both
    num_samples: Optional[int] = None  # the first N held-out rows (None: all)
    batch_size: int = 8  # rows per generation batch
    # Reported metrics: exact_match, bleu, rouge_l
    metrics: List[str] = field(default_factory=lambda: list(EVAL_METRICS))
    num_examples: int = 8  # predictions shown in the log, the report and the TensorBoard gallery
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        _check(self.model_path is not None or self.compare_base,
               "eval.model_path is null and eval.compare_base is false: nothing to evaluate")
        _check(self.num_samples is None or self.num_samples > 0, "eval.num_samples must be > 0")
        _check(self.batch_size > 0, "eval.batch_size must be > 0")
        _check(self.num_examples >= 0, "eval.num_examples must be >= 0")
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        _check(not unknown, f"eval.metrics has {unknown}; valid: {list(EVAL_METRICS)}")


@dataclass
class InferConfig:
    """`qwenvl-ft infer`: one prompt over one or many images, batched; predictions printed and written as JSONL."""

    model_path: Optional[str] = None  # adapter folder, full or merged model folder; null: the base model
    images: List[str] = field(default_factory=list)  # required: image files and/or folders (every image inside)
    prompt: str = "Describe the image."  # the user text asked of every image
    batch_size: int = 4  # images per generation batch
    output_file: Optional[str] = None  # JSONL; None: <output_dir>/predictions.jsonl
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        _check(self.prompt.strip() != "", "infer.prompt is empty")
        _check(self.batch_size > 0, "infer.batch_size must be > 0")


@dataclass
class MergeConfig:
    """`qwenvl-ft merge`: fold a LoRA/DoRA/QLoRA adapter into the unquantised base and save a complete model."""

    adapter_path: Optional[str] = None  # required; merge.yaml defaults it to the final/ of the run named by run_name
    output_path: Optional[str] = None  # required; merge.yaml defaults it to <that run>/merged
    dtype: Optional[Dtype] = None  # weights of the merged model (None: model.dtype); never 4-bit
    overwrite: bool = False  # replace an existing output_path
    max_shard_size: str = "5GB"  # largest safetensors file of the merged model

    def __post_init__(self) -> None:
        _check(self.max_shard_size.strip() != "", "merge.max_shard_size must be a size such as 5GB")


@dataclass
class ChatConfig:
    """`qwenvl-ft chat`: a Gradio page over the base, base + adapter, or a merged model (needs the `ui` extra)."""

    # Adapter folder, full or merged model folder; null: the base model. chat.yaml defaults it to the final/ of the
    # run named by run_name.
    model_path: Optional[str] = None
    host: str = "127.0.0.1"  # localhost only; 0.0.0.0 exposes the page to the network (no authentication)
    port: Optional[int] = 7860  # None: the first free port from 7860 on
    max_files: int = 8  # images and videos per message
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # the page's initial settings

    def __post_init__(self) -> None:
        _check(self.port is None or 0 < self.port < 65536, "chat.port must be in 1..65535 (or null: a free port)")
        _check(self.max_files > 0, "chat.max_files must be > 0")


@dataclass
class EvalRunConfig(TrainConfig):
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class InferRunConfig(TrainConfig):
    infer: InferConfig = field(default_factory=InferConfig)


@dataclass
class MergeRunConfig(TrainConfig):
    merge: MergeConfig = field(default_factory=MergeConfig)


@dataclass
class ChatRunConfig(TrainConfig):
    chat: ChatConfig = field(default_factory=ChatConfig)


# primary config name (conf/<name>.yaml) -> root schema, registered as `<name>_schema`
ROOT_SCHEMAS = {
    "train": TrainConfig,
    "eval": EvalRunConfig,
    "infer": InferRunConfig,
    "merge": MergeRunConfig,
    "chat": ChatRunConfig,
}


def root_schema(config_name: str):
    return ROOT_SCHEMAS.get(config_name, TrainConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "adapter": AdapterConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "dist": DistConfig,
}


def register_schemas() -> None:
    """Register the root schemas so that each primary config can list its own first in its defaults."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in ROOT_SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)
