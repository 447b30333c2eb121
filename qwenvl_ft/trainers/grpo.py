"""Group relative policy optimisation with images (qwenvl_ft/methods/grpo.py): TRL's GRPOTrainer on prompt rows
(data/prompts.py), with the reward functions of the config (qwenvl_ft/rewards).

How TRL 1.16's GRPOTrainer runs a Qwen2-VL, and what this module adds:
- Data. GRPOTrainer's collator is the identity: rows reach `_generate_and_score_completions` as stored, their
  `images` are injected into the prompt messages (`prepare_multimodal_messages`) and handed to the processor twice
  per generation batch (`apply_chat_template(tokenize=True)` for the prompt ids, `processor(images, text)` for the
  pixel values of the loss forward). `PromptImages` replaces the identity collator: images are opened, checked and
  sized as the SFT collator does and reach the processor already at their final size, so its resize is a no-op and
  every data error names the row (tests/test_grpo.py compares TRL's tokens and pixels with the SFT collator's).
- Padding. TRL left-pads the prompt ids itself but takes `mm_token_type_ids` from the processor's own padding: the
  processor must pad on the left too (TRL's documented requirement), or Qwen2-VL's M-RoPE positions of every
  shorter prompt in a batch are shifted. `build_trainer` sets it.
- Reference. Given the base model and a LoraConfig, TRL wraps the model itself and computes the reference
  log-probabilities with the adapter disabled (`use_adapter(model, None)`): no second copy. Given a PeftModel it
  would add a "ref" adapter copied from the trained one; full fine-tuning loads a second frozen copy; beta=0 skips
  the reference entirely.
- Rewards. Each reward is called with prompts, completions, completion_ids, every dataset column, trainer_state,
  log_extra, log_metric; None or NaN means "does not apply" (left out of the weighted sum and the logged mean; a
  completion no reward applies to gets advantage 0). TRL logs reward, reward_std and rewards/<name>/mean and /std
  every logging step (TensorBoard), plus KL, entropy, clip ratios and completion lengths; `CompletionSamples`
  (grpo_completions.py) adds a few sampled completions with their rewards as TensorBoard text (TRL's own completion
  log goes to wandb/trackio or parquet only).
- Losses: trl.GRPOConfig.loss_type (grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo) with
  importance_sampling_level token/sequence (GSPO), reward scaling group/batch/none and the two ways of combining
  several rewards; all exposed in `trainer.grpo`.
- vLLM: TRL's colocate mode (`use_vllm`, `vllm_mode="colocate"`) is `trainer.grpo.vllm.enabled`; it takes the same
  PIL images. Not needed for CPU runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.methods.grpo import check_group_batch
from qwenvl_ft.trainers.base import Training, TrainerParts, standalone_parts
from qwenvl_ft.trainers.grpo_completions import completion_samples, format_number, held_out_rewards, log_held_out, \
    reward_metrics, score_completions
from qwenvl_ft.training.trainer import finish_trainer, trainer_class

log = logging.getLogger("qwenvl_ft")


class GrpoTraining(Training):
    def trainer_arguments(self, parts: TrainerParts, common: Dict):
        from trl import GRPOConfig

        from qwenvl_ft.rewards import build_rewards, check_fields

        cfg = parts.cfg
        g = cfg.trainer.grpo
        rewards = build_rewards(g.rewards)
        check_fields(rewards, parts.train_rows.column_names)
        check_user_rewards(rewards, parts)
        check_group_batch(cfg, world_size())
        check_vllm(cfg)
        parts.state["rewards"] = rewards
        log.info("grpo: %d completions per prompt, at most %d tokens; beta=%g, epsilon=%g, loss=%s; rewards: %s",
                 g.num_generations, g.max_completion_length, g.beta, g.epsilon, g.loss_type.value,
                 ", ".join(f"{r.name} ({r.origin}) x {r.weight:g}" for r in rewards))
        return GRPOConfig(**common, **grpo_arguments(cfg, rewards))

    def build_trainer(self, parts: TrainerParts):
        trainer = build_trainer(parts.cfg, parts.model, parts.peft_config, parts.processor, parts.state["rewards"],
                                parts.train_rows, parts.eval_rows, parts)
        parts.state["reference"] = reference_kind(trainer)
        log.info("reference: %s", parts.state["reference"])
        return trainer

    def before_training(self, trainer, parts: TrainerParts) -> Dict:
        return {"reference": parts.state["reference"], **self._held_out(trainer, parts, "before")}

    def training_metrics(self, trainer, result) -> Dict:
        """Besides the loss: the mean reward of the sampled completions over the first and the last quarter of the
        logged steps (one step's few prompts are too noisy to compare)."""
        metrics = super().training_metrics(trainer, result)
        rewards = [entry["reward"] for entry in trainer.state.log_history if entry.get("reward") is not None]
        quarter = max(1, len(rewards) // 4)
        metrics["logged_reward_start"] = sum(rewards[:quarter]) / quarter if rewards else None
        metrics["logged_reward_end"] = sum(rewards[-quarter:]) / quarter if rewards else None
        return metrics

    def after_training(self, trainer, parts: TrainerParts) -> Dict:
        # final/ is saved by now: what loads it later gets the processor as build_processor leaves it
        parts.processor.tokenizer.padding_side = "right"
        return self._held_out(trainer, parts, "after")

    def _held_out(self, trainer, parts: TrainerParts, when: str) -> Dict:
        cfg = parts.cfg
        if not cfg.trainer.eval_generation or parts.eval_rows is None:
            return {}
        from qwenvl_ft.data.prompts import with_solutions

        rows = with_solutions([parts.eval_rows[i] for i in range(len(parts.eval_rows))], parts.processor, cfg.data)
        result = held_out_rewards(trainer.model, parts.processor, cfg.data, rows, parts.state["rewards"],
                                  cfg.trainer.eval_batch_size, cfg.trainer.max_new_tokens)
        log_held_out(result, rows, cfg.trainer.num_predictions_to_print, when)
        # flat numbers, as every method's metrics.json holds them (model cards, sweep summaries read them)
        return {f"eval_{key}_{when}": value for key, value in reward_metrics(result["summary"]).items()}

    def result_line(self, metrics: Dict) -> str:
        start, end = metrics.get("logged_reward_start"), metrics.get("logged_reward_end")
        line = (f"mean reward of the sampled completions {format_number(start)} -> {format_number(end)} (first -> "
                f"last quarter)")
        names = [k[len("eval_"):-len("_before")] for k in metrics if k.startswith("eval_reward")
                 and k.endswith("_before")]
        if "reward" in names and "eval_reward_after" in metrics:
            parts = [f"{name[len('reward/'):]} {format_number(metrics[f'eval_{name}_before'])} -> "
                     f"{format_number(metrics.get(f'eval_{name}_after'))}" for name in names if name != "reward"]
            line += (f"; held-out mean reward {format_number(metrics['eval_reward_before'])} -> "
                     f"{format_number(metrics['eval_reward_after'])} ({', '.join(parts)})")
        return line

    # -- evaluation (`qwenvl-ft eval`) -------------------------------------------------------------------------

    def generation_rows(self, rows: List[dict]) -> List[dict]:
        """Each prompt answered by its solution (empty for a prompt-only row; a grounding row's objects, written by
        the collator for its image sizes)."""
        from qwenvl_ft.data.prompts import objects_of

        return [{"messages": list(row["prompt"]) + [{"role": "assistant", "content": [
            {"type": "text", "text": "<objects>" if objects_of(row) else row.get("solution") or ""}]}],
            "images": row.get("images") or [], "videos": [], "source": row.get("source", "?"),
            "objects": objects_of(row)} for row in rows]

    def evaluate_models(self, models: Dict, rows: List[dict], processor, cfg,
                        predictions: Optional[Dict[str, List[str]]] = None) -> Dict[str, Dict]:
        """The configured rewards of each side's completions (the greedy answers `eval` generated): each reward's
        mean over the rows it applies to, and `reward`, the mean weighted total."""
        from qwenvl_ft.data.prompts import with_solutions
        from qwenvl_ft.rewards import build_rewards

        rewards = build_rewards(cfg.trainer.grpo.rewards)
        rows = with_solutions(rows, processor, cfg.data)
        return {side: reward_metrics(score_completions(rewards, rows, completions)["summary"])
                for side, completions in (predictions or {}).items()}


TRAINING = GrpoTraining()


# ----------------------------------------------------------------------------------------------------------------
# config -> TRL


def grpo_arguments(cfg, rewards: Sequence[Any]) -> Dict[str, Any]:
    """The GRPO-specific GRPOConfig arguments (training_arguments supplies the rest): a pure function of the config
    and the built rewards (their weights)."""
    g = cfg.trainer.grpo
    arguments: Dict[str, Any] = dict(
        remove_unused_columns=False,  # the rewards read the dataset's columns
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        min_p=g.min_p,
        repetition_penalty=g.repetition_penalty,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        loss_type=g.loss_type.value,
        importance_sampling_level=g.importance_sampling_level.value,
        scale_rewards=g.scale_rewards.value,
        multi_objective_aggregation=g.reward_aggregation.value,
        num_iterations=g.num_iterations,
        mask_truncated_completions=g.mask_truncated_completions,
        sync_ref_model=g.sync_ref_model,
        ref_model_sync_steps=g.ref_model_sync_steps,
        ref_model_mixup_alpha=g.ref_model_mixup_alpha,
        reward_weights=[reward.weight for reward in rewards],
        log_completions=False,  # parquet files and rich tables; CompletionSamples writes TensorBoard text instead
    )
    if g.vllm.enabled:
        arguments.update(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=g.vllm.gpu_memory_utilization,
            vllm_tensor_parallel_size=g.vllm.tensor_parallel_size,
            vllm_enable_sleep_mode=g.vllm.enable_sleep_mode,
            vllm_max_model_length=g.vllm.max_model_length or (
                None if cfg.data.max_length is None else cfg.data.max_length + g.max_completion_length),
        )
    return arguments


def check_user_rewards(rewards, parts: TrainerParts) -> None:
    """Each user reward called once on the first batch of training rows, as TRL will call it (the collator's
    rows, every column), each row answered by its own reference (or nothing): a reward that raises or returns the
    wrong thing stops the run now, naming the row (rewards/checked.py), not after the model loads and generates."""
    from qwenvl_ft.rewards.checked import check_on_rows

    if not any(":" in reward.origin for reward in rewards) or len(parts.train_rows) == 0:
        return
    count = min(len(parts.train_rows), parts.cfg.trainer.batch_size)
    from transformers import TrainerState

    rows = parts.collator([parts.train_rows[i] for i in range(count)])
    texts = [row.get("solution") if isinstance(row.get("solution"), str) else "" for row in rows]
    conversational = isinstance(rows[0].get("prompt"), list)
    completions = [[{"role": "assistant", "content": text}] if conversational else text for text in texts]
    ids = [parts.processor.tokenizer.encode(text, add_special_tokens=False) for text in texts]
    check_on_rows(rewards, rows, completions, completion_ids=ids, trainer_state=TrainerState())
    log.info("rewards: %s answered a first batch of %d rows", ", ".join(r.name for r in rewards if ":" in r.origin),
             count)


def check_vllm(cfg) -> None:
    """vLLM's colocate mode needs a GPU (that vllm is installed, preflight checked first: training/preflight.py)."""
    if not cfg.trainer.grpo.vllm.enabled:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("trainer.grpo.vllm.enabled=true needs a CUDA GPU (vLLM's colocate mode shares it with "
                          "training)")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_trainer(cfg, base, peft_config, processor, rewards, train_rows, eval_rows,
                  parts: Optional[TrainerParts] = None):
    """GRPOTrainer around the base model; `peft_config` (None for full fine-tuning) is applied by TRL, which then
    takes the reference with the adapter disabled. `parts` carries what the run skeleton prepared; without it
    (tests) the same is built here from `cfg`."""
    from trl import GRPOTrainer

    from qwenvl_ft.data.prompts import PromptImages

    collator = parts.collator if parts is not None else PromptImages(processor, cfg.data)
    if parts is None:
        parts = standalone_parts(TRAINING, cfg, base, processor, collator, train_rows, eval_rows, peft_config)
    processor.tokenizer.padding_side = "left"  # see the module docstring: mm_token_type_ids must align
    callbacks = list(parts.callbacks)
    if cfg.trainer.grpo.log_completions and "tensorboard" in cfg.trainer.report_to:
        callbacks.append(completion_samples(rewards, cfg.trainer.grpo.log_completions,
                                            Path(cfg.output_dir) / "tensorboard"))
    trainer = trainer_class(GRPOTrainer, parts.trainer_mixins)(
        model=base,
        reward_funcs=list(rewards),
        args=parts.arguments,
        train_dataset=train_rows,
        eval_dataset=eval_rows if cfg.trainer.eval_steps is not None else None,
        processing_class=processor,  # the processor, not the tokenizer: TRL treats the model as a VLM
        peft_config=peft_config,
        callbacks=callbacks,
    )
    # GRPOTrainer hands Trainer its identity collator; the DataLoaders read `data_collator` when they are built
    # (at train / evaluate), so the checked image loading goes in here.
    trainer.data_collator = collator
    return finish_trainer(trainer, cfg)


def reference_kind(trainer) -> str:
    if trainer.beta == 0:
        return "none (trainer.grpo.beta=0: no KL term)"
    if trainer.ref_model is None:
        return "the base with the adapter disabled"
    return "a frozen copy of the starting model"
