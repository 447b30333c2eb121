"""The grounding rewards: boxes in a completion against the reference's (qwenvl_ft/grounding parses both text forms
and computes the IoU). Same conventions as builtins.py: the answer is taken out by `extract`, the reference is the
`field` column, a row without a reference box gets None."""

from __future__ import annotations

import json
import math
import re
from typing import Any, List, Optional

from qwenvl_ft.grounding.geometry import boxes_of, iou, matched_iou, well_formed
from qwenvl_ft.grounding.text import parse
from qwenvl_ft.rewards.builtins import Scores, column, extracted_answers, reference_value, reject_constant

_COORD = r"\s*(-?\d+(?:\.\d+)?)\s*"
# Qwen2-VL's grounding format <|box_start|>(x1,y1),(x2,y2)<|box_end|>, coordinates in [0, 1000). The tags are
# special tokens, which TRL strips when it decodes completions (skip_special_tokens=True): the bare
# "(x1,y1),(x2,y2)" is accepted too.
_BOX = re.compile(rf"(?:<\|box_start\|>)?\s*\({_COORD},{_COORD}\)\s*,\s*\({_COORD},{_COORD}\)\s*(?:<\|box_end\|>)?")


def parse_box(value: Any) -> Optional[tuple]:
    """(x1, y1, x2, y2) from Qwen2-VL's box text, or from four numbers (a list, or its JSON text); None when there
    is no box or it is malformed (non-finite, or with no area: x2 <= x1 or y2 <= y1)."""
    if isinstance(value, str):
        match = _BOX.search(value)
        if match is not None:
            box = tuple(float(g) for g in match.groups())
        else:
            try:
                box = json.loads(value.strip(), parse_constant=reject_constant)
            except ValueError:
                return None
            return parse_box(box) if isinstance(box, list) else None
    elif isinstance(value, (list, tuple)) and len(value) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        box = tuple(float(v) for v in value)
    else:
        return None
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box) or x2 <= x1 or y2 <= y1:
        return None
    return box


def box_iou(completions, field: str = "solution", extract: str = "all", threshold: Optional[float] = None,
            **kwargs) -> Scores:
    """Intersection over union of the first box in the answer with the reference box, in [0, 1]; with `threshold`,
    1.0 when the IoU reaches it, else 0.0. A completion without a well-formed box scores 0; a row whose reference
    is not a box gets None."""
    references = column(kwargs, field, len(completions))
    scores: Scores = []
    for answer, reference in zip(extracted_answers(completions, extract), references):
        expected = parse_box(reference_value(reference)) if reference_value(reference) is not None else None
        if expected is None:
            scores.append(None)
            continue
        got = parse_box(answer) if answer is not None else None
        overlap = iou(got, expected) if got is not None else 0.0
        scores.append(overlap if threshold is None else float(overlap >= threshold))
    return scores


def reference_boxes(value: Any) -> List[tuple]:
    """The reference's well-formed boxes: answer text in any family's form (grounding/text.py), four numbers, or a
    list of boxes (an object list's `bbox` values)."""
    if isinstance(value, str):
        return boxes_of([mark.values for mark in parse(value)]) or ([parse_box(value)] if parse_box(value) else [])
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return [box for box in (parse_box(list(v)) for v in value) if box is not None]
    box = parse_box(value)
    return [box] if box is not None else []


def iou_reward(completions, field: str = "solution", extract: str = "all", threshold: Optional[float] = None,
               **kwargs) -> Scores:
    """The matched IoU of every box in the answer against every reference box (grounding/geometry.py: each reference
    matched to at most one answer box, divided by the larger count, so extra boxes cost), in [0, 1]; 0 when no box
    parses; with `threshold`, 1.0 when it reaches it. Boxes in either text form (box tokens or bbox_2d JSON), in
    the frame the model writes them, the reference's too. A row without a reference box gets None."""
    references = column(kwargs, field, len(completions))
    scores: Scores = []
    for answer, reference in zip(extracted_answers(completions, extract), references):
        value = reference_value(reference)
        expected = reference_boxes(value) if value is not None else []
        if not expected:
            scores.append(None)
            continue
        got = boxes_of([mark.values for mark in parse(answer)]) if answer is not None else []
        overlap = matched_iou(got, expected)
        scores.append(overlap if threshold is None else float(overlap >= threshold))
    return scores


BOX_FORMS = ("any", "json", "box_tokens")


def box_format(completions, form: str = "any", extract: str = "all", **kwargs) -> Scores:
    """1.0 when the answer holds at least one box or point and every box in it is well-formed (finite, x2 > x1,
    y2 > y1), written in `form` (json: bbox_2d/point_2d objects; box_tokens: (x1,y1),(x2,y2) pairs; any: either);
    else 0.0."""
    scores: Scores = []
    for answer in extracted_answers(completions, extract):
        marks = parse(answer) if answer is not None else []
        in_json = bool(marks) and ('"bbox_2d"' in answer or '"point_2d"' in answer)
        right_form = form == "any" or (form == "json") == in_json
        boxes_fine = all(well_formed(mark.values) for mark in marks if mark.is_box)
        scores.append(float(bool(marks) and right_form and boxes_fine))
    return scores


def check_box_form(value: Any) -> Optional[str]:
    return None if value in BOX_FORMS else f"must be one of {list(BOX_FORMS)}"
