"""Prompt rows for GRPO: read a dataset in one of the prompt layouts and turn every row into

    {"prompt":   [messages ending on a user turn; content items as in data/rows.py],
     "images":   [one reference per image item of the prompt, in order],
     "solution": the reference answer the rewards compare with, as text (None: a prompt-only row),
     "source":   "file:row N",
     ...:        every other top-level field of the record holding a plain value (text, number, true/false),
                 kept as a column so that a reward can read it (a built-in's `field` option, a parameter of your
                 own reward function)}

which is TRL's conversational prompt format (GRPOTrainer reads `prompt` and `images`, and hands every column to the
reward functions). A reference that is not text (a number, a list of box coordinates) is stored as its JSON text.
As in data/converters.py, images are not opened here, and a row whose structure is wrong fails with its file, row
and field.

`PromptImages` is what stands between the dataset and TRL: GRPOTrainer's data collator is the identity, so without
it TRL would hand the raw references to the processor. It opens, checks and sizes each row's images exactly as the
SFT collator does (data.min_pixels / max_pixels / fixed size, data.max_image_pixels, data.max_images_per_row,
data.max_visual_tokens, errors naming the row and field) and gives TRL RGB images already at the size the model
sees, so the processor's own resize is a no-op (tests/test_grpo.py checks the pixels and tokens TRL computes from
them against the SFT collator's).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qwenvl_ft.config.data import DataConfig, DataFormat, Overlength, ShapesConfig, ShapesTask
from qwenvl_ft.data.arrow import _image_ref_feature
from qwenvl_ft.data.collate import RowDropped, SampleStats, VisionChatCollator
from qwenvl_ft.data.converters import Converter, _as_list, _field, _resolve, _split_placeholders, images_first, \
    llava_turns, message_list
from qwenvl_ft.data.rows import Problem, check_conversation, finish_row, text_item
from qwenvl_ft.data.splitting import read_method_rows
from qwenvl_ft.errors import DataError

log = logging.getLogger("qwenvl_ft")

PROMPT_FIELDS = ("prompt", "question", "problem", "query")  # the prompt text of a flat LLaVA-like row, first found
SOLUTION_FIELDS = ("solution", "answer", "ground_truth", "reference")  # its reference answer, first found
IMAGE_FIELDS = ("image", "images")
VIDEO_FIELDS = ("video", "videos")
NO_VIDEOS = "videos are not supported in GRPO prompt rows (TRL's GRPOTrainer passes images only)"
# A placeholder answer turn: the SFT collator renders a row's prompt as "every turn but the last", plus the
# generation prompt (what `generate` and TRL both use).
ANSWER_SLOT = {"role": "assistant", "content": [text_item("answer")]}


# ----------------------------------------------------------------------------------------------------------------
# converters: record -> canonical prompt row


def _reference_text(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _first(record: dict, names) -> Tuple[Optional[str], Any]:
    for name in names:
        if name in record:
            return name, record[name]
    return None, None


def _no_videos(record: dict, where: str) -> None:
    for name in VIDEO_FIELDS:
        if record.get(name):
            raise DataError(f"{where}: field '{name}': {NO_VIDEOS}")


def _extras(record: dict, consumed) -> Dict[str, Any]:
    """The record's other top-level fields with a plain value: columns the rewards may read."""
    return {key: value for key, value in record.items() if key not in consumed and not key.startswith("_")
            and (value is None or isinstance(value, (str, int, float, bool)))}


def _split_answer(messages: List[dict]) -> Tuple[List[dict], Optional[str]]:
    """A conversation that ends on an assistant turn is an SFT row: that turn is the reference answer."""
    if messages and messages[-1]["role"] == "assistant":
        answer = "".join(i["text"] or "" for i in messages[-1]["content"] if i["type"] == "text")
        return messages[:-1], answer
    return messages, None


