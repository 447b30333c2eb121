"""The `adapter` and `optimizer` groups: full fine-tuning or a (Q)LoRA/DoRA adapter, and how it is optimised.

Standard library only: `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from qwenvl_ft.errors import check as _check


class AdapterMethod(str, Enum):
    full = "full"  # every unfrozen weight is trained
    lora = "lora"
    dora = "dora"  # weight-decomposed LoRA
    qlora = "qlora"  # LoRA on a 4-bit NF4 base


@dataclass
class AdapterConfig:
    """Full fine-tuning or a (Q)LoRA/DoRA adapter. LoRA fields are ignored for method=full."""

    method: AdapterMethod = AdapterMethod.lora  # full fine-tuning, or an adapter: lora, dora, qlora (4-bit base)
    r: int = 8  # LoRA rank: adapter width, trainable parameters grow with it
    alpha: int = 16  # LoRA scaling numerator: updates are scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    # Leaf names of the language-model Linear layers that get adapters.
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    vision_lora: bool = False  # also put adapters on every Linear of the vision tower blocks
    bias: str = "none"  # biases trained too: "none", "all" or "lora_only" (PEFT's bias)
    # 4-bit quantisation of the base (bitsandbytes), used by method=qlora
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # 4-bit data type: "nf4" (QLoRA) or "fp4"
    bnb_4bit_use_double_quant: bool = True  # quantise the quantisation constants too (saves ~0.4 bit/param)
    # QLoRA: cast every weight that is not 4-bit (embeddings, LM head, norms, the vision tower's) to fp32, as PEFT's
    # prepare_model_for_kbit_training does, which makes the residual stream fp32 too. Off (default): they stay in
    # model.dtype, as in TRL >= 1.16 (recipe=qlora_7b_amazon: 9.69 GiB predicted instead of 14.94). Turn it on with
    # model.dtype=float16 (GPUs without bf16), whose narrow range can overflow in the residual stream, or to
    # reproduce a run made before qwenvl-ft stopped casting (docs/speed.md).
    qlora_fp32_upcast: bool = False

    def __post_init__(self) -> None:
        _check(self.r > 0, "adapter.r must be > 0")
        _check(self.alpha > 0, "adapter.alpha must be > 0")
        _check(0.0 <= self.dropout < 1.0, "adapter.dropout must be in [0, 1)")
        _check(self.bias in ("none", "all", "lora_only"), "adapter.bias must be one of [none, all, lora_only]")
        _check(self.bnb_4bit_quant_type in ("nf4", "fp4"), "adapter.bnb_4bit_quant_type must be one of [nf4, fp4]")
        _check(not (self.load_in_4bit and self.method == AdapterMethod.full),
               "adapter.load_in_4bit cannot be combined with method=full (4-bit weights are not trainable)")
        _check(not (self.qlora_fp32_upcast and not self.load_in_4bit),
               "adapter.qlora_fp32_upcast applies to a 4-bit base: use adapter=qlora, or drop the setting")
        _check(not (self.vision_lora and self.method == AdapterMethod.full),
               "adapter.vision_lora needs a LoRA method (lora, dora, qlora)")
        _check(len(self.target_modules) > 0 or self.vision_lora or self.method == AdapterMethod.full,
               "adapter.target_modules is empty and vision_lora is off: nothing would be trained")

    @property
    def is_peft(self) -> bool:
        return self.method != AdapterMethod.full


# ----------------------------------------------------------------------------------------------------------------
# optimizer


class LrScheduler(str, Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_min_lr = "cosine_with_min_lr"


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw_torch"  # any transformers `optim` name: adamw_torch_fused, paged_adamw_8bit, ...
    lr: float = 2e-4  # peak learning rate (of the language model; see vision_lr, merger_lr)
    vision_lr: Optional[float] = None  # separate lr for the vision tower (None: lr)
    merger_lr: Optional[float] = None  # separate lr for the merger (None: lr)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's beta1, beta2
    eps: float = 1e-8  # AdamW's epsilon
    scheduler: LrScheduler = LrScheduler.constant  # learning-rate schedule after the warmup
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up
    warmup_steps: Optional[int] = None  # warm up for this many optimizer steps instead (warmup_ratio must be 0)
    max_grad_norm: float = 1.0  # gradient clipping norm (0: no clipping)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.lr must be > 0")
        for name in ("vision_lr", "merger_lr"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"optimizer.{name} must be >= 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "optimizer.betas must be two values in [0, 1)")
        _check(0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio must be in [0, 1)")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
        _check(self.warmup_steps is None or self.warmup_ratio == 0,
               "optimizer.warmup_steps and optimizer.warmup_ratio are alternatives: set one (warmup_ratio=0)")
        _check(self.max_grad_norm >= 0, "optimizer.max_grad_norm must be >= 0")
