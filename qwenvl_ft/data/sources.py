"""Read a dataset in one of the supported layouts and turn every row into the canonical form

    {"messages": [{"role": ..., "content": [{"type": "image"|"text", "text": ...}, ...]}, ...],
     "images":   [path, base64 string, data URI, PIL image or {"bytes", "path"} -- one per image item, in order],
     "source":   "file:row"}

which is what TRL calls the conversational vision format plus the row's origin for error messages. Images are
not opened here (that happens in the collator, in DataLoader workers); a row whose structure is wrong fails here
with its file, row and field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from qwenvl_ft.config.schema import DataConfig, DataFormat
from qwenvl_ft.errors import DataError

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_VISION_SPAN = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>", re.DOTALL)


def image_item() -> dict:
    return {"type": "image", "text": None}


def text_item(text: str) -> dict:
    return {"type": "text", "text": text}


# ----------------------------------------------------------------------------------------------------------------
# reading files


def read_json_records(path: Path) -> Iterator[Tuple[str, Any]]:
    """(location, record) for a JSON array file or a JSONL file; location is 'file:row' or 'file:line N'."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:line {line}: text is not valid UTF-8 (byte offset {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the data file is empty")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    for index, record in enumerate(records):
        yield f"{path}:row {index}", record


def _field(record: Any, name: str, where: str, kind=None):
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: field '{name}' is missing (fields: {', '.join(record) or 'none'})")
    value = record[name]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{name}' must be {names}, got {type(value).__name__}")
    return value


def _resolve(ref: Any, base: Path) -> Any:
    """Relative paths resolve against the image folder; URLs, data URIs, base64 and objects pass through."""
    if not isinstance(ref, str):
        return ref
    if ref.startswith(("http://", "https://", "data:", "file://")) or len(ref) > 1024:
        return ref
    path = Path(ref)
    return str(path if path.is_absolute() else base / path)


def _split_placeholders(text: str, where: str, field: str) -> List[dict]:
    """'<image>\\nDescribe' -> [image item, text item]; the placeholder positions are kept."""
    items: List[dict] = []
    for piece in re.split(r"(<image>|<video>)", text):
        if piece == "<image>":
            items.append(image_item())
        elif piece == "<video>":
            raise DataError(f"{where}: field '{field}': video rows are not supported yet")
        elif piece.strip():
            items.append(text_item(piece.strip("\n")))
    return items


# ----------------------------------------------------------------------------------------------------------------
# one converter per layout: record -> canonical row


