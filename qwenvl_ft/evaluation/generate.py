"""Batched generation on canonical rows, and the before/after check's metrics."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from qwenvl_ft.data.collate import VisionChatCollator
from qwenvl_ft.evaluation.metrics import compute
from qwenvl_ft.training.speed import small_model_threads

# `generation_batch` leaves a row's last turn (the reference answer) out of the prompt; rows that hold only the
# prompt get this empty answer appended, so that images and videos go through the collator's one code path.
_ANSWER_SLOT = {"role": "assistant", "content": [{"type": "text", "text": ""}]}


@torch.no_grad()
def generate_answers(model, collator: VisionChatCollator, rows: List[dict], batch_size: int,
                     max_new_tokens: int = 64, generation: Optional[dict] = None,
                     prompts_only: bool = False, progress: str = "generating") -> List[str]:
    """One answer per row. Rows end with the reference answer, which is left out of the prompt, unless
    `prompts_only`. `generation` holds `generate` keyword arguments (GenerationSettings.kwargs()); without it,
    greedy decoding of at most `max_new_tokens`. `progress` labels the progress bar (rows done, on stderr like the
    Trainer's); an empty string hides it."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    tokenizer = collator.tokenizer
    settings = generation if generation is not None else dict(max_new_tokens=max_new_tokens, do_sample=False)
    answers: List[str] = []
    bar = tqdm(total=len(rows), desc=progress, unit=" rows", disable=None if progress else True, leave=False)
    with small_model_threads(model, device):  # one thread for a small model on a CPU
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            if prompts_only:
                chunk = [dict(row, messages=list(row["messages"]) + [_ANSWER_SLOT]) for row in chunk]
            batch = collator.generation_batch(chunk).to(device)
            output = model.generate(**batch, **settings, use_cache=True,
                                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                    pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return answers

