"""The `data` group: where the examples come from, how they become chat messages, and how images are sized.

Imports only the standard library and the torch-free method registry (`qwenvl_ft.methods`: each method declares
the data formats it reads): `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional, Union

from qwenvl_ft import methods
from qwenvl_ft.errors import check as _check


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


class BoxCoords(str, Enum):
    """The frame a dataset's boxes and points are in (data.grounding.coords)."""

    pixels = "pixels"  # pixels of the original image (what annotation tools write)
    relative = "relative"  # fractions of the original image's width and height, 0-1
    qwen = "qwen"  # already in the trained family's convention (its grid, or its resized image's pixels)


class BoxText(str, Enum):
    """How boxes are written in answers (data.grounding.text)."""

    family = "family"  # the trained family's own form (families/*.py: box_convention)
    json = "json"  # [{"bbox_2d": [x1, y1, x2, y2], "label": ...}] in a ```json fence
    box_tokens = "box_tokens"  # <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>


@dataclass
class GroundingConfig:
    """Boxes and points (docs/grounding.md). A row's objects are written where its text says <objects> (usually the
    answer), in the trained family's coordinates for the image size the run shows the model: recomputed for every
    resize, so a box never drifts when a size setting changes."""

    # The record field holding a row's objects: [{"label": ..., "bbox": [x1, y1, x2, y2] or "point": [x, y],
    # "image": index of the row's image (default 0)}, ...]
    field: str = "objects"
    coords: BoxCoords = BoxCoords.pixels  # the frame of the dataset's numbers (see BoxCoords)
    text: BoxText = BoxText.family  # the answers' text form
    # data-check reports a box narrower or shorter than this many patches once resized (the model cannot tell it)
    min_box_patches: float = 1.0

    def __post_init__(self) -> None:
        _check(bool(self.field), "data.grounding.field must be a field name")
        _check(self.min_box_patches >= 0, "data.grounding.min_box_patches must be >= 0")


class ShapesTask(str, Enum):
    caption = "caption"  # "What is in the image?" -> "a red circle"
    grounding = "grounding"  # "Where is the red circle?" -> its box, in the family's convention (data.shapes.grid)


@dataclass
class ShapesConfig:
    """The generated demo dataset."""

    num_train: int = 240  # generated training rows
    num_eval: int = 24  # generated held-out rows
    image_size: int = 56  # square; resized like any image (model.family's patch x merge size rounds it)
    seed: int = 0  # seed of the generated images and questions
    task: ShapesTask = ShapesTask.caption  # what the question asks (see ShapesTask)
    grid: int = 3  # grounding: the shape sits in one cell of a grid x grid layout

    def __post_init__(self) -> None:
        _check(self.num_train > 0 and self.num_eval >= 0, "data.shapes.num_train must be > 0, num_eval >= 0")
        _check(self.image_size > 0, "data.shapes.image_size must be > 0")
        _check(self.grid >= 1, "data.shapes.grid must be >= 1")


class Overlength(str, Enum):
    """What happens to a sample longer than data.max_length. A cut never falls inside a vision span (that is what
    makes the model fail with "image features and image tokens do not match")."""

    truncate_text = "truncate_text"  # cut the text after the last vision span; a row that cannot be cut so is dropped
    drop = "drop"  # drop the row
    error = "error"  # the row is invalid: data-check and training stop on it (unless data.skip_invalid)


class Thinking(str, Enum):
    """What happens to an assistant turn's reasoning (`<think>...</think>` before its answer, or a
    `reasoning_content` / `reasoning` / `thinking` field of a messages-format row, folded in so)."""

    template = "template"  # as the chat template renders it (a thinking template may keep the last turns' only)
    strip = "strip"  # removed before rendering: the model learns the answers only
    # every assistant turn rendered as the template renders the turns after the last user query: where a thinking
    # template drops the reasoning of earlier turns, keep trains it too (an earlier turn without any: an empty block)
    keep = "keep"


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
    # Text encoding of JSON/JSONL/CSV/TSV files without a byte-order mark, e.g. latin-1 or cp1252 (a BOM wins)
    encoding: str = "utf-8"
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
    # padded batches of rows of similar length, as many as fit in this many padded tokens. auto: the largest budget
    # whose estimated peak fits the GPU (qwenvl_ft/estimate/autofit.py).
    max_tokens_per_batch: Optional[Union[int, str]] = None
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
    # under cache_dir (None: the per-user cache, $QWENVL_FT_CACHE/data or ~/.cache/qwenvl_ft/data; data_cache/ in
    # the run or sweep folder for a launch over several machines), keyed by the data files (path, size,
    # modification time) and every setting that changes them; a later run, `data-check`, a resumed run, the other
    # jobs of a sweep and the other ranks of a distributed run read them instead of decoding every image again.
    cache: CacheMode = CacheMode.on
    cache_dir: Optional[str] = None  # where cache entries live (None: the per-user cache, see above)
    # Loss on the whole sequence (system and user turns, template tokens) instead of the answers only, as some
    # tutorials train; image and video tokens are never targets. SFT only.
    train_on_prompt: bool = False
    # For models whose chat template thinks: reasoning in assistant turns, and the template's
    # enable_thinking for the prompts the model answers (held-out checks, eval, infer, chat).
    thinking: Thinking = Thinking.template  # reasoning in assistant turns: as the template renders it, kept, stripped
    enable_thinking: Optional[bool] = None  # a generation prompt opens (true) or closes (false) the think block
    grounding: GroundingConfig = field(default_factory=GroundingConfig)  # boxes and points in answers

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
        _check(_known_encoding(self.encoding), f"data.encoding={self.encoding}: not an encoding Python knows (e.g. "
                                               f"utf-8, latin-1, cp1252, utf-16)")
        _check(self.eval_size < 1 or float(self.eval_size).is_integer(),
               "data.eval_size >= 1 is a row count and must be a whole number")
        _check(self.max_length is None or self.max_length > 0, "data.max_length must be positive")
        _check((self.resized_height is None) == (self.resized_width is None),
               "data.resized_height and data.resized_width must be set together")
        _check(self.num_workers == "auto" or (isinstance(self.num_workers, int) and self.num_workers >= 0),
               f"data.num_workers must be auto or a number >= 0, not {self.num_workers!r}")
        _check(self.max_samples is None or self.max_samples > 0,
               f"data.max_samples={self.max_samples}: must be > 0 (or null: every row)")
        budget = self.max_tokens_per_batch
        _check(budget in (None, "auto") or (isinstance(budget, int) and budget > 0),
               f"data.max_tokens_per_batch must be auto, a number > 0 or null, not {budget!r}")
        _check(not self.packing or self.max_tokens_per_batch is not None or self.max_length is not None,
               "data.packing with data.max_length=null needs data.max_tokens_per_batch (the pack size)")
        _check(budget in (None, "auto") or self.max_length is None or budget >= self.max_length,
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


def _known_encoding(name: str) -> bool:
    import codecs

    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True
