"""Direct preference optimisation on image preference pairs, with TRL's DPOTrainer: the declaration.

Its settings are `trainer.dpo`; its rows are qwenvl_ft/data/kinds.py's PAIR_ROWS, its training
qwenvl_ft/trainers/dpo.py (the reference policy, the shared image encoding, the held-out rewards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from qwenvl_ft.errors import check
from qwenvl_ft.methods.base import Method


class DpoLossType(str, Enum):
    """TRL 1.16 DPOTrainer losses (see trl.DPOConfig.loss_type)."""

    sigmoid = "sigmoid"  # the original DPO loss
    hinge = "hinge"  # SLiC
    ipo = "ipo"  # IPO; beta is its regularisation tau
    exo_pair = "exo_pair"  # EXO; needs label_smoothing > 0 (paper: 1e-3)
    nca_pair = "nca_pair"
    robust = "robust"  # robust DPO; label_smoothing = probability a label is flipped, in [0, 0.5)
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"  # chosen answers better than the model's own
    apo_down = "apo_down"  # chosen answers worse than the model's own
    discopop = "discopop"
    sft = "sft"  # negative log-likelihood of the chosen answer (combine with sigmoid for RPO/MPO-style mixes)
    sigmoid_norm = "sigmoid_norm"  # sigmoid on length-normalised log-ratios


@dataclass
class DpoConfig:
    """`trainer.dpo.*`, handed to TRL's DPOConfig.

    Sequence length is data.max_length (prompt + answer, never cut inside an image); TRL 1.16 has no separate
    prompt/completion limits.
    """

    beta: float = 0.1  # strength of the pull towards the reference: higher stays closer
    loss_type: List[DpoLossType] = field(default_factory=lambda: [DpoLossType.sigmoid])  # several are summed
    loss_weights: Optional[List[float]] = None  # one per loss_type (None: all 1.0)
    label_smoothing: float = 0.0  # robust / exo_pair only
    # Compute the reference log-probabilities of every pair once before training (one pass over the data) instead
    # of a reference forward per step: about a quarter less compute per step, and full fine-tuning frees the
    # reference copy before the first step. Held-out rows are precomputed too.
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: Optional[int] = None  # batch size of that pass (None: trainer.batch_size)

    def __post_init__(self) -> None:
        check(self.beta > 0, "trainer.dpo.beta must be > 0")
        check(len(self.loss_type) > 0, "trainer.dpo.loss_type must name at least one loss")
        check(len(set(self.loss_type)) == len(self.loss_type), "trainer.dpo.loss_type lists a loss twice")
        check(self.loss_weights is None or len(self.loss_weights) == len(self.loss_type),
              f"trainer.dpo.loss_weights needs one weight per loss_type ({len(self.loss_type)})")
        check(0.0 <= self.label_smoothing < 0.5, "trainer.dpo.label_smoothing must be in [0, 0.5)")
        check(DpoLossType.exo_pair not in self.loss_type or self.label_smoothing > 0,
              "trainer.dpo.loss_type=exo_pair needs trainer.dpo.label_smoothing > 0 (the EXO paper uses 1e-3)")
        check(self.precompute_ref_batch_size is None or self.precompute_ref_batch_size > 0,
              "trainer.dpo.precompute_ref_batch_size must be > 0")


FORMATS = {
    "llava_preference": "`image`, `prompt` (text, optional <image>), `chosen`, `rejected` (text)",
    "messages_preference": "HF / TRL: `images` + `prompt` / `chosen` / `rejected` messages",
    "shapes_preference": "generated: the right description of a shape image vs a wrong one",
}


class Dpo(Method):
    name = "dpo"
    summary = "direct preference optimisation on chosen/rejected pairs (TRL DPOTrainer)"
    demo_recipe = "dpo_demo"
    settings = DpoConfig
    data_formats = FORMATS
    generated_formats = ("shapes_preference",)
    row_kind = "preference pairs"
    batch_unit = "pairs"
    eval_needs_base = True  # implicit rewards compare the tuned model with the base
    arguments_class = "trl:DPOConfig"
    argument_sources = {
        "remove_unused_columns": "qwenvl-ft (its collator needs the raw rows)",
        "max_length": "data.max_length (the collator truncates, never inside an image)",
        "beta": "trainer.dpo.beta", "loss_type": "trainer.dpo.loss_type", "loss_weights": "trainer.dpo.loss_weights",
        "label_smoothing": "trainer.dpo.label_smoothing",
        "precompute_ref_log_probs": "trainer.dpo.precompute_ref_log_probs",
        "precompute_ref_batch_size": "trainer.dpo.precompute_ref_batch_size", "padding_free": "data.packing",
    }
    rows = "qwenvl_ft.data.kinds:PAIR_ROWS"
    training = "qwenvl_ft.trainers.dpo:TRAINING"

    # -- estimate ------------------------------------------------------------------------------------------------

    def sequences_per_row(self) -> int:
        return 2

    def memory_rows(self, cfg, counts, weight_bytes: int) -> List[tuple]:
        if cfg.adapter.is_peft or cfg.trainer.dpo.precompute_ref_log_probs:
            return []
        return [("reference model", counts.total * weight_bytes,
                 f"DPO full fine-tuning: a frozen copy, {counts.total / 1e9:.2f}B params x {weight_bytes} B")]

    def reference_forwards(self, cfg) -> int:
        return 0 if cfg.trainer.dpo.precompute_ref_log_probs else 1


METHOD = Dpo()
