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
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from qwenvl_ft.errors import ConfigError, check
from qwenvl_ft.methods.base import Method, TrainerParts

log = logging.getLogger("qwenvl_ft")


# ----------------------------------------------------------------------------------------------------------------
# settings: trainer.grpo


class GrpoLossType(str, Enum):
    """TRL 1.16 GRPOTrainer losses (see trl.GRPOConfig.loss_type)."""

    grpo = "grpo"  # per-sequence mean of the token losses (the paper; favours short correct answers)
    dapo = "dapo"  # token losses over the tokens of the whole accumulated batch (DAPO; TRL's default)
    dr_grpo = "dr_grpo"  # token losses over batch x max_completion_length (Dr. GRPO)
    bnpo = "bnpo"  # token losses over the tokens of the local batch
    cispo = "cispo"  # clipped importance weights times log-probabilities (MiniMax-M1); epsilon_high ~ 5
    sapo = "sapo"  # a smooth temperature-controlled gate instead of clipping (SAPO)
    luspo = "luspo"  # GSPO's sequence loss scaled by length; needs importance_sampling_level=sequence
    vespo = "vespo"  # Gamma-weighted sequence importance weights (VESPO)


class ImportanceSampling(str, Enum):
    token = "token"  # one probability ratio per token (GRPO)
    sequence = "sequence"  # one per completion (GSPO)


class RewardScaling(str, Enum):
    group = "group"  # advantages divided by the std of their prompt's group (GRPO)
    batch = "batch"  # ... by the std of the whole batch
    none = "none"  # not divided (Dr. GRPO: scaling favours too easy and too hard prompts)


class RewardAggregation(str, Enum):
    sum_then_normalize = "sum_then_normalize"  # weighted sum of the rewards, then the group normalisation
    normalize_then_sum = "normalize_then_sum"  # each reward normalised in its group first, then summed (GDPO)


@dataclass
class RewardConfig:
    """One reward function (qwenvl_ft/rewards). A completion's reward is the weighted sum of the rewards that apply
    to its row."""

    # A built-in (exact_match, normalised_match, number_match, choice_match, format, valid_json, box_iou), or your
    # own: "package.module:function" (importable) or "path/to/file.py:function". Required ("???" is OmegaConf's
    # missing value).
    function: str = "???"
    name: Optional[str] = None  # label in logs, TensorBoard and reports (default: the function's name)
    weight: float = 1.0  # the reward's weight in the sum
    options: Dict[str, Any] = field(default_factory=dict)  # the built-in's options, or keyword arguments of yours


@dataclass
class VllmConfig:
    """Generation with vLLM inside the training process (TRL's colocate mode): much faster sampling on GPUs, the
    policy's weights copied into vLLM after every optimizer step. Needs `pip install vllm` and CUDA."""

    enabled: bool = False  # sample with vLLM (colocate mode; CUDA only)
    gpu_memory_utilization: float = 0.3  # share of each GPU vLLM may take (weights + KV cache)
    tensor_parallel_size: int = 1  # GPUs one vLLM engine spans
    enable_sleep_mode: bool = False  # offload vLLM's weights and cache during the optimizer step
    max_model_length: Optional[int] = None  # vLLM context (None: data.max_length + max_completion_length)

    def __post_init__(self) -> None:
        check(0 < self.gpu_memory_utilization < 1, "trainer.grpo.vllm.gpu_memory_utilization must be in (0, 1)")
        check(self.tensor_parallel_size >= 1, "trainer.grpo.vllm.tensor_parallel_size must be >= 1")
        check(self.max_model_length is None or self.max_model_length > 0,
              "trainer.grpo.vllm.max_model_length must be > 0")


