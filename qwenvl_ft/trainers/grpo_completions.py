"""GRPO's completions and what the rewards say of them (qwenvl_ft/trainers/grpo.py trains): a few of the sampled
completions of each logging step in TensorBoard, and the held-out prompts answered greedily and scored by the
configured rewards, before and after training and in `qwenvl-ft eval`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger("qwenvl_ft")


def format_number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# sampled completions in TensorBoard


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in prompt or []:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        for item in content or []:
            parts.append("[image]" if item.get("type") == "image" else (item.get("text") or ""))
    return " ".join(p.strip() for p in parts if p.strip())


def completion_table(rewards, count: int) -> Optional[str]:
    """A markdown table of the first `count` completions of the latest generation batch with every reward, from
    what each Reward kept of its last call; None before the first call."""
    from qwenvl_ft.rewards.builtins import completion_text

    if not rewards or rewards[0].last is None:
        return None
    prompts, completions, _ = rewards[0].last
    header = "| prompt | completion | " + " | ".join(r.name for r in rewards) + " |"
    lines = [header, "|" + "---|" * (2 + len(rewards))]
    for index in range(min(count, len(completions))):
        cells = [_prompt_text(prompts[index]) if prompts else "", completion_text(completions[index])]
        for reward in rewards:
            value = reward.last[2][index] if reward.last is not None and index < len(reward.last[2]) else None
            cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def completion_samples(rewards, count: int, log_dir: Path):
    """A callback writing `completion_table` to TensorBoard (tag `completions`) at every training log."""
    from transformers import TrainerCallback

    class CompletionSamples(TrainerCallback):
        def __init__(self):
            self.writer = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            table = completion_table(rewards, count)
            if table is None:
                return
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(log_dir))
            self.writer.add_text("completions", table, state.global_step)
            self.writer.flush()

        def on_train_end(self, args, state, control, **kwargs):
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    return CompletionSamples()


# ----------------------------------------------------------------------------------------------------------------
# held-out evaluation: greedy completions scored by the rewards


def generate_completions(model, processor, data_cfg, rows: Sequence[dict], batch_size: int,
                         generation: Optional[dict] = None, max_new_tokens: int = 64) -> List[str]:
    """One completion per prompt row, with the images and prompt rendering training uses (the SFT collator's
    generation batch)."""
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.prompts import as_chat_row
    from qwenvl_ft.evaluation.generate import generate_answers

    collator = VisionChatCollator(processor, data_cfg)
    return generate_answers(model, collator, [as_chat_row(row) for row in rows], batch_size,
                            max_new_tokens=max_new_tokens, generation=generation)


def score_completions(rewards, rows: Sequence[dict], completions: Sequence[str]) -> Dict[str, Any]:
    """Per-row scores and their summary (each reward's mean where it applies, the weighted total), with the
    completions in the chat form TRL gives rewards."""
    from qwenvl_ft.rewards import score, summarise

    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"} if rows else {}
    chat = [[{"role": "assistant", "content": text}] for text in completions]
    scores = score(rewards, [row["prompt"] for row in rows], chat, columns)
    return {"summary": summarise(rewards, scores), "scores": scores}


def held_out_rewards(model, processor, data_cfg, rows: Sequence[dict], rewards, batch_size: int,
                     max_new_tokens: int, generation: Optional[dict] = None) -> Dict[str, Any]:
    completions = generate_completions(model, processor, data_cfg, rows, batch_size, generation, max_new_tokens)
    result = score_completions(rewards, rows, completions)
    result["completions"] = completions
    return result


def reward_metrics(summary: Dict[str, Optional[float]]) -> Dict[str, float]:
    """`summarise`'s means as metric names: `reward` (the weighted total) and `reward/<name>` per reward; a reward
    that applied to no row is left out."""
    return {name if name == "reward" else f"reward/{name}": value for name, value in summary.items()
            if value is not None}


def format_rewards(summary: Dict[str, Optional[float]]) -> str:
    return ", ".join(f"{name} {format_number(value)}" for name, value in summary.items())


def log_held_out(result: Dict[str, Any], rows: Sequence[dict], count: int, when: str) -> None:
    lines = [f"held-out completions {when} training (mean reward {format_number(result['summary']['reward'])} on "
             f"{len(rows)} prompts; {format_rewards(result['summary'])}):"]
    for index in range(min(count, len(rows))):
        lines.append(f"  completion: {result['completions'][index]!r:40s} solution: {rows[index].get('solution')!r}")
    log.info("\n".join(lines))