def from_llava(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    turns = _field(record, "conversations", where, list)
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else list(images or [])
    messages = []
    for index, turn in enumerate(turns):
        turn_where = f"{where}: conversations[{index}]"
        role = ROLE_ALIASES.get(_field(turn, "from", turn_where, str))
        if role is None:
            raise DataError(f"{turn_where}: unknown role '{turn['from']}' (valid: {', '.join(ROLE_ALIASES)})")
        value = _field(turn, "value", turn_where, str)
        messages.append({"role": role, "content": _split_placeholders(value, turn_where, "value")})
    row = {"messages": messages, "images": [_resolve(i, base) for i in images], "source": where}
    return _finish(row, where, cfg)


def from_messages(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    raw_messages = _field(record, "messages", where, list)
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, (str, dict)) or hasattr(images, "size") else list(images or [])
    messages = []
    for index, message in enumerate(raw_messages):
        m_where = f"{where}: messages[{index}]"
        role = _field(message, "role", m_where, str)
        content = _field(message, "content", m_where, (str, list))
        if isinstance(content, str):
            items = [text_item(content)]
        else:
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "image":
                    if item.get("image") is not None:  # image given inline instead of in `images`
                        images.append(item["image"])
                    items.append(image_item())
                elif kind == "text":
                    items.append(text_item(item.get("text") or ""))
                else:
                    raise DataError(f"{m_where}: content item type must be 'image' or 'text', got {kind!r}")
        messages.append({"role": role, "content": items})
    row = {"messages": messages, "images": [_resolve(i, base) for i in images], "source": where}
    return _finish(row, where, cfg)


def from_self_llm(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    """User text 'COCO Yes: <|vision_start|>path<|vision_end|>' -> image item + prompt text."""
    turns = _field(record, "conversations", where, list)
    if len(turns) != 2:
        raise DataError(f"{where}: field 'conversations' must hold a user and an assistant turn, got {len(turns)}")
    user = _field(turns[0], "value", f"{where}: conversations[0]", str)
    answer = _field(turns[1], "value", f"{where}: conversations[1]", str)
    paths = _VISION_SPAN.findall(user)
    if len(paths) != 1:
        raise DataError(f"{where}: conversations[0].value must embed exactly one image path between "
                        f"<|vision_start|> and <|vision_end|>, found {len(paths)}")
    prompt = cfg.prompt if cfg.prompt is not None else _VISION_SPAN.sub("", user).strip()
    row = {
        "messages": [{"role": "user", "content": [image_item(), text_item(prompt)]},
                     {"role": "assistant", "content": [text_item(answer)]}],
        "images": [_resolve(paths[0].strip(), base)],
        "source": where,
    }
    return _finish(row, where, cfg)


def from_amazon(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    name = _field(record, "Product Name", where, str)
    category = _field(record, "Category", where, str)
    description = _field(record, "description", where, str)
    image = _field(record, "image", where)
    prompt = (cfg.prompt or "{product_name}\n{category}").format(product_name=name, category=category)
    row = {
        "messages": [{"role": "user", "content": [image_item(), text_item(prompt)]},
                     {"role": "assistant", "content": [text_item(description)]}],
        "images": [image],
        "source": where,
    }
    return _finish(row, where, cfg)


CONVERTERS: Dict[DataFormat, Callable[[Any, str, Path, DataConfig], dict]] = {
    DataFormat.llava: from_llava,
    DataFormat.messages: from_messages,
    DataFormat.self_llm: from_self_llm,
    DataFormat.amazon: from_amazon,
}


def _finish(row: dict, where: str, cfg: DataConfig) -> dict:
    if cfg.system_message and row["messages"] and row["messages"][0]["role"] != "system":
        row["messages"].insert(0, {"role": "system", "content": [text_item(cfg.system_message)]})
    check_conversation(row, where)
    return row


def check_conversation(row: dict, where: str) -> None:
    """Roles alternate user/assistant after an optional system turn, end on the assistant, and the number of
    image items equals the number of images."""
    messages = row["messages"]
    roles = [m["role"] for m in messages]
    for index, role in enumerate(roles):
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{index}]: unknown role '{role}' (valid: system, user, assistant)")
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body:
        raise DataError(f"{where}: the conversation has no user or assistant turn")
    for index, role in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"{where}: turn {index + len(roles) - len(body)} is '{role}' where '{expected}' was "
                            f"expected: turns must alternate user/assistant")
    if body[-1] != "assistant":
        raise DataError(f"{where}: the conversation ends on a user turn; it must end with an assistant answer")
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            text = "".join(i["text"] or "" for i in message["content"] if i["type"] == "text")
            if not text.strip():
                raise DataError(f"{where}: messages[{index}]: the assistant text is empty")
    placeholders = sum(1 for m in messages for i in m["content"] if i["type"] == "image")
    if placeholders != len(row["images"]):
        raise DataError(f"{where}: {placeholders} image placeholder(s) in the text but {len(row['images'])} "
                        f"image(s) in the row")


# ----------------------------------------------------------------------------------------------------------------
# loading a split


def _records(cfg: DataConfig, path_str: str) -> Tuple[Iterator[Tuple[str, Any]], Path]:
    path = Path(path_str).expanduser()
    base = Path(cfg.image_folder).expanduser() if cfg.image_folder else (path.parent if path.is_file() else path)
    if path.suffix in (".json", ".jsonl"):
        if not path.exists():
            raise DataError(f"{path}: data file not found")
        return read_json_records(path), base
    return _hf_records(cfg, path_str), base


def _hf_records(cfg: DataConfig, path_str: str) -> Iterator[Tuple[str, Any]]:
    """Hugging Face datasets: a save_to_disk folder, parquet/arrow files, or a hub id (needs the network)."""
    import datasets

    path = Path(path_str).expanduser()
    if path.is_dir() and (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[cfg.split]
    elif path.suffix in (".parquet", ".arrow"):
        dataset = datasets.load_dataset(path.suffix[1:], data_files=str(path), split=cfg.split)
    else:
        try:
            dataset = datasets.load_dataset(path_str, split=cfg.split)
        except Exception as err:
            raise DataError(f"{path_str}: cannot load dataset ({type(err).__name__}: {err})") from None
    # Images stay undecoded ({"bytes", "path"}) until the collator opens them, with its own error messages.
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    for index, record in enumerate(dataset):
        yield f"{path_str}:row {index}", record


def load_rows(cfg: DataConfig, path: str) -> List[dict]:
    records, base = _records(cfg, path)
    convert = CONVERTERS[cfg.format]
    return [convert(record, where, base, cfg) for where, record in records]


def split_rows(rows: List[dict], cfg: DataConfig, eval_size: float) -> Tuple[List[dict], List[dict]]:
    """Seeded shuffle (when enabled), then the last `eval_size` rows (a count, or a fraction when < 1) held out."""
    import random

    if cfg.shuffle:
        rows = list(rows)
        random.Random(cfg.seed).shuffle(rows)
    if eval_size == 0:
        return rows, []
    count = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * len(rows)))
    if count >= len(rows):
        raise DataError(f"data.eval_size={eval_size} leaves no training rows ({len(rows)} rows in all)")
    return rows[:-count], rows[-count:]


def to_dataset(rows: List[dict]):
    """A datasets.Dataset of canonical rows (TRL's SFTTrainer detects vision data by the `images` column)."""
    import datasets

    has_pil = any(hasattr(image, "size") and not isinstance(image, (str, dict)) for r in rows for image in r["images"])
    text = datasets.Value("string")
    features = datasets.Features({
        "messages": datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})}),
        "images": datasets.List(datasets.Image()) if has_pil else datasets.List(_image_ref_feature(rows)),
        "source": text,
    })
    return datasets.Dataset.from_list(rows, features=features)


def _image_ref_feature(rows: List[dict]):
    import datasets

    if any(isinstance(image, dict) for r in rows for image in r["images"]):
        return datasets.Image(decode=False)
    return datasets.Value("string")


def load_splits(cfg: DataConfig) -> Tuple[Any, Optional[Any]]:
    """(train dataset, eval dataset or None) of canonical rows."""
    if cfg.format == DataFormat.shapes:
        from qwenvl_ft.data.shapes import generate

        train, evaluation = generate(cfg.shapes)
    else:
        rows = load_rows(cfg, cfg.path)
        if cfg.eval_path:
            train, _ = split_rows(rows, cfg, eval_size=0)
            evaluation = load_rows(cfg, cfg.eval_path)
        else:
            train, evaluation = split_rows(rows, cfg, cfg.eval_size)
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    if not train:
        raise DataError(f"{cfg.path or 'shapes'}: no training rows")
    return to_dataset(train), (to_dataset(evaluation) if evaluation else None)

