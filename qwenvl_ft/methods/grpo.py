"""Group relative policy optimisation with images: TRL's GRPOTrainer on prompt rows, with the reward functions of
the config (qwenvl_ft/rewards). The declaration: its settings `trainer.grpo` and their checks, its formats, and the
terms `estimate` sizes it by; its rows are qwenvl_ft/data/kinds.py's PROMPT_ROWS, its training
qwenvl_ft/trainers/grpo.py (which says how TRL runs a Qwen2-VL and what qwenvl-ft adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from qwenvl_ft.errors import ConfigError, check
from qwenvl_ft.methods.base import GenerationBatch, Method


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

    # A built-in (exact_match, normalised_match, number_match, choice_match, format, valid_json, box_iou, iou,
    # box_format), or your own: "package.module:function" (importable) or "path/to/file.py:function". Required
    # ("???" is OmegaConf's missing value).
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
    rows = "qwenvl_ft.data.kinds:PROMPT_ROWS"
    training = "qwenvl_ft.trainers.grpo:TRAINING"

    def check_config(self, cfg) -> None:
        """Besides the base rules: no packing (a GRPO batch is built inside TRL), and the rewards resolved, so that
        an unknown reward, a bad path or a signature TRL cannot call fails at validation, before anything loads."""
        from qwenvl_ft.rewards import build_rewards

        super().check_config(cfg)
        check(not cfg.data.packing, "data.packing is for trainer=sft and trainer=dpo; TRL's GRPOTrainer builds the "
                                    "batches of prompts and completions itself")
        check(cfg.trainer.batch_size != "auto",
              f"trainer.batch_size=auto is for trainer=sft and trainer=dpo: a GRPO batch must hold whole groups of "
              f"trainer.grpo.num_generations={cfg.trainer.grpo.num_generations} completions; set trainer.batch_size")
        build_rewards(cfg.trainer.grpo.rewards)

    # -- estimate ----------------------------------------------------------------------------------------------

    def batch_data(self, cfg):
        """A training row is a prompt (at most data.max_length) plus its completion."""
        from dataclasses import replace

        length = cfg.data.max_length
        completion = cfg.trainer.grpo.max_completion_length
        return replace(cfg.data, max_length=None if length is None else length + completion)

    def memory_rows(self, cfg, counts, weight_bytes: int) -> List[tuple]:
        """A frozen reference copy (full fine-tuning with beta > 0)."""
        rows = []
        if not cfg.adapter.is_peft and cfg.trainer.grpo.beta > 0:
            rows.append(("reference model", counts.total * weight_bytes,
                         f"GRPO full fine-tuning with beta > 0: a frozen copy, {counts.total / 1e9:.2f}B params x "
                         f"{weight_bytes} B"))
        return rows

    def generation_batch(self, cfg) -> Optional[GenerationBatch]:
        """The completions sampled at once before the loss forward: trainer.batch_size x gradient_accumulation_steps
        per device, each a prompt of at most data.max_length plus trainer.grpo.max_completion_length tokens, their
        KV cache in the training process unless vLLM samples them (None without data.max_length: nothing to size
        by)."""
        g, t = cfg.trainer.grpo, cfg.trainer
        if cfg.data.max_length is None:
            return None
        completions = t.batch_size * t.gradient_accumulation_steps  # one generation batch per device
        return GenerationBatch(completions, cfg.data.max_length, g.max_completion_length, not g.vllm.enabled)


METHOD = Grpo()


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
