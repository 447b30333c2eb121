"""Group relative policy optimisation with images: TRL's GRPOTrainer on prompt rows (data/prompts.py), with the
reward functions of the config (qwenvl_ft/rewards).

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
  every logging step (TensorBoard), plus KL, entropy, clip ratios and completion lengths; `CompletionSamples` adds
  a few sampled completions with their rewards as TensorBoard text (TRL's own completion log goes to wandb/trackio
  or parquet only).
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

from qwenvl_ft.config.schema import ConfigError, TrainConfig

log = logging.getLogger("qwenvl_ft")


# ----------------------------------------------------------------------------------------------------------------
# config -> TRL


def check_group_batch(typed: TrainConfig, world_size: int) -> None:
    """GRPO samples num_generations completions per prompt and a generation batch must hold whole groups."""
    t, g = typed.trainer, typed.trainer.grpo
    completions = t.batch_size * t.gradient_accumulation_steps * world_size
    if completions % g.num_generations:
        raise ConfigError(
            f"trainer.batch_size x gradient_accumulation_steps x devices = {t.batch_size} x "
            f"{t.gradient_accumulation_steps} x {world_size} = {completions} completions per optimizer step, not a "
            f"multiple of trainer.grpo.num_generations={g.num_generations} (each prompt's group must be whole)")
    if t.eval_steps is not None and (t.eval_batch_size * world_size) % g.num_generations:
        raise ConfigError(f"trainer.eval_batch_size x devices = {t.eval_batch_size * world_size} must be a multiple "
                          f"of trainer.grpo.num_generations={g.num_generations} for evaluation during training")


def grpo_arguments(typed: TrainConfig, rewards: Sequence[Any]) -> Dict[str, Any]:
    """The GRPO-specific GRPOConfig arguments (training_arguments supplies the rest): a pure function of the config
    and the built rewards (their weights)."""
    g = typed.trainer.grpo
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
        use_liger_kernel=typed.model.use_liger_kernel,
    )
    if g.vllm.enabled:
        arguments.update(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=g.vllm.gpu_memory_utilization,
            vllm_tensor_parallel_size=g.vllm.tensor_parallel_size,
            vllm_enable_sleep_mode=g.vllm.enable_sleep_mode,
            vllm_max_model_length=g.vllm.max_model_length or (
                None if typed.data.max_length is None else typed.data.max_length + g.max_completion_length),
        )
    return arguments


def check_vllm(typed: TrainConfig) -> None:
    import importlib.util

    if not typed.trainer.grpo.vllm.enabled:
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("trainer.grpo.vllm.enabled=true needs the vllm package (pip install vllm) and a CUDA GPU")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("trainer.grpo.vllm.enabled=true needs a CUDA GPU (vLLM's colocate mode shares it with "
                          "training)")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_trainer(typed: TrainConfig, base, peft_config, processor, rewards, train_rows, eval_rows):
    """GRPOTrainer around the base model; `peft_config` (None for full fine-tuning) is applied by TRL, which then
    takes the reference with the adapter disabled."""
    from trl import GRPOConfig, GRPOTrainer

    from qwenvl_ft.data.prompts import PromptImages
    from qwenvl_ft.training.common import build_optimizers, training_arguments, training_callbacks
    from qwenvl_ft.training.speed import check_liger, vision_checkpointing_callback

    check_liger(typed.model)
    check_vllm(typed)
    check_group_batch(typed, world_size())
    processor.tokenizer.padding_side = "left"  # see the module docstring: mm_token_type_ids must align
    callbacks = training_callbacks(typed)
    if typed.model.vision_checkpointing != typed.model.gradient_checkpointing:
        callbacks.append(vision_checkpointing_callback(typed.model.vision_checkpointing))
    if typed.trainer.grpo.log_completions and "tensorboard" in typed.trainer.report_to:
        callbacks.append(completion_samples(rewards, typed.trainer.grpo.log_completions,
                                            Path(typed.output_dir) / "tensorboard"))
    args = GRPOConfig(**training_arguments(typed), **grpo_arguments(typed, rewards))
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=list(rewards),
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows if typed.trainer.eval_steps is not None else None,
        processing_class=processor,  # the processor, not the tokenizer: TRL treats the model as a VLM
        peft_config=peft_config,
        callbacks=callbacks,
    )
    # GRPOTrainer hands Trainer its identity collator; the DataLoaders read `data_collator` when they are built
    # (at train / evaluate), so the checked image loading goes in here.
    trainer.data_collator = PromptImages(processor, typed.data)
    # Separate vision / merger learning rates need the parameters as trained, after TRL's PEFT wrapping.
    trainer.optimizer, _ = build_optimizers(typed, trainer.model, args)
    return trainer


def reference_kind(trainer) -> str:
    if trainer.beta == 0:
        return "none (trainer.grpo.beta=0: no KL term)"
    if trainer.ref_model is None:
        return "the base with the adapter disabled"
    return "a frozen copy of the starting model"


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


def format_rewards(summary: Dict[str, Optional[float]]) -> str:
    return ", ".join(f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in summary.items())


# ----------------------------------------------------------------------------------------------------------------
# the run (top to bottom, as training/dpo.py)


def train(cfg) -> Dict:
    from qwenvl_ft.config.compose import validate
    from qwenvl_ft.training.common import interrupted, optimizer_steps, save_final, start_run, write_history
    from qwenvl_ft.training.start_from import train_start_model

    train_start_model(validate(cfg))
    run = start_run(cfg)
    if run.finished is not None:
        return run.finished
    typed, output_dir, resume = run.typed, run.output_dir, run.resume
    from transformers import set_seed

    from qwenvl_ft.data.prompts import load_prompt_splits
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor, count_parameters, \
        model_source
    from qwenvl_ft.rewards import build_rewards, check_fields
    from qwenvl_ft.training.resume import ReloadConvertedWeights, StopOnSignal

    g, t = typed.trainer.grpo, typed.trainer
    rewards = build_rewards(g.rewards)
    check_group_batch(typed, world_size())
    check_vllm(typed)
    log.info("grpo: %d completions per prompt, at most %d tokens; beta=%g, epsilon=%g, loss=%s; rewards: %s",
             g.num_generations, g.max_completion_length, g.beta, g.epsilon, g.loss_type.value,
             ", ".join(f"{r.name} ({r.origin}) x {r.weight:g}" for r in rewards))
    set_seed(typed.seed)
    source = model_source(typed.model)
    processor = build_processor(typed.model, typed.data, source)
    train_rows, eval_rows, _ = load_prompt_splits(typed.data, processor, t.batch_size, typed.data.seed, output_dir)
    check_fields(rewards, train_rows.column_names)
    log.info("data: %d training prompts, %d held-out prompts", len(train_rows), len(eval_rows) if eval_rows else 0)
    if t.eval_steps is not None and eval_rows is None:
        raise ConfigError("trainer.eval_steps needs held-out prompts: set data.eval_size or data.eval_path")

    base = build_base_model(typed.model, typed.adapter, source)
    metrics: Dict = {}
    held_out = [eval_rows[i] for i in range(len(eval_rows))] if eval_rows is not None and t.eval_generation else []
    if held_out:
        before = held_out_rewards(base, processor, typed.data, held_out, rewards, t.eval_batch_size,
                                  t.max_new_tokens)
        metrics["eval_rewards_before"] = before["summary"]
        _show(before, held_out, t.num_predictions_to_print, "before")

    peft_config = build_lora_config(base, typed.model, typed.adapter) if typed.adapter.is_peft else None
    trainer = build_trainer(typed, base, peft_config, processor, rewards, train_rows, eval_rows)
    trainable, total = count_parameters(trainer.model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    metrics["reference"] = reference_kind(trainer)
    log.info("reference: %s", metrics["reference"])
    steps = optimizer_steps(typed, len(train_rows) * g.num_generations)
    log.info("training: %d optimizer steps (%s epochs, %d completions per device step x accumulation %d)", steps,
             t.epochs if t.max_steps <= 0 else "-", t.batch_size, t.gradient_accumulation_steps)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    trainer.add_callback(ReloadConvertedWeights(resume))
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume)
    if stop.interrupted(trainer.state):
        return interrupted(trainer, output_dir, metrics)
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    metrics.update(train_loss=result.training_loss, train_runtime_s=result.metrics.get("train_runtime"),
                   global_step=trainer.state.global_step,
                   first_logged_reward=history[0]["reward"] if history else None,
                   last_logged_reward=history[-1]["reward"] if history else None)

    processor.tokenizer.padding_side = "right"  # as build_processor leaves it, for whoever loads final/
    final_dir = save_final(trainer, processor, output_dir)
    if held_out:
        after = held_out_rewards(trainer.model, processor, typed.data, held_out, rewards, t.eval_batch_size,
                                 t.max_new_tokens)
        metrics["eval_rewards_after"] = after["summary"]
        _show(after, held_out, t.num_predictions_to_print, "after")
    write_history(trainer, output_dir, metrics)
    log.info("saved %s to %s", "adapter" if typed.adapter.is_peft else "model", final_dir)
    if held_out:
        b, a = metrics["eval_rewards_before"]["reward"], metrics["eval_rewards_after"]["reward"]
        log.info("result: held-out mean reward %s -> %s (%s -> %s)", _fmt(b), _fmt(a),
                 format_rewards(metrics["eval_rewards_before"]), format_rewards(metrics["eval_rewards_after"]))
    return metrics


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _show(result: Dict[str, Any], rows: Sequence[dict], count: int, when: str) -> None:
    from qwenvl_ft.rewards.builtins import completion_text

    lines = [f"held-out completions {when} training (mean reward {_fmt(result['summary']['reward'])} on "
             f"{len(rows)} prompts: {format_rewards(result['summary'])}):"]
    for index in range(min(count, len(rows))):
        lines.append(f"  completion: {result['completions'][index]!r:40s} solution: {rows[index].get('solution')!r}")
    log.info("\n".join(lines))
