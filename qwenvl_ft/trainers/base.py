"""What the run skeleton and `eval` ask of a training method's implementation, and what every method shares.

A method's implementation is one module of this package holding a `Training` subclass and an instance of it named
`TRAINING`, which the method's declaration names (`Method.training`: "qwenvl_ft.trainers.dpo:TRAINING"), so that
`training_of(method)` finds it. The skeleton that calls it is `qwenvl_ft/commands/train.py`; `eval` uses
`generation_rows` and `evaluate_models`. A default here is what most methods want; a method overrides only what
differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.evaluation.held_out import held_out_generation, score_later
from qwenvl_ft.methods.base import Method, load
from qwenvl_ft.training.arguments import training_arguments
from qwenvl_ft.training.trainer import trainer_mixins, training_callbacks


@dataclass
class TrainerParts:
    """What the run skeleton prepares for a method, in the order it does: data and arguments first, then the model
    (the arguments exist before the model loads, which DeepSpeed ZeRO-3 needs to load it partitioned)."""

    cfg: Any  # the validated TrainConfig
    processor: Any
    collator: Any  # the method's collator
    train_rows: Any  # datasets.Dataset of canonical rows (the method's `to_dataset`)
    eval_rows: Any  # the same for the held-out rows, or None
    model_config: Any  # the transformers config of the model to train (read before the weights)
    arguments: Any  # a dict of the TrainingArguments every method shares, then the method's TRL config object
    callbacks: List[Any] = field(default_factory=list)
    trainer_mixins: Tuple[type, ...] = ()  # mixed into the TRL trainer class (training/trainer.py: trainer_class)
    train_lengths: Optional[List[int]] = None  # tokens per training row, as the data check measured them
    model: Any = None  # the base model (4-bit and prepared when the adapter asks), freezing done for full FT
    peft_config: Any = None  # LoraConfig for LoRA/DoRA/QLoRA, None for full fine-tuning
    state: Dict[str, Any] = field(default_factory=dict)  # what a method keeps between its own steps


class Training:
    """How one training method trains and evaluates. Subclasses override what differs."""

    # -- training ------------------------------------------------------------------------------------------------

    def trainer_arguments(self, parts: TrainerParts, common: Dict[str, Any]):
        """The method's TRL config object (SFTConfig, DPOConfig, ...) from the shared TrainingArguments `common`.
        Called before the model is loaded."""
        raise NotImplementedError

    def build_trainer(self, parts: TrainerParts):
        """The TRL trainer, ready for `train()`."""
        raise NotImplementedError

    def before_training(self, trainer, parts: TrainerParts) -> Dict[str, Any]:
        """Metrics of the held-out rows before the first step (the model is on its training device): the
        generation check when trainer.eval_generation is on."""
        return self._generation_check(trainer, parts, "before")

    def training_metrics(self, trainer, result) -> Dict[str, Any]:
        """The method's figures of the finished training loop (first/last logged loss, ...)."""
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        return {"train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
                "global_step": trainer.state.global_step,
                "first_logged_loss": history[0]["loss"] if history else None,
                "last_logged_loss": history[-1]["loss"] if history else None}

    def after_training(self, trainer, parts: TrainerParts) -> Dict[str, Any]:
        """Metrics of the held-out rows after training (the generation check, as before training)."""
        return self._generation_check(trainer, parts, "after")

    def scored_later(self, parts: TrainerParts) -> Dict[str, Any]:
        """The figures of the check before training that are scored once training has ended (BLEU, ROUGE-L:
        evaluation/held_out.py SCORED_LATER), as `eval_<name>_before`; {} when none are pending. The skeleton calls
        it after training, or when a signal stopped it."""
        return score_later(parts.state.pop("scored_later", {}))

    def _generation_check(self, trainer, parts: TrainerParts, when: str) -> Dict[str, Any]:
        if not parts.cfg.trainer.eval_generation or parts.eval_rows is None:
            return {}
        later = parts.state.setdefault("scored_later", {}) if when == "before" else None
        return held_out_generation(trainer.model, parts.processor, self.generation_rows(list(parts.eval_rows)),
                                   parts.cfg, when, later=later)

    def result_line(self, metrics: Dict[str, Any]) -> str:
        """The one line the run ends with."""
        first, last = metrics.get("first_logged_loss"), metrics.get("last_logged_loss")
        return f"training loss {first:.3f} -> {last:.3f}" if first is not None and last is not None else "done"

    # -- evaluation (`qwenvl-ft eval`) -------------------------------------------------------------------------

    def generation_rows(self, rows: List[dict]) -> List[dict]:
        """Held-out rows as conversations whose last turn is the reference answer: what `eval` generates on."""
        return list(rows)

    def evaluate_models(self, models: Dict[str, Any], rows: List[dict], processor, cfg,
                        predictions: Optional[Dict[str, List[str]]] = None) -> Dict[str, Dict]:
        """Method-specific held-out figures for `eval`, per model side ("base", "tuned"), beyond the generation
        metrics every method gets; {} when there are none. `models` maps each side to its model or None; `rows`
        are the method's own held-out rows; `predictions` the answers `eval` generated for each side, in row
        order (GRPO scores its reward functions on them)."""
        return {}


def training_of(method: Method) -> Training:
    """The implementation of `method` (its declaration's `training` path), loaded by name."""
    return load(method.training)


def shared_parts(cfg: TrainConfig, processor, collator, train_rows, eval_rows, model_config,
                 train_lengths: Optional[List[int]] = None) -> TrainerParts:
    """TrainerParts with what every method shares: the common TrainingArguments, callbacks and trainer mixins."""
    return TrainerParts(cfg=cfg, processor=processor, collator=collator, train_rows=train_rows,
                        eval_rows=eval_rows, model_config=model_config, arguments=training_arguments(cfg),
                        callbacks=training_callbacks(cfg), trainer_mixins=trainer_mixins(cfg),
                        train_lengths=train_lengths)


def standalone_parts(training: Training, cfg: TrainConfig, model, processor, collator, train_rows, eval_rows,
                     peft_config=None) -> TrainerParts:
    """TrainerParts for building a method's trainer outside the run skeleton (tests and benchmarks), holding what
    the skeleton would have prepared."""
    parts = shared_parts(cfg, processor, collator, train_rows, eval_rows, getattr(model, "config", None))
    parts.model, parts.peft_config = model, peft_config
    parts.arguments = training.trainer_arguments(parts, parts.arguments)
    return parts
