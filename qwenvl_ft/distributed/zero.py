"""The DeepSpeed config of a run, generated from the resolved config: there is no hand-kept JSON to drift from it.

`deepspeed_config` writes "auto" wherever the value is the Trainer's (batch sizes, accumulation, clipping,
precision, optimizer hyper-parameters) or the model's (bucket sizes from the hidden size): transformers'
`HfTrainerDeepSpeedConfig` fills those from the TrainingArguments and the model when the run starts, so the two
cannot disagree. Before any process starts, `check_deepspeed_config` fills the same values through that same class
(`resolve_auto`) and hands the result to DeepSpeed's own `DeepSpeedConfig`, which rejects unknown keys, wrong
types and inconsistent settings.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Dict, Optional

from qwenvl_ft.config.dist import OffloadDevice
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.config.trainer import Precision
from qwenvl_ft.errors import ConfigError


def deepspeed_config(cfg: TrainConfig) -> Dict:
    """The dict handed to `TrainingArguments(deepspeed=...)` for dist.engine=deepspeed."""
    zero_cfg = cfg.dist.zero
    zero: Dict = {
        "stage": zero_cfg.stage,
        "overlap_comm": zero_cfg.overlap_comm,
        "contiguous_gradients": zero_cfg.contiguous_gradients,
        "reduce_bucket_size": "auto",
    }
    if zero_cfg.stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=zero_cfg.gather_16bit_weights_on_model_save)
    if zero_cfg.offload_optimizer != OffloadDevice.none:
        zero["offload_optimizer"] = {"device": zero_cfg.offload_optimizer.value, "pin_memory": True}
    if zero_cfg.offload_param != OffloadDevice.none:
        zero["offload_param"] = {"device": zero_cfg.offload_param.value, "pin_memory": True}
    config: Dict = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 2 ** 31 - 1,  # the Trainer logs the loss; DeepSpeed's own step lines only repeat it
        "wall_clock_breakdown": False,
    }
    if zero_cfg.offload_optimizer != OffloadDevice.none:
        if cfg.optimizer.vision_lr is None and cfg.optimizer.merger_lr is None:
            # An offloaded optimizer step runs on the CPU: DeepSpeed's CPU Adam is several times faster than
            # torch's there. Its hyper-parameters are the Trainer's ("auto").
            config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                               "weight_decay": "auto"}}
        else:
            # Separate vision / merger learning rates need the Trainer's optimizer (its parameter groups);
            # DeepSpeed otherwise insists on its own CPU Adam with offloading.
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def trainer_values(cfg: TrainConfig, world_size: int) -> SimpleNamespace:
    """The TrainingArguments values `HfTrainerDeepSpeedConfig` reads, as training/arguments.py's
    `training_arguments` sets them (tests/test_distributed.py compares the two)."""
    trainer_cfg, optim_cfg = cfg.trainer, cfg.optimizer
    warmup = optim_cfg.warmup_ratio

    def get_warmup_steps(num_training_steps: int) -> int:
        return math.ceil(num_training_steps * warmup) if warmup < 1 else int(warmup)

    return SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=trainer_cfg.batch_size,
        gradient_accumulation_steps=trainer_cfg.gradient_accumulation_steps, max_grad_norm=optim_cfg.max_grad_norm,
        learning_rate=optim_cfg.lr, adam_beta1=optim_cfg.betas[0], adam_beta2=optim_cfg.betas[1],
        adam_epsilon=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, save_on_each_node=False,
        fp16=trainer_cfg.precision == Precision.fp16, fp16_full_eval=False,
        bf16=trainer_cfg.precision == Precision.bf16, bf16_full_eval=False, get_warmup_steps=get_warmup_steps)


def resolve_auto(config: Dict, args, hidden_size: Optional[int], num_training_steps: int = 1) -> Dict:
    """`config` with its "auto" values filled exactly as the Trainer fills them (transformers'
    HfTrainerDeepSpeedConfig: `trainer_config_process` from the arguments, `trainer_config_finalize` from the
    model's hidden size). Without a hidden size the bucket sizes stay "auto"."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    filler = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    try:
        filler.trainer_config_process(args)
        if hidden_size is not None:
            model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))
            filler.trainer_config_finalize(args, model, num_training_steps)
        return filler.config
    finally:
        # The filler registers itself as the process's DeepSpeed config (a weak reference transformers'
        # `from_pretrained` consults for ZeRO-3); this one is only a check and must not linger.
        unset_hf_deepspeed_config()


def check_deepspeed_config(cfg: TrainConfig, world_size: int, hidden_size: Optional[int]) -> Dict:
    """Generate, fill and validate with DeepSpeed's own `DeepSpeedConfig`; returns the filled config.
    A setting DeepSpeed rejects becomes a ConfigError before any process starts."""
    from deepspeed.runtime.config import DeepSpeedConfig

    resolved = resolve_auto(deepspeed_config(cfg), trainer_values(cfg, world_size), hidden_size)
    checked = copy.deepcopy(resolved)
    # Outside a process group DeepSpeed takes the world size to be 1 and would find train_batch_size (micro batch
    # x accumulation x world size) inconsistent; it derives the same value from the other two itself.
    checked.pop("train_batch_size", None)
    zero = checked["zero_optimization"]
    for key in [k for k, v in zero.items() if v == "auto"]:  # no hidden size known: DeepSpeed's own defaults
        zero.pop(key)
    try:
        DeepSpeedConfig(checked)
    except Exception as err:
        raise ConfigError(f"DeepSpeed rejects the config generated from dist={cfg.dist.engine.value} "
                          f"(stage {cfg.dist.zero.stage}): {type(err).__name__}: {err}") from None
    return resolved