@dataclass
class GrpoConfig:
    """`trainer.grpo.*`, handed to TRL's GRPOConfig.

    Each step samples `num_generations` completions of every prompt, scores them with the reward functions, and
    makes each completion more or less likely by how its reward compares with its group's. trainer.batch_size counts
    completions per device: a batch of 8 with num_generations=4 holds 2 prompts, and batch_size x
    gradient_accumulation_steps x devices must be a multiple of num_generations. The reference (the KL term, weight
    `beta`) is the starting model: for LoRA/DoRA/QLoRA the same weights with the adapter disabled (no second copy),
    for full fine-tuning a frozen copy; beta=0 drops the KL term and the reference with it.
    """

    num_generations: int = 8  # group size G: completions sampled per prompt
    max_completion_length: int = 256  # tokens per completion (data.max_length bounds the prompt)
    temperature: float = 1.0  # sampling of the completions
    top_p: float = 1.0  # nucleus sampling mass of the completions (1: off)
    top_k: int = 0  # 0: off
    min_p: Optional[float] = None  # drop tokens below min_p x the likeliest one's probability (None: off)
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens in the completions
    beta: float = 0.04  # KL coefficient towards the reference (DeepSeekMath: 0.04; 0: no KL, no reference)
    epsilon: float = 0.2  # clipping of the probability ratio to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # None: epsilon (DAPO's clip-higher: 0.28)
    loss_type: GrpoLossType = GrpoLossType.dapo  # how token losses are averaged (see GrpoLossType)
    # Probability ratio per token (GRPO) or per completion (GSPO)
    importance_sampling_level: ImportanceSampling = ImportanceSampling.token
    scale_rewards: RewardScaling = RewardScaling.group  # divide advantages by the std of the group or batch
    # Combine several rewards before or after normalising
    reward_aggregation: RewardAggregation = RewardAggregation.sum_then_normalize
    num_iterations: int = 1  # optimizer passes over each batch of completions (mu)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length add no loss (DAPO)
    # Full fine-tuning only: move the reference towards the policy every ref_model_sync_steps (TR-DPO style).
    sync_ref_model: bool = False
    ref_model_sync_steps: int = 512  # with sync_ref_model: steps between reference updates
    ref_model_mixup_alpha: float = 0.6  # with sync_ref_model: reference = alpha x policy + (1 - alpha) x ref
    rewards: List[RewardConfig] = field(default_factory=list)  # the reward functions, weighted and summed
    log_completions: int = 4  # sampled completions (with their rewards) written to TensorBoard per logging step
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self) -> None:
        check(self.num_generations >= 2, "trainer.grpo.num_generations must be >= 2 (advantages compare the "
                                         "completions of a group)")
        check(self.max_completion_length > 0, "trainer.grpo.max_completion_length must be > 0")
        check(self.temperature > 0, "trainer.grpo.temperature must be > 0")
        check(0 < self.top_p <= 1, "trainer.grpo.top_p must be in (0, 1]")
        check(self.top_k >= 0, "trainer.grpo.top_k must be >= 0")
        check(self.min_p is None or 0 <= self.min_p <= 1, "trainer.grpo.min_p must be in [0, 1]")
        check(self.repetition_penalty > 0, "trainer.grpo.repetition_penalty must be > 0")
        check(self.beta >= 0, "trainer.grpo.beta must be >= 0")
        check(self.epsilon > 0 and (self.epsilon_high is None or self.epsilon_high > 0),
              "trainer.grpo.epsilon and epsilon_high must be > 0")
        check(self.num_iterations >= 1, "trainer.grpo.num_iterations must be >= 1")
        check(self.log_completions >= 0, "trainer.grpo.log_completions must be >= 0")
        check(self.ref_model_sync_steps > 0 and 0 <= self.ref_model_mixup_alpha <= 1,
              "trainer.grpo.ref_model_sync_steps must be > 0 and ref_model_mixup_alpha in [0, 1]")
        check(not self.sync_ref_model or self.beta > 0,
              "trainer.grpo.sync_ref_model needs trainer.grpo.beta > 0 (without the KL term there is no reference)")
        check(self.loss_type != GrpoLossType.luspo or self.importance_sampling_level == ImportanceSampling.sequence,
              "trainer.grpo.loss_type=luspo needs trainer.grpo.importance_sampling_level=sequence")


FORMATS = {
    "llava_prompt": "`image`, `prompt`/`question`/`problem` (text, optional <image>), `solution`/`answer`; or LLaVA "
                    "`conversations` whose last answer is the solution",
    "messages_prompt": "HF / TRL: `images` + `prompt` messages (or `messages` ending on the answer), `solution`",
    "shapes_prompt": "generated: a shape image, \"What is in the image?\", solution \"a red circle\"",
}


# ----------------------------------------------------------------------------------------------------------------
# the method


