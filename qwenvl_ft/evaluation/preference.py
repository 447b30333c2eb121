"""Held-out preference figures of a tuned model against a reference, as DPO defines them: the implicit reward of an
answer is beta x (log p_tuned(answer) - log p_reference(answer)), summed over the answer's tokens; accuracy is how
often the chosen answer's reward beats the rejected one's, margin the mean difference. `qwenvl-ft eval` uses it
with the base model as the reference (for an adapter: the same model with the adapter disabled, no second copy)."""

from __future__ import annotations

from typing import Dict, List

import torch


@torch.no_grad()
def completion_log_probs(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence, the summed log-probability of its completion tokens (`completion_mask`)."""
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in batch.items() if key != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = inputs["input_ids"][:, 1:]
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:].to(device)).sum(dim=1).cpu()


def reward_metrics(tuned, reference, collator, rows: List[dict], beta: float, batch_size: int) -> Dict[str, float]:
    """Reward accuracy and margin of `tuned` over the held-out pairs `rows`. `reference` is a model, or None for a
    PEFT model whose adapter, disabled, is the reference."""
    was_training = tuned.training
    tuned.eval()
    chosen_rewards, rejected_rewards = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = collator(chunk)
        policy = completion_log_probs(tuned, batch)
        if reference is None:
            with tuned.disable_adapter():
                base = completion_log_probs(tuned, batch)
        else:
            base = completion_log_probs(reference, batch)
        rewards = beta * (policy - base)
        pairs = rewards.shape[0] // 2  # chosen sequences first, then the rejected ones (the collator's layout)
        chosen_rewards.append(rewards[:pairs])
        rejected_rewards.append(rewards[pairs:])
    tuned.train(was_training)
    chosen, rejected = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
    return {"reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean())}
