"""The canonical row every conversation layout is read into (data/converters.py), and the rules it follows:

    {"messages": [{"role": ..., "content": [{"type": "image"|"video"|"text", "text": ...}, ...]}, ...],
     "images":   [path, URL, base64 string, data URI, PIL image or {"bytes", "path"} -- one per image item, in order],
     "videos":   [path / URL, or a list of frame references -- one per video item, in order],
     "source":   "file:row N" (JSON arrays, datasets) or "file:line N" (JSONL)}

which is what TRL calls the conversational vision format plus the row's origin for error messages. Images and
videos are not opened by the readers (that happens in the collator, in DataLoader workers, and in data-check); a
row whose structure is wrong fails with its file, row and field, or, when a `problems` list is passed, is recorded
there as a `Problem` and left out so that every bad row can be reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.errors import DataError


# Control tokens of Qwen's tokenizer: in user text they would be read as structure (a literal <|image_pad|> is an
# image with no pixels, a literal <|im_end|> ends the turn) instead of as text.
RESERVED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


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


def add_system_message(messages: List[dict], cfg: DataConfig) -> None:
    """data.system_message as the first turn, unless the conversation already opens with a system turn."""
    if cfg.system_message and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [text_item(cfg.system_message)]})


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


def finish_row(row: dict, where: str, cfg: DataConfig, turns: str = "messages",
               check: Callable[[dict, str], None] = check_conversation) -> dict:
    """The converted row with data.system_message added to its `turns` (the conversation, or the prompt of a pair
    or a GRPO row), once `check` found it valid."""
    add_system_message(row[turns], cfg)
    check(row, where)
    return row
