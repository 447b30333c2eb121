"""Preference pairs for DPO: read a dataset in one of the preference layouts and turn every row into

    {"prompt":   [messages ending on a user turn; content items as in data/rows.py],
     "chosen":   [{"role": "assistant", "content": [text item]}],
     "rejected": [{"role": "assistant", "content": [text item]}],
     "images":   [one reference per image item of the prompt, in order],
     "source":   "file:row"}

which is TRL's conversational preference format (so TRL's vision preference collator reads it as it is) plus the
row's origin for error messages. As in data/converters.py, images are not opened here, and a row whose structure
is wrong fails with its file, row and field.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qwenvl_ft.config.data import DataConfig, DataFormat, ShapesConfig
from qwenvl_ft.data.arrow import _image_ref_feature
from qwenvl_ft.data.converters import Converter, _as_list, _field, _resolve, _split_placeholders, images_first, \
    message_list
from qwenvl_ft.data.rows import Problem, check_conversation, finish_row, text_item
from qwenvl_ft.data.splitting import read_method_rows
from qwenvl_ft.errors import DataError

log = logging.getLogger("qwenvl_ft")

ANSWER_FIELDS = ("chosen", "rejected")


# ----------------------------------------------------------------------------------------------------------------
# converters: record -> canonical preference row


def _image_refs(record: dict) -> List[Any]:
    return _as_list(record.get("images", record.get("image")))


def from_llava_preference(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    """{"image": ..., "prompt" (or "question"): "<image>\\n...", "chosen": "...", "rejected": "..."}"""
    prompt_field = "question" if isinstance(record, dict) and "prompt" not in record and "question" in record \
        else "prompt"
    prompt = _field(record, prompt_field, where, str)
    images = _image_refs(record)
    messages = [{"role": "user", "content": _split_placeholders(prompt)}]
    images_first(messages, len(images))
    answers = {}
    for name in ANSWER_FIELDS:
        answers[name] = [{"role": "assistant", "content": [text_item(_field(record, name, where, str))]}]
    row = {"prompt": messages, **answers, "images": [_resolve(i, base) for i in images], "source": where}
    return finish_row(row, where, cfg, "prompt", check_pair)


def _messages(raw: Any, where: str, name: str, images: List[Any]) -> List[dict]:
    """A message list (or one message) in the HF / TRL layout -> canonical messages (`message_list`)."""
    return message_list(raw, where, name, images, "videos are not supported in preference pairs")


def from_messages_preference(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    """{"images": [...], "prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]};
    without `prompt`, chosen and rejected are whole conversations and their shared leading turns are the prompt
    (TRL's implicit-prompt layout)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    images = _image_refs(record)
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt", images)
        answers = {name: _messages(_field(record, name, where), where, name, images) for name in ANSWER_FIELDS}
    else:
        chosen = _messages(_field(record, "chosen", where), where, "chosen", images)
        rejected = _messages(_field(record, "rejected", where), where, "rejected", [])
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, answers = chosen[:shared], {"chosen": chosen[shared:], "rejected": rejected[shared:]}
        if not prompt:
            raise DataError(f"{where}: field 'prompt' is missing and chosen/rejected share no leading turns")
    images_first(prompt, len(images))
    row = {"prompt": prompt, **answers, "images": [_resolve(i, base) for i in images], "source": where}
    return finish_row(row, where, cfg, "prompt", check_pair)


CONVERTERS: Dict[DataFormat, Converter] = {
    DataFormat.llava_preference: from_llava_preference,
    DataFormat.messages_preference: from_messages_preference,
}


def check_pair(row: dict, where: str) -> None:
    """Each answer is one assistant turn of text; prompt + answer is a valid conversation (data/rows.py rules:
    alternating turns, non-empty answer, as many images as image items); and the two answers differ (a pair whose
    answers are the same text teaches nothing: DPO's loss stays at log 2 = 0.693 on it)."""
    for name in ANSWER_FIELDS:
        answer = row[name]
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in answer) or "none"
            raise DataError(f"{where}: field '{name}' must be exactly one assistant message, got: {roles}")
        if any(item["type"] == "image" for item in answer[0]["content"]):
            raise DataError(f"{where}: field '{name}': images in answers are not supported; put them in the prompt")
        try:
            check_conversation({"messages": row["prompt"] + answer, "images": row["images"]}, where)
        except DataError as err:
            # The conversation checker counts turns over prompt + answer; say which answer it was.
            raise DataError(f"{err} (checking prompt + {name})") from None
    chosen, rejected = (_answer_text(row[name]) for name in ANSWER_FIELDS)
    if chosen == rejected:
        shown = chosen if len(chosen) <= 60 else chosen[:57] + "..."
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same answer ({shown!r}): the pair teaches "
                        f"nothing (DPO's loss stays at 0.693 on it); fix one answer or drop the row")


