"""Read a dataset in one of the supported layouts and turn every row into the canonical form

    {"messages": [{"role": ..., "content": [{"type": "image"|"video"|"text", "text": ...}, ...]}, ...],
     "images":   [path, URL, base64 string, data URI, PIL image or {"bytes", "path"} -- one per image item, in order],
     "videos":   [path / URL, or a list of frame references -- one per video item, in order],
     "source":   "file:row N" (JSON arrays, datasets) or "file:line N" (JSONL)}

which is what TRL calls the conversational vision format plus the row's origin for error messages. Images and
videos are not opened here (that happens in the collator, in DataLoader workers, and in data-check); a row whose
structure is wrong fails here with its file, row and field, or, when a `problems` list is passed, is recorded
there and left out so that every bad row can be reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from qwenvl_ft.config.schema import DataConfig, DataFormat, SourceConfig
from qwenvl_ft.errors import DataError

log = logging.getLogger("qwenvl_ft")

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_VISION_SPAN = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>", re.DOTALL)
# Control tokens of Qwen's tokenizer: in user text they would be read as structure (a literal <|image_pad|> is an
# image with no pixels, a literal <|im_end|> ends the turn) instead of as text.
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".tsv")
Converter = Callable[[Any, str, Path, DataConfig], dict]  # (record, where, image folder, data config) -> row


@dataclass
class Problem:
    """One invalid row (or unreadable part of a file): where it is and the message that says why."""

    source: str
    message: str


def image_item() -> dict:
    return {"type": "image", "text": None}


def video_item() -> dict:
    return {"type": "video", "text": None}


def text_item(text: str) -> dict:
    return {"type": "text", "text": text}


# ----------------------------------------------------------------------------------------------------------------
# reading files


def _decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: text is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}; "
                        f"re-save the file as UTF-8)") from None


# Byte-order marks some editors (Notepad, Excel exports) put at the start of a text file. UTF-8's is read past;
# UTF-16/32 files are decoded whole and read as UTF-8.
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def _open_text_bytes(path: Path):
    """A binary stream of the file's UTF-8 text, positioned after any byte-order mark."""
    import io

    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror})") from None
    head = handle.read(4)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            if encoding == "utf-8":
                handle.seek(len(bom))
                return handle
            with handle:
                raw = head + handle.read()
            try:
                return io.BytesIO(raw[len(bom):].decode(encoding).encode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: text is not valid {encoding.upper()} ({err.reason} at offset {err.start}); "
                                f"re-save the file as UTF-8") from None
    handle.seek(0)
    return handle


def _first_significant_byte(handle) -> bytes:
    """The first non-whitespace byte of the stream (b"" for an empty file); the position is kept."""
    position = handle.tell()
    while True:
        chunk = handle.read(65536)
        if not chunk:
            handle.seek(position)
            return b""
        stripped = chunk.lstrip()
        if stripped:
            handle.seek(position)
            return stripped[:1]


def _top_level_object_error(path: Path, document: dict) -> DataError:
    """A JSON file whose top level is an object: say where the list of rows was expected, and name the list
    field that probably holds them."""
    lists = [(key, len(value)) for key, value in document.items() if isinstance(value, list)]
    message = (f"{path}: the top level is a JSON object, where a list of rows was expected (a JSON array "
               f"[{{...}}, {{...}}] or one object per line, JSONL)")
    if len(lists) == 1:
        key, count = lists[0]
        message += (f"; its one list field is '{key}' ({count} items): if those are the rows, save that list as "
                    f"the file (e.g. jq '.{key}' {path.name} > rows.json)")
    elif lists:
        message += "; its list fields are " + ", ".join(f"'{k}' ({n} items)" for k, n in lists) + \
            ": save the one that holds the rows as the file"
    else:
        message += f"; it has no list field (fields: {', '.join(map(str, document)) or 'none'})"
    return DataError(message)