def from_llava_prompt(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    """{"image": ..., "prompt" | "question" | "problem": "<image>\\n...", "solution" | "answer": ...}, or a LLaVA
    SFT row ({"image", "conversations"}) whose last assistant turn, when there is one, is the reference."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    _no_videos(record, where)
    solution_name, solution = _first(record, SOLUTION_FIELDS)
    if "conversations" in record:
        messages = llava_turns(_field(record, "conversations", where, list), where)
        prompt, answer = _split_answer(messages)
        consumed = {"conversations"}
    else:
        prompt_name, _ = _first(record, PROMPT_FIELDS)
        if prompt_name is None:
            raise DataError(f"{where}: no prompt: a row needs one of the fields {', '.join(PROMPT_FIELDS)} or "
                            f"'conversations' (fields: {', '.join(record) or 'none'})")
        prompt = [{"role": "user", "content": _split_placeholders(_field(record, prompt_name, where, str))}]
        answer, consumed = None, {prompt_name}
    images = _as_list(record.get("image", record.get("images")))
    images_first(prompt, len(images))
    consumed |= set(IMAGE_FIELDS) | set(VIDEO_FIELDS) | {"source", "solution"}
    row = {"prompt": prompt, "images": [_resolve(i, base) for i in images],
           "solution": answer if answer is not None else _reference_text(solution), "source": where,
           **_extras(record, consumed)}
    if solution_name is not None:
        row.setdefault(solution_name, _reference_text(solution))
    return finish_row(row, where, cfg, "prompt", check_prompt)


def _messages(raw: Any, where: str, name: str, images: List[Any]) -> List[dict]:
    if isinstance(raw, str):  # TRL's prompt-only rows may hold the user text alone
        return [{"role": "user", "content": [text_item(raw)]}]
    return message_list(raw, where, name, images, NO_VIDEOS)


def from_messages_prompt(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    """{"images": [...], "prompt": [messages] (or the user text), "solution": ...}: TRL's prompt-only layout; or
    {"images", "messages"} whose last assistant turn, when there is one, is the reference."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    _no_videos(record, where)
    images = _as_list(record.get("images", record.get("image")))
    key = "prompt" if "prompt" in record else "messages"
    prompt, answer = _split_answer(_messages(_field(record, key, where), where, key, images))
    images_first(prompt, len(images))
    solution_name, solution = _first(record, SOLUTION_FIELDS)
    consumed = {key, "source", "solution"} | set(IMAGE_FIELDS) | set(VIDEO_FIELDS)
    row = {"prompt": prompt, "images": [_resolve(i, base) for i in images],
           "solution": answer if answer is not None else _reference_text(solution), "source": where,
           **_extras(record, consumed)}
    if solution_name is not None:
        row.setdefault(solution_name, _reference_text(solution))
    return finish_row(row, where, cfg, "prompt", check_prompt)


CONVERTERS: Dict[DataFormat, Converter] = {
    DataFormat.llava_prompt: from_llava_prompt,
    DataFormat.messages_prompt: from_messages_prompt,
}


def check_prompt(row: dict, where: str) -> None:
    """The prompt is a valid conversation that ends on a user turn (data/rows.py's rules: roles, alternation, no
    control tokens in the text, as many images as image items)."""
    prompt = row["prompt"]
    if not prompt or prompt[-1]["role"] != "user":
        roles = ", ".join(m["role"] for m in prompt) or "none"
        raise DataError(f"{where}: the prompt must end on a user turn (the model answers it), got: {roles}")
    check_conversation({"messages": prompt + [ANSWER_SLOT], "images": row["images"]}, where)


# ----------------------------------------------------------------------------------------------------------------
# the generated set


def shapes_prompt_rows(count: int, size: int, seed: int, split: str,
                       task: ShapesTask = ShapesTask.caption, grid: int = 3) -> List[dict]:
    """The shapes rows (shapes.py) as prompts: "What is in the image?", solution = its description (grounding: the
    shape's box, as the row's objects)."""
    from qwenvl_ft.data.shapes import make_rows

    rows = []
    for row in make_rows(count, size, seed, split, task, grid):
        *prompt, answer = row["messages"]
        solution = answer["content"][0]["text"]
        extra = {}
        if row.get("objects"):  # grounding: the solution is the objects, written per image size (PromptImages)
            solution, extra = None, {"objects": row["objects"]}
        rows.append({"prompt": prompt, "images": row["images"], "solution": solution, "source": row["source"],
                     **extra})
    return rows


def generate_prompts(cfg: ShapesConfig) -> Tuple[List[dict], List[dict]]:
    return (shapes_prompt_rows(cfg.num_train, cfg.image_size, cfg.seed, "train", cfg.task, cfg.grid),
            shapes_prompt_rows(cfg.num_eval, cfg.image_size, cfg.seed, "eval", cfg.task, cfg.grid))


# ----------------------------------------------------------------------------------------------------------------
# loading and checking


def load_prompt_rows(cfg: DataConfig, problems: Optional[List[Problem]] = None) -> Tuple[List[dict], List[dict]]:
    """(train rows, eval rows) of canonical prompt rows: read (or generated), seeded shuffle and split,
    data.max_samples. With `problems`, rows whose structure is wrong are recorded there and left out."""
    return read_method_rows(cfg, problems, DataFormat.shapes_prompt, generate_prompts, CONVERTERS,
                            "GRPO prompt rows")


def as_chat_row(row: dict) -> dict:
    """The prompt row as an SFT row whose last turn is a placeholder answer: what the SFT collator's prompt-only
    paths (`generation_batch`, `measure_prompt`) take."""
    return {"messages": list(row["prompt"]) + [ANSWER_SLOT], "images": row.get("images") or [], "videos": [],
            "source": row.get("source", "?")}


class PromptMeasurer:
    """What `data-check` runs on each prompt row (check.py's `measure` protocol): images opened, checked and sized,
    the prompt rendered with the generation prompt and tokenised, its length against data.max_length. A prompt is
    never cut (the question would change): one over data.max_length is dropped, or invalid with
    data.overlength=error."""

    def __init__(self, processor, data_cfg: DataConfig):
        self.chat = VisionChatCollator(processor, data_cfg)
        self.cfg = data_cfg
        # the image bounds data-check reports
        self.min_pixels, self.max_pixels = self.chat.min_pixels, self.chat.max_pixels
        self.video_min_pixels, self.video_max_pixels = self.chat.video_min_pixels, self.chat.video_max_pixels

    def measure(self, row: dict) -> SampleStats:
        chat_row = as_chat_row(row)
        source = chat_row["source"]
        visuals = self.chat.load_visuals(chat_row, resize=False)
        sample = self.chat._tokens_and_labels(chat_row, visuals, prompt_only=True)
        length = sample["input_ids"].numel()
        limit = self.cfg.max_length
        if limit is not None and length > limit:
            over = f"{source}: prompt of {length} tokens, over data.max_length={limit}"
            if self.cfg.overlength == Overlength.error:
                raise DataError(f"{over} (data.overlength=error; a prompt is never cut: raise data.max_length or "
                                f"lower data.max_pixels)")
            raise RowDropped(f"{over}: dropped (a prompt is never cut)")
        image_tokens = [self.chat._tokens(g) for g in visuals.image_grids]
        return SampleStats(source=source, length=length, full_length=length,
                           text_tokens=length - sum(image_tokens), label_tokens=0,
                           image_sizes=visuals.image_sizes, image_tokens=image_tokens, video_sizes=[],
                           video_tokens=[])


def to_prompt_dataset(rows: List[dict]):
    """A datasets.Dataset of canonical prompt rows. Arrow wants one type per column: images are strings, or
    undecoded datasets images when any is a PIL image or bytes; an extra column takes the type its values share
    (whole numbers with fractions become floats), or text when they disagree; a row without it holds None."""
    import datasets

    text = datasets.Value("string")
    features = {
        "prompt": datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})}),
        "images": datasets.List(_image_ref_feature(rows)),
        "solution": text,
        "source": text,
    }
    extra_names = sorted({key for row in rows for key in row} - set(features))
    for name in extra_names:
        features[name] = _plain_feature([row.get(name) for row in rows])
    table = []
    for row in rows:
        entry = {key: row.get(key) for key in features}
        for name in extra_names:
            if features[name] == text and entry[name] is not None and not isinstance(entry[name], str):
                entry[name] = json.dumps(entry[name])
        table.append(entry)
    return datasets.Dataset.from_list(table, features=datasets.Features(features))