def _answer_text(answer: List[dict]) -> str:
    return "".join(item.get("text") or "" for item in answer[0]["content"] if item["type"] == "text").strip()


# ----------------------------------------------------------------------------------------------------------------
# the generated set


def shapes_preference_rows(count: int, size: int, seed: int, split: str) -> List[dict]:
    """The shapes rows (shapes.py) as pairs: chosen = the right description, rejected = a wrong one, drawn
    uniformly from every other colour/shape combination so that neither answer can be told apart without the
    image."""
    from qwenvl_ft.data.shapes import COLOURS, SHAPES, make_rows

    rng = random.Random(f"{seed}-{split}-rejected")
    descriptions = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    pairs = []
    for row in make_rows(count, size, seed, split):
        *prompt, answer = row["messages"]
        right = answer["content"][0]["text"]
        wrong = rng.choice([d for d in descriptions if d != right])
        pairs.append({
            "prompt": prompt,
            "chosen": [answer],
            "rejected": [{"role": "assistant", "content": [text_item(wrong)]}],
            "images": row["images"],
            "source": row["source"],
        })
    return pairs


def generate_pairs(cfg: ShapesConfig) -> Tuple[List[dict], List[dict]]:
    return (shapes_preference_rows(cfg.num_train, cfg.image_size, cfg.seed, "train"),
            shapes_preference_rows(cfg.num_eval, cfg.image_size, cfg.seed, "eval"))


# ----------------------------------------------------------------------------------------------------------------
# loading a split


def to_pair_dataset(rows: List[dict]):
    """A datasets.Dataset of canonical pairs (TRL's DPOTrainer treats it as vision data by its `images` column)."""
    import datasets

    text = datasets.Value("string")
    messages = datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})})
    features = datasets.Features({
        "prompt": messages,
        "chosen": messages,
        "rejected": messages,
        "images": datasets.List(_image_ref_feature(rows)),
        "source": text,
    })
    table = [{key: row[key] for key in features} for row in rows]
    return datasets.Dataset.from_list(table, features=features)


def pair_features():
    import datasets

    from qwenvl_ft.data.store import messages_feature

    return datasets.Features({"prompt": messages_feature(), "chosen": messages_feature(),
                              "rejected": messages_feature(), "images": datasets.List(datasets.Image(decode=False)),
                              "source": datasets.Value("string")})


def encode_pair(row: dict) -> dict:
    from qwenvl_ft.data.store import image_record

    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
            "images": [image_record(i) for i in row.get("images") or []], "source": row.get("source", "?")}


def pairs_kind():
    from qwenvl_ft.data.store import RowKind

    return RowKind("preference pair", pair_features, encode_pair)


def load_pair_rows(cfg: DataConfig, problems: Optional[List[Problem]] = None) -> Tuple[List[dict], List[dict]]:
    """(train pairs, held-out pairs) as lists of canonical pairs, data.max_samples applied. The first bad row
    raises DataError, or with `problems` every bad row is recorded there and left out."""
    return read_method_rows(cfg, problems, DataFormat.shapes_preference, generate_pairs, CONVERTERS,
                            "preference pairs")


def load_pair_splits(cfg: DataConfig) -> Tuple[Any, Optional[Any]]:
    """(train dataset, eval dataset or None) of canonical preference pairs, without opening images (training and
    data-check go through qwenvl_ft.data.check, which does). With data.skip_invalid, rows whose structure is wrong
    are left out and counted instead of stopping."""
    problems: Optional[List[Problem]] = [] if cfg.skip_invalid else None
    train, evaluation = load_pair_rows(cfg, problems)
    if problems:
        shown = "\n".join(f"  {p.message}" for p in problems[:5])
        log.warning("data.skip_invalid: left out %d invalid pair(s), the first:\n%s", len(problems), shown)
    if not train:
        raise DataError(f"{cfg.path or 'shapes_preference'}: no training pairs")
    return to_pair_dataset(train), (to_pair_dataset(evaluation) if evaluation else None)
