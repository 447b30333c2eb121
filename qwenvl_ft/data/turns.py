"""A conversation row's turns: which tokens are an assistant's turn (the training targets), the prompt part of a
row (every turn but the last answer), its reference answer (the last answer's text), the reasoning of its
assistant turns (`<think>...</think>` before the answer, the form chat templates that think parse), and the row's
text as the chat template renders it under data.thinking and data.enable_thinking.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from qwenvl_ft.config.data import DataConfig, Thinking
from qwenvl_ft.errors import ConfigError


HEADER_TOKENS = 8  # a turn's role and newline lie within this many tokens after <|im_start|>
HEADERS_REMEMBERED = 4096


def assistant_label_mask(input_ids: Sequence[int], tokenizer, decoded: Optional[Dict[Tuple[int, ...], str]] = None
                         ) -> torch.Tensor:
    """True on the tokens of every assistant turn's content and its closing <|im_end|>; False elsewhere.

    Turns are found by token: each `<|im_start|>` is followed by the role and a newline, then the content up to
    `<|im_end|>`. The role is read by decoding the few tokens after `<|im_start|>`, so this works whatever the
    vocabulary merges "assistant\\n" into. `decoded` (a dict the caller keeps) remembers the text of each run of
    header tokens: a dataset has a handful of distinct turn headers, and decoding them again for every row was a
    fifth of a collated caption row's time.
    """
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = list(input_ids)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    decoded = {} if decoded is None else decoded
    for start in (i for i, t in enumerate(ids) if t == im_start):
        header_end, text = None, ""
        for k in range(1, HEADER_TOKENS + 1):
            if start + k >= len(ids):
                break
            header = tuple(ids[start + 1: start + 1 + k])
            text = decoded.get(header)
            if text is None:
                text = tokenizer.decode(list(header))
                if len(decoded) < HEADERS_REMEMBERED:  # rows without proper headers must not grow it for ever
                    decoded[header] = text
            if "\n" in text:
                header_end = start + 1 + k
                break
        if header_end is None or text.split("\n", 1)[0].strip() != "assistant":
            continue
        try:
            end = ids.index(im_end, header_end)
        except ValueError:  # truncated inside this turn: everything left is content
            end = len(ids) - 1
        mask[header_end: end + 1] = True
    return mask


def prompt_messages(row: dict) -> List[dict]:
    return row["messages"][:-1]


def reference_answer(row: dict) -> str:
    return "".join(i["text"] or "" for i in row["messages"][-1]["content"] if i["type"] == "text")


# An assistant turn's reasoning: an optional opening tag, the reasoning, the closing tag, and the blank lines after it.
_REASONING = re.compile(r"^\s*(?:<think>)?.*?</think>\s*", re.DOTALL)


def with_reasoning(text: str, reasoning: Optional[str]) -> str:
    """An answer with its reasoning in front, as Qwen's thinking templates write an assistant turn."""
    return text if not reasoning else f"<think>\n{reasoning.strip()}\n</think>\n\n{text}"


def without_reasoning(messages: List[dict]) -> List[dict]:
    """The messages with every assistant turn's reasoning removed (data.thinking=strip)."""
    out = []
    for message in messages:
        if message["role"] == "assistant":
            content = [dict(item, text=_REASONING.sub("", item["text"], count=1))
                       if item["type"] == "text" and item.get("text") and "</think>" in item["text"] else item
                       for item in message["content"]]
            message = dict(message, content=content)
        out.append(message)
    return out


# A rendered think block (Qwen's thinking templates): what data.thinking=keep may add to the template's text.
_THINK_BLOCK = re.compile(r"<think>\n.*?\n</think>\n\n", re.DOTALL)


def every_reasoning_kept(template: Callable[[List[dict], bool], str], messages: List[dict],
                         add_generation_prompt: bool = False) -> str:
    """The conversation as `template(messages, add_generation_prompt)` renders it, except that every assistant
    turn is rendered the way the template renders the turns after the last user query (data.thinking=keep).

    Why: a thinking template may render reasoning only in the turns after the last user query (Qwen's newest do), so a
    multi-turn row would train the last turn's reasoning only. How, from the template alone: the turns answering
    user query k are cut from the template's text of the conversation up to the next query (where they are the
    last turns), after its text up to query k itself; each next query is the template's text of that message alone.
    The result differs from the template's own text by think blocks only (checked: a template that renders
    anything else differently is a ConfigError)."""
    queries = [i for i, message in enumerate(messages) if message["role"] == "user"]
    whole = template(messages, add_generation_prompt)
    if len(queries) < 2:
        return whole
    ends = queries[1:] + [len(messages)]
    text = template(messages[:queries[0] + 1], False)
    for query, end in zip(queries, ends):
        asked = template(messages[:query + 1], False)
        answered = template(messages[:end], add_generation_prompt and end == len(messages))
        if not answered.startswith(asked):
            raise ConfigError("data.thinking=keep: the chat template renders a conversation differently when it "
                             "continues, so its turns cannot be cut apart; use data.thinking=template or strip")
        text += answered[len(asked):]
        if end < len(messages):
            text += template([messages[end]], False)
    if _THINK_BLOCK.sub("", text) != _THINK_BLOCK.sub("", whole):
        raise ConfigError("data.thinking=keep: this chat template renders more than the reasoning differently in "
                         "earlier turns; use data.thinking=template or strip")
    return text


def render_chat(processor, messages: List[dict], cfg: DataConfig, add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages` under the data settings `cfg`: reasoning stripped or kept
    (data.thinking), data.enable_thinking passed to a generation prompt."""
    if cfg.thinking == Thinking.strip:
        messages = without_reasoning(messages)
    switch = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}

    def template(part: List[dict], prompt: bool) -> str:
        return processor.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt,
                                             **(switch if prompt else {}))
    if cfg.thinking == Thinking.keep:
        return every_reasoning_kept(template, messages, add_generation_prompt)
    return template(messages, add_generation_prompt)
