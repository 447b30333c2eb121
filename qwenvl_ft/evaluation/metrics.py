"""Metrics that compare generated answers with references.

- exact_match: share of answers equal to the reference after lower-casing, trimming punctuation and collapsing
  whitespace (short answers: "a red circle", "yes", a class name).
- bleu: sacrebleu's corpus BLEU (0-100) with effective order, so that answers shorter than four words still score
  (plain BLEU-4 is 0 for every three-word answer).
- rouge_l: mean ROUGE-L F1 (0-1) of rouge-score with stemming, for captions and descriptions.
- Grounding, over the rows whose reference holds a box (boxes parsed in either text form, qwenvl_ft/grounding; the
  prediction and the reference are in the same frame, the one the model writes, so no image size is needed):
  - mean_iou: the mean matched IoU (each reference box matched to at most one predicted box, divided by the larger
    count: a missed box and an extra box both cost);
  - iou_50: the share of those rows whose matched IoU reaches 0.5 (IoU@0.5 accuracy);
  - point_in_box: the share whose first predicted point lies in a reference box (for pointing answers).
  A grounding metric is left out of the report when no reference holds a box (and point_in_box when no
  prediction holds a point), rather than reported as 0.

A model whose chat template thinks first (`<think>` reasoning `</think>`, then the answer: the generation prompt
opens the block, so a completion holds its end) is scored on its answer, the text after the last `</think>`; the
predictions written next to the metrics keep the whole completion.
"""

from __future__ import annotations

import re
import string
from typing import Dict, List, Optional, Sequence


def normalise(text: str) -> str:
    text = text.lower().strip().strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    from sacrebleu.metrics import BLEU

    if not references:
        return 0.0
    return float(BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    if not references:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def _box_rows(predictions: Sequence[str], references: Sequence[str]):
    from qwenvl_ft.grounding.geometry import boxes_of
    from qwenvl_ft.grounding.text import parse

    for prediction, reference in zip(predictions, references):
        expected = boxes_of([mark.values for mark in parse(reference)])
        if expected:
            yield parse(prediction), expected


def _ious(predictions: Sequence[str], references: Sequence[str]) -> List[float]:
    from qwenvl_ft.grounding.geometry import boxes_of, matched_iou

    return [matched_iou(boxes_of([m.values for m in marks]), expected)
            for marks, expected in _box_rows(predictions, references)]


def mean_iou(predictions: Sequence[str], references: Sequence[str]) -> Optional[float]:
    ious = _ious(predictions, references)
    return sum(ious) / len(ious) if ious else None


def iou_50(predictions: Sequence[str], references: Sequence[str]) -> Optional[float]:
    ious = _ious(predictions, references)
    return sum(value >= 0.5 for value in ious) / len(ious) if ious else None


def point_in_box(predictions: Sequence[str], references: Sequence[str]) -> Optional[float]:
    from qwenvl_ft.grounding.geometry import point_in_box as inside

    rows = [([m.values for m in marks if not m.is_box], expected)
            for marks, expected in _box_rows(predictions, references)]
    if not any(points for points, _ in rows):
        return None
    hits = sum(bool(points) and any(inside(points[0], box) for box in expected) for points, expected in rows)
    return hits / len(rows)


METRICS = {"exact_match": exact_match, "bleu": bleu, "rouge_l": rouge_l, "mean_iou": mean_iou, "iou_50": iou_50,
           "point_in_box": point_in_box}


def final_answer(completion: str) -> str:
    """The answer of a completion: what follows its reasoning, if it reasoned."""
    return completion.rpartition("</think>")[2].strip() if "</think>" in completion else completion


def compute(predictions: Sequence[str], references: Sequence[str], names: List[str] = None) -> Dict[str, float]:
    """The named metrics (default: all), leaving out those that do not apply to these rows (None)."""
    answers = [final_answer(p) for p in predictions]
    values = {name: METRICS[name](answers, references) for name in (names or list(METRICS))}
    return {name: value for name, value in values.items() if value is not None}