def _json_document(path: Path, raw: bytes) -> Any:
    text = _decode_utf8(raw, str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def _layout(path: Path, handle) -> str:
    """'array', 'object' (a single JSON document whose top level is an object) or 'lines' (JSONL).

    Told from the content, not only the suffix: a JSON array is read whole even when named .jsonl; a file that
    starts with '{' is JSONL when its first line is a complete JSON value (or, when it is not, its second line
    is), else it is one pretty-printed document. A one-line .json file holding one object is a document too.
    """
    first = _first_significant_byte(handle)
    if first == b"[":
        return "array"
    if first != b"{":
        return "lines"
    position = handle.tell()
    lines = [line for line in (handle.readline(), handle.readline(), handle.readline()) if line.strip()]
    handle.seek(position)
    if not lines:
        return "lines"
    if _is_json(lines[0]):
        return "object" if len(lines) == 1 and path.suffix != ".jsonl" else "lines"
    return "lines" if len(lines) > 1 and _is_json(lines[1]) else "object"


def read_json_records(path: Path, problems: Optional[List[Problem]] = None) -> Iterator[Tuple[str, Any]]:
    """(location, record) for a JSON array file or a JSONL file; location is 'file:row N' or 'file:line N'.

    A JSONL line that is not valid JSON or UTF-8 raises, or with `problems` is recorded there and skipped. JSONL
    is read line by line (a file of millions of rows is never in memory at once); a JSON array is parsed whole.
    A UTF-8 (or UTF-16/32) byte-order mark is accepted.
    """
    handle = _open_text_bytes(path)
    with handle:
        layout = _layout(path, handle)
        if layout != "lines" or not _first_significant_byte(handle):
            raw = handle.read()
            if not raw.strip():
                raise DataError(f"{path}: the data file is empty")
            document = _json_document(path, raw)
            if isinstance(document, dict):
                raise _top_level_object_error(path, document)
            if not isinstance(document, list):
                raise DataError(f"{path}: the top level is a JSON {type(document).__name__}, where a list of rows "
                                f"was expected")
            for index, record in enumerate(document):
                yield f"{path}:row {index}", record
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:line {number}"
            try:
                yield where, json.loads(_decode_utf8(line, where))
            except (DataError, json.JSONDecodeError) as err:
                message = str(err) if isinstance(err, DataError) else \
                    f"{where}: invalid JSON ({err.msg} at column {err.colno})"
                if problems is None:
                    raise DataError(message) from None
                problems.append(Problem(where, message))


def _field(record: Any, name: str, where: str, kind=None):
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: field '{name}' is missing (fields: {', '.join(record) or 'none'})"
                        + _rows_inside_hint(record, name, where))
    value = record[name]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{name}' must be {names}, got {type(value).__name__}")
    return value


def _rows_inside_hint(record: dict, name: str, where: str) -> str:
    """A first record that lacks `name` but holds a list of objects that have it is a file whose top level is an
    object wrapping the rows (which a one-line JSONL file cannot tell from a row): say so."""
    if not where.endswith((":line 1", ":row 0")):
        return ""
    lists = [key for key, value in record.items()
             if isinstance(value, list) and value and isinstance(value[0], dict) and name in value[0]]
    if len(lists) != 1:
        return ""
    return (f"; if the file's top level is an object wrapping the rows, they are in its list field '{lists[0]}' "
            f"({len(record[lists[0]])} items): save that list as the file")


def _resolve(ref: Any, base: Path) -> Any:
    """Relative paths resolve against the image folder; URLs, data URIs, base64 and objects pass through."""
    if isinstance(ref, (list, tuple)):  # a video given as frames
        return [_resolve(r, base) for r in ref]
    if not isinstance(ref, str):
        return ref
    if ref.startswith(("http://", "https://", "data:", "file://")) or len(ref) > 1024:
        return ref
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else base / path)


def _as_list(value: Any) -> List[Any]:
    """One reference or a list of them (None: none)."""
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes)) or hasattr(value, "size"):
        return [value]
    return list(value)


def _split_placeholders(text: str) -> List[dict]:
    """'<image>\\nDescribe' -> [image item, text item]; the placeholder positions are kept."""
    items: List[dict] = []
    for piece in re.split(r"(<image>|<video>)", text):
        if piece == "<image>":
            items.append(image_item())
        elif piece == "<video>":
            items.append(video_item())
        elif piece.strip():
            items.append(text_item(piece.strip("\n")))
    return items


# ----------------------------------------------------------------------------------------------------------------
# one converter per layout: record -> canonical row


