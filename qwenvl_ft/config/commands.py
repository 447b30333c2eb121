"""The groups of the commands other than train: `eval`, `infer`, `merge` and `chat`, each next to the train groups
(so that a recipe means the same model, data and adapter); the decoding settings eval, infer and chat share.
Their root configs (`EvalRunConfig`, ...) are in config/schema.py, with the other roots.

Standard library only: `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from qwenvl_ft.config.model import Dtype
from qwenvl_ft.errors import check as _check


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


# implemented in qwenvl_ft/evaluation/metrics.py; the grounding ones are reported only for rows with boxes
GROUNDING_METRICS = ("mean_iou", "iou_50", "point_in_box")
EVAL_METRICS = ("exact_match", "bleu", "rouge_l") + GROUNDING_METRICS


@dataclass
class EvalConfig:
    """`qwenvl-ft eval`: generate on the held-out rows with the base and the fine-tuned model, side by side."""

    # The fine-tuned adapter or model folder (a run's final/, a checkpoint-*, a merged folder); null: base only.
    # eval.yaml defaults it to the final/ of the run named by run_name.
    model_path: Optional[str] = None
    compare_base: bool = True  # also generate with the base model (model group) and report both
    num_samples: Optional[int] = None  # the first N held-out rows (None: all)
    batch_size: int = 8  # rows per generation batch
    # Reported metrics: exact_match, bleu, rouge_l, and for rows whose reference holds boxes mean_iou, iou_50,
    # point_in_box
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