# The stored form (data/store.py, data/prepare.py): a prompt row's own columns, and every other column of the row
# (what reward functions read) as one JSON text, since the store's columns are fixed before the rows are read.
PROMPT_COLUMNS = ("prompt", "images", "solution", "source")


def prompt_features():
    import datasets

    from qwenvl_ft.data.store import messages_feature

    text = datasets.Value("string")
    return datasets.Features({"prompt": messages_feature(), "images": datasets.List(datasets.Image(decode=False)),
                              "solution": text, "extras": text, "source": text})


def encode_prompt(row: dict) -> dict:
    from qwenvl_ft.data.store import image_record

    extras = {key: value for key, value in row.items() if key not in PROMPT_COLUMNS}
    solution = row.get("solution")
    return {"prompt": row["prompt"], "images": [image_record(i) for i in row.get("images") or []],
            "solution": solution if solution is None or isinstance(solution, str) else json.dumps(solution),
            "extras": json.dumps(extras) if extras else None, "source": row.get("source", "?")}


def prompts_kind():
    from qwenvl_ft.data.store import RowKind

    return RowKind("prompt", prompt_features, encode_prompt)


def from_prompt_store(dataset):
    """The stored prompt rows as GRPO's dataset (`to_prompt_dataset`), their extra columns restored with their own
    types for the reward functions. Held in memory: GRPO's prompt sets are small next to SFT's conversations, and
    TRL hands every column of a row to the rewards."""
    rows = []
    for record in dataset:
        row = {key: record[key] for key in PROMPT_COLUMNS}
        row.update(json.loads(record["extras"]) if record.get("extras") else {})
        rows.append(row)
    return to_prompt_dataset(rows)