def from_llava(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    turns = _field(record, "conversations", where, list)
    images = record.get("image", record.get("images"))
    videos = record.get("video", record.get("videos"))
    # `video` is one path, or a list with one entry per <video>; an entry that is itself a list is frames.
    videos = [videos] if isinstance(videos, str) else list(videos or [])
    messages = []
    for index, turn in enumerate(turns):
        turn_where = f"{where}: conversations[{index}]"
        name = _field(turn, "from", turn_where, str)
        role = ROLE_ALIASES.get(name.lower())
        if role is None:
            raise DataError(f"{turn_where}: field 'from': unknown role '{name}' (valid: {', '.join(ROLE_ALIASES)})")
        value = _field(turn, "value", turn_where, str)
        messages.append({"role": role, "content": _split_placeholders(value)})
    row = {"messages": messages, "images": [_resolve(i, base) for i in _as_list(images)],
           "videos": [_resolve(v, base) for v in videos], "source": where}
    return _finish(row, where, cfg)


def _message_items(content: Any, m_where: str, images: List[Any], videos: List[Any]) -> List[dict]:
    if isinstance(content, str):
        return [text_item(content)]
    items = []
    for k, item in enumerate(content):
        i_where = f"{m_where}.content[{k}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("image", "image_url"):
            inline = item.get("image", item.get("image_url"))
            if isinstance(inline, dict):  # OpenAI: {"type": "image_url", "image_url": {"url": ...}}
                inline = inline.get("url")
            if inline is not None:  # given inline instead of in the `images` column
                images.append(inline)
            items.append(image_item())
        elif kind == "video":
            if item.get("video") is not None:
                videos.append(item["video"])
            items.append(video_item())
        elif kind == "text":
            text = item.get("text")
            if text is not None and not isinstance(text, str):
                raise DataError(f"{i_where}: field 'text' must be a string, got {type(text).__name__}")
            items.append(text_item(text or ""))
        else:
            raise DataError(f"{i_where}: content item type must be 'image', 'image_url', 'video' or 'text', "
                            f"got {kind!r}")
    return items


def from_messages(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    raw_messages = _field(record, "messages", where, list)
    images = _as_list(record.get("images", record.get("image")))
    videos = record.get("videos", record.get("video"))
    videos = [videos] if isinstance(videos, str) else list(videos or [])
    messages = []
    for index, message in enumerate(raw_messages):
        m_where = f"{where}: messages[{index}]"
        role = _field(message, "role", m_where, str)
        content = _field(message, "content", m_where, (str, list))
        messages.append({"role": role, "content": _message_items(content, m_where, images, videos)})
    row = {"messages": messages, "images": [_resolve(i, base) for i in images],
           "videos": [_resolve(v, base) for v in videos], "source": where}
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
        "videos": [],
        "source": where,
    }
    return _finish(row, where, cfg)


def _snake(name: str) -> str:
    return re.sub(r"\W+", "_", name.strip()).strip("_").lower()


def format_prompt(template: str, record: dict, where: str) -> str:
    """`template` with {Column Name} or {column_name} replaced by the row's values."""
    values = {}
    for name, value in record.items():
        values[name] = value
        values.setdefault(_snake(name), value)
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name.split(".")[0].split("[")[0] not in values:
            raise DataError(f"{where}: data.prompt uses {{{name}}}, which is not a column of this row "
                            f"(columns: {', '.join(record)})")
    try:
        return template.format(**values)
    except (IndexError, KeyError, ValueError, AttributeError) as err:
        raise DataError(f"{where}: data.prompt cannot be filled in ({type(err).__name__}: {err})") from None


def from_columns(record: Any, where: str, base: Path, cfg: DataConfig, images: Optional[str] = None,
                 answer: Optional[str] = None, template: Optional[str] = None) -> dict:
    """A table row -> [system], user (images + prompt), assistant (answer). Column names from data.columns."""
    columns = cfg.columns
    images = columns.images if images is None else images
    answer_text = _field(record, answer or columns.answer, where, str)
    refs = _as_list(_field(record, images, where)) if images else []
    template = template if template is not None else cfg.prompt
    if template is not None:
        prompt = format_prompt(template, record, where)
    elif columns.prompt:
        prompt = _field(record, columns.prompt, where, str)
    else:
        prompt = ""
    content = [image_item() for _ in refs] + ([text_item(prompt)] if prompt else [])
    row = {
        "messages": [{"role": "user", "content": content},
                     {"role": "assistant", "content": [text_item(answer_text)]}],
        "images": [_resolve(r, base) for r in refs],
        "videos": [],
        "source": where,
    }
    return _finish(row, where, cfg)


def from_amazon(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    """philschmid/amazon-product-descriptions-vlm: the column formatter with that dataset's columns."""
    return from_columns(record, where, base, cfg, images="image", answer="description",
                        template=cfg.prompt or "{product_name}\n{category}")


def detect_format(record: Any, where: str) -> DataFormat:
    if isinstance(record, dict):
        if "messages" in record:
            return DataFormat.messages
        turns = record.get("conversations")
        if isinstance(turns, list):
            first = turns[0] if turns and isinstance(turns[0], dict) else {}
            if isinstance(first.get("value"), str) and _VISION_SPAN.search(first["value"]):
                return DataFormat.self_llm
            return DataFormat.llava
    fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: cannot tell the format of this row (fields: {fields}); data.format=auto knows "
                    f"'messages' and 'conversations' rows, set data.format for others")


def from_auto(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    return CONVERTERS[detect_format(record, where)](record, where, base, cfg)


CONVERTERS: Dict[DataFormat, Converter] = {
    DataFormat.llava: from_llava,
    DataFormat.messages: from_messages,
    DataFormat.self_llm: from_self_llm,
    DataFormat.amazon: from_amazon,
    DataFormat.columns: from_columns,
    DataFormat.auto: from_auto,
}


def add_system_message(messages: List[dict], cfg: DataConfig) -> None:
    """data.system_message as the first turn, unless the conversation already opens with a system turn."""
    if cfg.system_message and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [text_item(cfg.system_message)]})


