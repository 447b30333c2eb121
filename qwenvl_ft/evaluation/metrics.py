"""Metrics that compare generated answers with references.

- exact_match: share of answers equal to the reference after lower-casing, trimming punctuation and collapsing
  whitespace (short answers: "a red circle", "yes", a class name).
- bleu: sacrebleu's corpus BLEU (0-100) with effective order, so that answers shorter than four words still score
  (plain BLEU-4 is 0 for every three-word answer).
- rouge_l: mean ROUGE-L F1 (0-1) of rouge-score with stemming, for captions and descriptions.

A model whose chat template thinks first (`<think>` reasoning `</think>`, then the answer: the generation prompt
opens the block, so a completion holds its end) is scored on its answer, the text after the last `</think>`; the
predictions written next to the metrics keep the whole completion.
"""

from __future__ import annotations

import re
import string
from typing import Dict, List, Sequence


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


METRICS = {"exact_match": exact_match, "bleu": bleu, "rouge_l": rouge_l}


def final_answer(completion: str) -> str:
    """The answer of a completion: what follows its reasoning, if it reasoned."""
    return completion.rpartition("</think>")[2].strip() if "</think>" in completion else completion


def compute(predictions: Sequence[str], references: Sequence[str], names: List[str] = None) -> Dict[str, float]:
    answers = [final_answer(p) for p in predictions]
    return {name: METRICS[name](answers, references) for name in (names or list(METRICS))}
