"""A conversation row's turns: which tokens are an assistant's turn (the training targets), the prompt part of a
row (every turn but the last answer), its reference answer (the last answer's text), and the reasoning of its
assistant turns (`<think>...</think>` before the answer, the form chat templates that think parse).
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence

import torch


def assistant_label_mask(input_ids: Sequence[int], tokenizer) -> torch.Tensor:
    """True on the tokens of every assistant turn's content and its closing <|im_end|>; False elsewhere.

    Turns are found by token: each `<|im_start|>` is followed by the role and a newline, then the content up to
    `<|im_end|>`. The role is read by decoding the few tokens after `<|im_start|>`, so this works whatever the
    vocabulary merges "assistant\\n" into.
    """
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = list(input_ids)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for start in (i for i, t in enumerate(ids) if t == im_start):
        header_end = None
        for k in range(1, 9):
            if start + k >= len(ids):
                break
            if "\n" in tokenizer.decode(ids[start + 1: start + 1 + k]):
                header_end = start + 1 + k
                break
        if header_end is None:
            continue
        role = tokenizer.decode(ids[start + 1: header_end]).split("\n", 1)[0].strip()
        if role != "assistant":
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