def _finish(row: dict, where: str, cfg: DataConfig) -> dict:
    add_system_message(row["messages"], cfg)
    check_conversation(row, where)
    return row


def check_conversation(row: dict, where: str) -> None:
    """Roles alternate user/assistant after an optional system turn and end on the assistant, every assistant
    turn has text, no text holds a control token, and the image and video items match the row's images and
    videos in number."""
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
        texts = [i["text"] or "" for i in message["content"] if i["type"] == "text"]
        if message["role"] == "assistant" and not "".join(texts).strip():
            raise DataError(f"{where}: messages[{index}]: the assistant text is empty")
        if message["role"] == "assistant" and any(i["type"] != "text" for i in message["content"]):
            raise DataError(f"{where}: messages[{index}]: an assistant turn holds an image or video; put it in a "
                            f"user turn")
        for token in RESERVED_TOKENS:
            if any(token in text for text in texts):
                raise DataError(f"{where}: messages[{index}]: the text contains the control token {token}, which "
                                f"the tokenizer would read as structure, not text; remove it")
    for kind, key in (("image", "images"), ("video", "videos")):
        placeholders = sum(1 for m in messages for i in m["content"] if i["type"] == kind)
        given = len(row.get(key) or [])
        if placeholders != given:
            raise DataError(f"{where}: {placeholders} {kind} placeholder(s) in the text but {given} {kind}(s) in "
                            f"the row (field '{key}')")


# ----------------------------------------------------------------------------------------------------------------
# loading a split


def _looks_local(path_str: str) -> bool:
    return path_str.startswith(("/", "./", "../", "~")) or path_str.endswith(_LOCAL_SUFFIXES)


def _records(cfg: DataConfig, path_str: str,
             problems: Optional[List[Problem]] = None) -> Tuple[Iterator[Tuple[str, Any]], Path]:
    path = Path(path_str).expanduser()
    base = Path(cfg.image_folder).expanduser() if cfg.image_folder else (path.parent if path.is_file() else path)
    if path.suffix in (".json", ".jsonl"):
        if not path.exists():
            raise DataError(f"{path}: data file not found")
        return read_json_records(path, problems), base
    if not path.exists() and _looks_local(path_str):
        raise DataError(f"{path}: data file or folder not found")
    return _hf_records(cfg, path_str), base