def _plain_feature(values: List[Any]):
    import datasets

    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return datasets.Value("bool")
    if kinds == {int}:
        return datasets.Value("int64")
    if kinds and kinds <= {int, float}:
        return datasets.Value("float64")
    return datasets.Value("string")


class PromptImages:
    """GRPOTrainer's data collator: the rows of a generation batch with their images opened, checked and sized as
    the SFT collator sizes them, as RGB PIL images (what TRL and its processor take). GRPO's sampler repeats each
    prompt num_generations times in a row; each distinct row's images are loaded once and shared by its copies.
    Pickles (DataLoader workers)."""

    def __init__(self, processor, data_cfg: DataConfig):
        self.chat = VisionChatCollator(processor, data_cfg)

    def __call__(self, rows: List[dict]) -> List[dict]:
        from torchvision.transforms.v2 import functional as tvF

        loaded: Dict[str, tuple] = {}
        out = []
        for row in rows:
            key = row.get("source", "?")
            if key not in loaded:
                visuals = self.chat.load_visuals(as_chat_row(row))
                loaded[key] = [tvF.to_pil_image(pixels) for pixels in visuals.images], self.solution(row, visuals)
            images, solution = loaded[key]
            out.append({**row, "images": images, "solution": solution})
        return out

    def solution(self, row: dict, visuals) -> Optional[str]:
        """The row's solution; a grounding row's objects written as the trained family writes them, for the size
        its image is shown at (the rewards compare the completions' boxes with it in that frame)."""
        from qwenvl_ft.data.grounding import objects_text

        objects = objects_of(row)
        if not objects:
            return row.get("solution")
        return objects_text(objects, self.chat.shown_sizes(visuals), self.chat.family.box_convention,
                            self.chat.cfg.grounding, row.get("source", "?"))


def objects_of(row: dict) -> Optional[List[dict]]:
    """A prompt row's objects (data.grounding), also when its dataset holds them as JSON text (an extra column)."""
    objects = row.get("objects")
    return json.loads(objects) if isinstance(objects, str) else objects


def with_solutions(rows: List[dict], processor, data_cfg: DataConfig) -> List[dict]:
    """The rows with each grounding row's solution written as training's rewards see it (PromptImages), for the
    held-out checks and `eval`, which score completions outside GRPO's data loader."""
    images = PromptImages(processor, data_cfg)
    return [dict(row, solution=images.solution(row, images.chat.load_visuals(as_chat_row(row), resize=False)))
            if objects_of(row) else row for row in rows]
