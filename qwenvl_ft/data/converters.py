"""One converter per conversation layout (data.format): a file's record -> the canonical row (data/rows.py), with
the row's file, row and field in every error. The parts the preference and prompt layouts share with them
(data/preference.py, data/prompts.py) are at the end.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from qwenvl_ft.config.data import DataConfig, DataFormat
from qwenvl_ft.data.rows import finish_row, image_item, text_item, video_item
from qwenvl_ft.data.turns import with_reasoning
from qwenvl_ft.errors import DataError


ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_VISION_SPAN = re.compile(r"<\|vision_start\|>(.*?)<\|vision_end\|>", re.DOTALL)


Converter = Callable[[Any, str, Path, DataConfig], dict]  # (record, where, image folder, data config) -> row


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


def llava_turns(turns: List[Any], where: str) -> List[dict]:
    """LLaVA's `conversations` ([{"from": "human" | "gpt" | ..., "value": "<image>\\n..."}, ...]) -> canonical
    messages, the placeholders kept in place."""
    messages = []
    for index, turn in enumerate(turns):
        turn_where = f"{where}: conversations[{index}]"
        name = _field(turn, "from", turn_where, str)
        role = ROLE_ALIASES.get(name.lower())
        if role is None:
            raise DataError(f"{turn_where}: field 'from': unknown role '{name}' (valid: {', '.join(ROLE_ALIASES)})")
        value = _field(turn, "value", turn_where, str)
        messages.append({"role": role, "content": _split_placeholders(value)})
    return messages


def from_llava(record: Any, where: str, base: Path, cfg: DataConfig) -> dict:
    turns = _field(record, "conversations", where, list)
    images = record.get("image", record.get("images"))
    videos = record.get("video", record.get("videos"))
    # `video` is one path, or a list with one entry per <video>; an entry that is itself a list is frames.
    videos = [videos] if isinstance(videos, str) else list(videos or [])
    messages = llava_turns(turns, where)
    row = {"messages": messages, "images": [_resolve(i, base) for i in _as_list(images)],
           "videos": [_resolve(v, base) for v in videos], "source": where}
    return finish_row(row, where, cfg)


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


# an assistant message's reasoning, as OpenAI-style and reasoning datasets name it
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


def _with_reasoning_field(items: List[dict], message: dict, role: str, where: str) -> List[dict]:
    """An assistant message's reasoning field folded in front of its first text (`<think>...</think>`), the form
    the thinking chat templates parse; data.thinking then keeps or strips it like inline reasoning."""
    fields = [name for name in REASONING_FIELDS if message.get(name) is not None]
    if not fields:
        return items
    reasoning = message[fields[0]]
    if role != "assistant" or not isinstance(reasoning, str):
        raise DataError(f"{where}: field '{fields[0]}' must be a string on an assistant message")
    texts = [index for index, item in enumerate(items) if item["type"] == "text"]
    if not texts:
        return items + [text_item(with_reasoning("", reasoning))]
    first = texts[0]
    return items[:first] + [dict(items[first], text=with_reasoning(items[first]["text"], reasoning))] \
        + items[first + 1:]


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
        items = _message_items(content, m_where, images, videos)
        messages.append({"role": role, "content": _with_reasoning_field(items, message, role, m_where)})
    row = {"messages": messages, "images": [_resolve(i, base) for i in images],
           "videos": [_resolve(v, base) for v in videos], "source": where}
    return finish_row(row, where, cfg)


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
    return finish_row(row, where, cfg)


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
    return finish_row(row, where, cfg)


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


# ----------------------------------------------------------------------------------------------------------------
# shared with the preference and prompt layouts (data/preference.py, data/prompts.py)


def images_first(messages: List[dict], count: int) -> None:
    """Rows whose text has no image placeholder get their images at the start of the first user turn (what LLaVA
    and TRL's `prepare_multimodal_messages` do)."""
    if count == 0 or any(i["type"] == "image" for m in messages for i in m["content"]):
        return
    for message in messages:
        if message["role"] == "user":
            message["content"][:0] = [image_item() for _ in range(count)]
            return


def message_list(raw: Any, where: str, name: str, images: List[Any], no_videos: str) -> List[dict]:
    """A message list (or one message) in the HF / TRL layout -> canonical messages; inline images are appended
    to `images` in order (`from_messages`' content rules). A video fails with `no_videos`, which says why."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise DataError(f"{where}: field '{name}' must be a list of messages, got {type(raw).__name__}")
    out = []
    for index, message in enumerate(raw):
        m_where = f"{where}: {name}[{index}]"
        role = _field(message, "role", m_where, str)
        content = _field(message, "content", m_where, (str, list))
        videos: List[Any] = []
        items = _message_items(content, m_where, images, videos)
        if videos or any(item["type"] == "video" for item in items):
            raise DataError(f"{m_where}: {no_videos}")
        out.append({"role": role, "content": items})
    return out