def _hf_dataset(cfg: DataConfig, path_str: str):
    """Hugging Face datasets: a save_to_disk folder, parquet/arrow/csv files, a folder of them, or a hub id (needs
    the network)."""
    import datasets

    path = Path(path_str).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if cfg.split not in dataset:
                    raise DataError(f"{path}: no split '{cfg.split}' (splits: {', '.join(dataset)}); set data.split")
                dataset = dataset[cfg.split]
            return dataset
        if path.is_file():
            if path.suffix not in _LOCAL_SUFFIXES:
                raise DataError(f"{path}: unknown data file type '{path.suffix}' (expected one of "
                                f"{', '.join(_LOCAL_SUFFIXES)}, a save_to_disk folder or a hub id)")
            if path.suffix in (".csv", ".tsv"):  # a byte-order mark (Excel's UTF-8 export) is read past
                return datasets.load_dataset("csv", data_files=str(path), split=cfg.split, encoding="utf-8-sig",
                                             sep="\t" if path.suffix == ".tsv" else ",")
            return datasets.load_dataset(path.suffix[1:], data_files=str(path), split=cfg.split)
        return datasets.load_dataset(str(path) if path.is_dir() else path_str, split=cfg.split)
    except DataError:
        raise
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{path_str}: cannot load dataset ({type(err).__name__}: {message})") from None


def _hf_records(cfg: DataConfig, path_str: str) -> Iterator[Tuple[str, Any]]:
    import datasets

    dataset = _hf_dataset(cfg, path_str)
    # Images stay undecoded ({"bytes", "path"}) until the collator opens them, with its own error messages.
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    for index, record in enumerate(dataset):
        yield f"{path_str}:row {index}", record


def iter_rows(cfg: DataConfig, path: str, problems: Optional[List[Problem]] = None,
              converters: Dict[DataFormat, Converter] = CONVERTERS) -> Iterator[Tuple[dict, Optional[str]]]:
    """(canonical row, its id or None) for every row of one file, read one at a time (data.id_field names the id;
    qwenvl_ft.data.mixing.record_id). Bad rows raise, or with `problems` are recorded there and left out."""
    from qwenvl_ft.data.mixing import record_id

    records, base = _records(cfg, path, problems)
    convert = converters[cfg.format]
    for where, record in records:
        try:
            row = convert(record, where, base, cfg)
        except DataError as err:
            if problems is None:
                raise
            problems.append(Problem(where, str(err)))
            continue
        yield row, record_id(record, cfg.id_field)


def load_rows(cfg: DataConfig, path: str, problems: Optional[List[Problem]] = None,
              converters: Dict[DataFormat, Converter] = CONVERTERS) -> List[dict]:
    """Canonical rows of one file (`converters`: the layouts to read, preference.py passes its own). The first bad
    row raises DataError; with `problems`, every bad row is recorded there and left out instead (a file that cannot
    be read at all still raises)."""
    return [row for row, _ in iter_rows(cfg, path, problems, converters)]