class Grpo(Method):
    name = "grpo"
    summary = "group relative policy optimisation: sampled completions scored by reward functions (TRL GRPOTrainer)"
    demo_recipe = "grpo_demo"
    settings = GrpoConfig
    data_formats = FORMATS
    generated_formats = ("shapes_prompt",)
    row_kind = "prompts"
    batch_unit = "completions"
    # trains_on_prompt stays False: the loss is on sampled completions, there is no sequence whose prompt to add
    arguments_class = "trl:GRPOConfig"
    argument_sources = {
        "remove_unused_columns": "qwenvl-ft (the rewards read the dataset's columns)",
        "reward_weights": "trainer.grpo.rewards[].weight",
        "multi_objective_aggregation": "trainer.grpo.reward_aggregation",
        "log_completions": "trainer.grpo.log_completions (written to TensorBoard)",
        **{key: f"trainer.grpo.{key}" for key in (
            "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "beta", "epsilon", "epsilon_high", "loss_type", "importance_sampling_level",
            "scale_rewards", "num_iterations", "mask_truncated_completions", "sync_ref_model",
            "ref_model_sync_steps", "ref_model_mixup_alpha")},
        "use_vllm": "trainer.grpo.vllm.enabled", "vllm_mode": "trainer.grpo.vllm.enabled (always colocate)",
        **{f"vllm_{key}": f"trainer.grpo.vllm.{key}" for key in (
            "gpu_memory_utilization", "tensor_parallel_size", "enable_sleep_mode", "max_model_length")},
    }

    def check_config(self, cfg) -> None:
        """Besides the base rules: no packing (a GRPO batch is built inside TRL), and the rewards resolved, so that
        an unknown reward, a bad path or a signature TRL cannot call fails at validation, before anything loads."""
        from qwenvl_ft.rewards import build_rewards

        super().check_config(cfg)
        check(not cfg.data.packing, "data.packing is for trainer=sft and trainer=dpo; TRL's GRPOTrainer builds the "
                                    "batches of prompts and completions itself")
        build_rewards(cfg.trainer.grpo.rewards)

    # -- data ----------------------------------------------------------------------------------------------------

    def read_rows(self, data_cfg, problems: Optional[list] = None) -> Tuple[List[dict], List[dict]]:
        from qwenvl_ft.data.prompts import load_prompt_rows

        return load_prompt_rows(data_cfg, problems)

    def measurer(self, processor, data_cfg):
        from qwenvl_ft.data.prompts import PromptMeasurer

        return PromptMeasurer(processor, data_cfg).measure

    def to_dataset(self, rows: List[dict]):
        from qwenvl_ft.data.prompts import to_prompt_dataset

        return to_prompt_dataset(rows)

    def collator(self, processor, data_cfg):
        from qwenvl_ft.data.prompts import PromptImages

        return PromptImages(processor, data_cfg)

    def store_kind(self):
        from qwenvl_ft.data.prompts import prompts_kind

        return prompts_kind()

    def converters(self):
        from qwenvl_ft.data.prompts import CONVERTERS

        return CONVERTERS

    def generate(self, data_cfg):
        from qwenvl_ft.data.prompts import generate_prompts

        return generate_prompts(data_cfg.shapes)

    def from_store(self, dataset):
        from qwenvl_ft.data.prompts import from_prompt_store

        return from_prompt_store(dataset)

    # -- training ------------------------------------------------------------------------------------------------

    def trainer_arguments(self, parts: TrainerParts, common: Dict):
        from trl import GRPOConfig

        from qwenvl_ft.rewards import build_rewards, check_fields

        cfg = parts.cfg
        g = cfg.trainer.grpo
        rewards = build_rewards(g.rewards)
        check_fields(rewards, parts.train_rows.column_names)
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
        rows = [parts.eval_rows[i] for i in range(len(parts.eval_rows))]
        result = held_out_rewards(trainer.model, parts.processor, cfg.data, rows, parts.state["rewards"],
                                  cfg.trainer.eval_batch_size, cfg.trainer.max_new_tokens)
        log_held_out(result, rows, cfg.trainer.num_predictions_to_print, when)
        # flat numbers, as every method's metrics.json holds them (model cards, sweep summaries read them)
        return {f"eval_{key}_{when}": value for key, value in reward_metrics(result["summary"]).items()}

    def result_line(self, metrics: Dict) -> str:
        start, end = metrics.get("logged_reward_start"), metrics.get("logged_reward_end")
        line = f"mean reward of the sampled completions {_number(start)} -> {_number(end)} (first -> last quarter)"
        names = [k[len("eval_"):-len("_before")] for k in metrics if k.startswith("eval_reward")
                 and k.endswith("_before")]
        if "reward" in names and "eval_reward_after" in metrics:
            parts = [f"{name[len('reward/'):]} {_number(metrics[f'eval_{name}_before'])} -> "
                     f"{_number(metrics.get(f'eval_{name}_after'))}" for name in names if name != "reward"]
            line += (f"; held-out mean reward {_number(metrics['eval_reward_before'])} -> "
                     f"{_number(metrics['eval_reward_after'])} ({', '.join(parts)})")
        return line

    # -- evaluation (`qwenvl-ft eval`) -------------------------------------------------------------------------

    def generation_rows(self, rows: List[dict]) -> List[dict]:
        """Each prompt answered by its solution (empty for a prompt-only row)."""
        return [{"messages": list(row["prompt"]) + [{"role": "assistant", "content": [
            {"type": "text", "text": row.get("solution") or ""}]}], "images": row.get("images") or [],
            "videos": [], "source": row.get("source", "?")} for row in rows]

    def evaluate_models(self, models: Dict, rows: List[dict], processor, cfg,
                        predictions: Optional[Dict[str, List[str]]] = None) -> Dict[str, Dict]:
        """The configured rewards of each side's completions (the greedy answers `eval` generated): each reward's
        mean over the rows it applies to, and `reward`, the mean weighted total."""
        from qwenvl_ft.rewards import build_rewards

        rewards = build_rewards(cfg.trainer.grpo.rewards)
        return {side: reward_metrics(score_completions(rewards, rows, completions)["summary"])
                for side, completions in (predictions or {}).items()}

    # -- estimate ----------------------------------------------------------------------------------------------

    def batch_data(self, cfg):
        """A training row is a prompt (at most data.max_length) plus its completion."""
        from dataclasses import replace

        length = cfg.data.max_length
        completion = cfg.trainer.grpo.max_completion_length
        return replace(cfg.data, max_length=None if length is None else length + completion)

    def memory_rows(self, cfg, counts, weight_bytes: int) -> List[tuple]:
        """A frozen reference copy (full fine-tuning with beta > 0); the generation batch (trainer.batch_size x
        gradient_accumulation_steps completions, sampled at once): its KV cache and the pixel values TRL keeps for
        every completion (it processes each copy of a prompt's images, in float32)."""
        from qwenvl_ft import families
        from qwenvl_ft.estimate.budget import batch_budget
        from qwenvl_ft.estimate.counts import hf_config

        g, t = cfg.trainer.grpo, cfg.trainer
        rows = []
        if not cfg.adapter.is_peft and g.beta > 0:
            rows.append(("reference model", counts.total * weight_bytes,
                         f"GRPO full fine-tuning with beta > 0: a frozen copy, {counts.total / 1e9:.2f}B params x "
                         f"{weight_bytes} B"))
        if cfg.data.max_length is None:
            return rows
        config = hf_config(cfg.model)
        text, vision = config.get_text_config(), config.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        completions = t.batch_size * t.gradient_accumulation_steps  # one generation batch per device
        if not g.vllm.enabled:
            tokens = completions * (cfg.data.max_length + g.max_completion_length)
            per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * weight_bytes
            rows.append(("generation: KV cache", per_token * tokens,
                         f"{completions} completions x ({cfg.data.max_length} prompt + {g.max_completion_length} "
                         f"generated) tokens x {per_token} B; freed before the loss forward, so an upper bound"))
        one = batch_budget(self.batch_data(cfg), 1, families.of_config(config))
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        if one.vision_patches:
            rows.append(("generation: pixel values", completions * one.vision_patches * patch * 4,
                         f"{completions} completions x {one.vision_patches} patches x {patch} fp32 (each completion "
                         f"carries its prompt's images)"))
        return rows


