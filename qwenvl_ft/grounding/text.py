"""Objects (a label with a box or a point) written in a family's text form, and parsed back from any answer.

Written forms (convention.py says whose):
- box_tokens: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, one object per
  line (a point: `<|box_start|>(x,y)<|box_end|>`).
- json: a fenced JSON list, one object per line, `{"bbox_2d": [x1, y1, x2, y2], "label": "..."}` or
  `{"point_2d": [x, y], "label": "..."}`, as the JSON-writing families answer grounding prompts.

Parsing accepts both forms in any answer (a model trained on one may answer in the other), with or without the
special tokens (TRL decodes completions with skip_special_tokens=True, which drops them), and objects inside a
truncated JSON list (a completion cut at max_completion_length keeps its finished objects).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from qwenvl_ft.grounding.convention import BoxConvention


@dataclass(frozen=True)
class Mark:
    label: Optional[str]
    values: Tuple[float, ...]  # 4: a box (x1, y1, x2, y2); 2: a point (x, y)

    @property
    def is_box(self) -> bool:
        return len(self.values) == 4


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def write(marks: Sequence[Mark], convention: BoxConvention) -> str:
    """The answer text for these objects, their values already in the family's coordinates (coords.to_family)."""
    if convention.text == "box_tokens":
        lines = []
        for mark in marks:
            pairs = ",".join(f"({_number(mark.values[i])},{_number(mark.values[i + 1])})"
                             for i in range(0, len(mark.values), 2))
            ref = f"<|object_ref_start|>{mark.label}<|object_ref_end|>" if mark.label else ""
            lines.append(f"{ref}<|box_start|>{pairs}<|box_end|>")
        return "\n".join(lines)
    objects = []
    for mark in marks:
        key = "bbox_2d" if mark.is_box else "point_2d"
        entry = {key: [int(v) if float(v).is_integer() else v for v in mark.values]}
        if mark.label:
            entry["label"] = mark.label
        objects.append("\t" + json.dumps(entry, ensure_ascii=False))
    return "```json\n[\n" + ",\n".join(objects) + "\n]\n```"


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"
# Qwen2-VL: an optional label between the ref tokens, then one or two (x,y) pairs between the optional box tokens.
_TOKENS = re.compile(rf"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?(?:<\|box_start\|>)?\s*"
                     rf"{_PAIR}(?:\s*,\s*{_PAIR})?\s*(?:<\|box_end\|>)?", re.DOTALL)
_OBJECT = re.compile(r"\{[^{}]*\}")  # one flat JSON object
_KEYED = re.compile(r'"(bbox_2d|point_2d)"\s*:\s*\[([^\[\]]*)\]')
_LABEL = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _json_marks(text: str) -> List[Tuple[int, Mark]]:
    found = []
    for match in _OBJECT.finditer(text):
        chunk = match.group(0)
        keyed = _KEYED.search(chunk)
        if keyed is None:
            continue
        try:
            values = tuple(float(v) for v in keyed.group(2).split(","))
        except ValueError:
            continue
        if len(values) != (4 if keyed.group(1) == "bbox_2d" else 2):
            continue
        label = _LABEL.search(chunk)
        found.append((match.start(), Mark(json.loads(f'"{label.group(1)}"') if label else None, values)))
    return found


def _token_marks(text: str) -> List[Tuple[int, Mark]]:
    found = []
    for match in _TOKENS.finditer(text):
        numbers = [g for g in match.groups()[1:] if g is not None]
        label = match.group("label")
        found.append((match.start(), Mark(label.strip() if label else None, tuple(float(n) for n in numbers))))
    return found


def parse(text: str) -> List[Mark]:
    """Every object in the answer, in order, in whichever form it is written; [] when there is none."""
    marks = _json_marks(text)
    if not marks:  # JSON objects hold no (x,y) pairs, so the two forms never both match one object
        marks = _token_marks(text)
    return [mark for _, mark in sorted(marks, key=lambda pair: pair[0])]