def source_config(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The data config one source (data.sources entry, or data.path) is read with: its own path, format, image
    folder and split, everything else from the data group."""
    return dataclasses.replace(cfg, path=source.path, format=source.format or cfg.format,
                               image_folder=source.image_folder or cfg.image_folder,
                               split=source.split or cfg.split, sources=[], mixture_rows=None)


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
    """A datasets.Dataset of canonical rows (TRL's SFTTrainer detects vision data by the `images` column).

    Arrow needs one type per column: images are strings, or (when any is a PIL image, bytes or a datasets image)
    undecoded datasets images, whose `path` also carries strings; videos are {"path", "frames"} records.
    """
    import datasets

    text = datasets.Value("string")
    features = datasets.Features({
        "messages": datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})}),
        "images": datasets.List(_image_ref_feature(rows)),
        "videos": datasets.List({"path": text, "frames": datasets.List(text)}),
        "source": text,
    })
    table = [{"messages": r["messages"], "images": r["images"], "source": r.get("source", "?"),
              "videos": [_video_record(v) for v in r.get("videos") or []]} for r in rows]
    return datasets.Dataset.from_list(table, features=features)


def _video_record(ref: Any) -> dict:
    if isinstance(ref, dict):
        return {"path": ref.get("path"), "frames": ref.get("frames")}
    if isinstance(ref, (list, tuple)):
        if not all(isinstance(f, str) for f in ref):
            raise DataError("video frames must be paths, URLs or data URIs to be stored in a dataset")
        return {"path": None, "frames": list(ref)}
    return {"path": ref, "frames": None}


def _image_ref_feature(rows: List[dict]):
    import datasets

    if any(not isinstance(image, str) for r in rows for image in r["images"]):
        return datasets.Image(decode=False)
    return datasets.Value("string")


def read_and_split(cfg: DataConfig, problems: Optional[List[Problem]] = None,
                   converters: Dict[DataFormat, Converter] = CONVERTERS, duplicates: Optional[list] = None
                   ) -> Tuple[List[dict], List[dict]]:
    """(train rows, eval rows) of data.path or data.sources (qwenvl_ft.data.mixing: per-source shuffle, max_rows
    and held-out rows, then concatenated or drawn by weight), with data.eval_path read as the eval split.
    Duplicate ids are handled as data.on_duplicate_id says and appended to `duplicates` when given."""
    from qwenvl_ft.data.mixing import SourceSpan, mix, plan_splits

    rows: List[dict] = []
    ids: List[Optional[str]] = []
    spans: List[SourceSpan] = []
    for source in cfg.source_list():
        start = len(rows)
        for row, row_id in iter_rows(source_config(cfg, source), source.path, problems, converters):
            rows.append(row)
            ids.append(row_id)
        spans.append(SourceSpan(source.path, start, len(rows) - start, source.weight, source.max_rows))
    eval_span = None
    if cfg.eval_path:
        start = len(rows)
        for row, row_id in iter_rows(cfg, cfg.eval_path, problems, converters):
            rows.append(row)
            ids.append(row_id)
        eval_span = SourceSpan(cfg.eval_path, start, len(rows) - start)
    wheres = [row.get("source", "?") for row in rows]
    found, excluded = handle_duplicates(cfg, spans + ([eval_span] if eval_span else []), ids, wheres, problems)
    if duplicates is not None:
        duplicates.extend(found)
    elif found:
        log.warning("%d id(s) occur more than once (data.on_duplicate_id=%s):\n%s", len(found),
                    cfg.on_duplicate_id.value, "\n".join(f"  {d.message()}" for d in found[:10]))
    plan = plan_splits(cfg, spans, eval_span.rows if eval_span else (), excluded)
    train = mix(cfg, spans, plan.train_by_source)[0] if cfg.weighted else plan.train
    return [rows[i] for i in train], [rows[i] for i in plan.eval]


def handle_duplicates(cfg: DataConfig, spans: list, ids, wheres, problems: Optional[List[Problem]]):
    """(duplicates found, row numbers to leave out) for rows of one file sharing an id, under
    data.on_duplicate_id: warn keeps them, drop leaves out all but the first, error makes the later ones invalid
    rows (recorded in `problems`, or raised)."""
    from qwenvl_ft.config.schema import DuplicateIds
    from qwenvl_ft.data.mixing import duplicate_message, duplicates_of

    policy = cfg.on_duplicate_id
    found, excluded = [], []
    if policy == DuplicateIds.allow:
        return found, excluded
    for span in spans:
        duplicates, later = duplicates_of(ids[span.start: span.start + span.count],
                                          wheres[span.start: span.start + span.count], span.start)
        found += duplicates
        if policy == DuplicateIds.warn:
            continue
        excluded += later
        if policy == DuplicateIds.error:
            for duplicate in duplicates:
                for where in duplicate.others:
                    message = f"{where}: {duplicate_message(policy, duplicate)}"
                    if problems is None:
                        raise DataError(message)
                    problems.append(Problem(where, message))
    return found, excluded


def load_split_rows(cfg: DataConfig, problems: Optional[List[Problem]] = None) -> Tuple[List[dict], List[dict]]:
    """(train rows, eval rows) as lists of canonical rows: read, seeded shuffle and split, data.max_samples."""
    if cfg.format == DataFormat.shapes:
        from qwenvl_ft.data.shapes import generate

        train, evaluation = generate(cfg.shapes)
        if cfg.max_samples is not None:
            train = train[: cfg.max_samples]
        return train, evaluation
    return read_and_split(cfg, problems)


def load_splits(cfg: DataConfig) -> Tuple[Any, Optional[Any]]:
    """(train dataset, eval dataset or None) of canonical rows; the first bad row raises. Training goes through
    qwenvl_ft.data.check.load_checked_splits instead, which also opens every image and reports every bad row."""
    train, evaluation = load_split_rows(cfg)
    if not train:
        raise DataError(f"{cfg.describe_path()}: no training rows")
    return to_dataset(train), (to_dataset(evaluation) if evaluation else None)
