"""Greedy generation on held-out rows and the metrics that compare it with the references."""

from __future__ import annotations

import re
import string
from typing import Dict, List

import torch

from qwenvl_ft.data.collate import VisionChatCollator, reference_answer


@torch.no_grad()
def generate_answers(model, collator: VisionChatCollator, rows: List[dict], batch_size: int,
                     max_new_tokens: int) -> List[str]:
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    tokenizer = collator.tokenizer
    answers: List[str] = []
    for start in range(0, len(rows), batch_size):
        batch = collator.generation_batch(rows[start: start + batch_size]).to(device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return answers


def normalise(text: str) -> str:
    text = text.lower().strip().strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def exact_match(predictions: List[str], references: List[str]) -> float:
    hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def evaluate_rows(model, collator: VisionChatCollator, rows: List[dict], batch_size: int,
                  max_new_tokens: int) -> Dict:
    references = [reference_answer(row) for row in rows]
    predictions = generate_answers(model, collator, rows, batch_size, max_new_tokens)
    return {"exact_match": exact_match(predictions, references), "predictions": predictions,
            "references": references}