METHOD = Grpo()


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------------------------
# config -> TRL


def check_group_batch(cfg, world_size: int) -> None:
    """GRPO samples num_generations completions per prompt and a generation batch must hold whole groups."""
    t, g = cfg.trainer, cfg.trainer.grpo
    completions = t.batch_size * t.gradient_accumulation_steps * world_size
    if completions % g.num_generations:
        raise ConfigError(
            f"trainer.batch_size x gradient_accumulation_steps x devices = {t.batch_size} x "
            f"{t.gradient_accumulation_steps} x {world_size} = {completions} completions per optimizer step, not a "
            f"multiple of trainer.grpo.num_generations={g.num_generations} (each prompt's group must be whole)")
    if t.eval_steps is not None and (t.eval_batch_size * world_size) % g.num_generations:
        raise ConfigError(f"trainer.eval_batch_size x devices = {t.eval_batch_size * world_size} must be a multiple "
                          f"of trainer.grpo.num_generations={g.num_generations} for evaluation during training")


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


def check_vllm(cfg) -> None:
    import importlib.util

    if not cfg.trainer.grpo.vllm.enabled:
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("trainer.grpo.vllm.enabled=true needs the vllm package (pip install \"qwenvl-ft[vllm]\", "
                          "the versions TRL supports) and a CUDA GPU")
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
    from qwenvl_ft.training.common import finish_trainer, standalone_parts, trainer_class

    collator = parts.collator if parts is not None else PromptImages(processor, cfg.data)
    if parts is None:
        parts = standalone_parts(METHOD, cfg, base, processor, collator, train_rows, eval_rows, peft_config)
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
    return ", ".join(f"{name} {_number(value)}" for name, value in summary.items())


def log_held_out(result: Dict[str, Any], rows: Sequence[dict], count: int, when: str) -> None:
    lines = [f"held-out completions {when} training (mean reward {_number(result['summary']['reward'])} on "
             f"{len(rows)} prompts; {format_rewards(result['summary'])}):"]
    for index in range(min(count, len(rows))):
        lines.append(f"  completion: {result['completions'][index]!r:40s} solution: {rows[index].get('solution')!r}")
    log.info("\n".join(lines))


