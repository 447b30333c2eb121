"""What a training method declares, and what the run skeleton and the other commands ask of it.

A method (SFT, DPO, GRPO, ...) is one module in this package holding one `Method` subclass and an instance of it
named `METHOD`. Its class attributes are the declaration: the settings dataclass that becomes `trainer.<name>`, the
data formats it reads, whether it runs distributed. They are read when the config schema is built, so a method
module imports only the standard library and `qwenvl_ft.errors` at its top; everything heavy (torch, TRL, the
data and model layers) is imported inside its functions, which only the commands call.

The skeleton that calls these is `qwenvl_ft/training/run.py`; `data-check` (data/check.py), `eval`
(commands/eval.py) and `estimate` use the data, evaluation and memory parts. A default here is what most
methods want; a method overrides only what differs (LLaMA-Factory's mm_plugin idea, applied to methods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple


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
    trainer_mixins: Tuple[type, ...] = ()  # mixed into the TRL trainer class (training/common.py: trainer_class)
    train_lengths: Optional[List[int]] = None  # tokens per training row, as the data check measured them
    model: Any = None  # the base model (4-bit and prepared when the adapter asks), freezing done for full FT
    peft_config: Any = None  # LoraConfig for LoRA/DoRA/QLoRA, None for full fine-tuning
    state: Dict[str, Any] = field(default_factory=dict)  # what a method keeps between its own steps


class Method:
    """One training method. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for `qwenvl-ft --help` and errors
    demo_recipe: ClassVar[str]  # the recipe that shows the method on CPU (tests run every command on it)
    settings: ClassVar[Optional[type]] = None  # dataclass of `trainer.<name>` (None: the method has no settings)
    # data.format values this method reads -> one line each; a format is owned by exactly one method
    data_formats: ClassVar[Mapping[str, str]] = {}
    generated_formats: ClassVar[Tuple[str, ...]] = ()  # formats made in-process (no data.path)
    row_kind: ClassVar[str] = "rows"  # what a row is, in messages ("conversations", "preference pairs", ...)
    batch_unit: ClassVar[str] = "rows"  # what trainer.batch_size counts ("rows", "pairs", "prompts")
    distributed: ClassVar[bool] = True  # runs under the dist engines (DDP, FSDP, DeepSpeed)
    # data.max_tokens_per_batch / data.group_by_length: padded batches planned by length (data/batching.py)
    length_batching: ClassVar[bool] = False
    eval_needs_base: ClassVar[bool] = False  # `eval` keeps the base in memory next to a full tuned model
    # data.train_on_prompt (a token loss on the prompt too) applies: the method trains on a token loss
    trains_on_prompt: ClassVar[bool] = False
    # "module:Class" of the TRL config `trainer_arguments` builds; trainer.extra_args are checked against its fields
    arguments_class: ClassVar[str] = "transformers:TrainingArguments"
    # fields of that config the method sets itself -> the config key (or reason) they come from; trainer.extra_args
    # may not set them (the shared TrainingArguments' own are training/common.py's ARGUMENT_SOURCES)
    argument_sources: ClassVar[Mapping[str, str]] = {}

    # -- config ------------------------------------------------------------------------------------------------

    def check_config(self, cfg) -> None:
        """Cross-field rules of this method over the whole TrainConfig (raise ConfigError)."""
        from qwenvl_ft import methods
        from qwenvl_ft.errors import check

        planners = "/".join(f"trainer={m.name}" for m in methods.registry().values() if m.length_batching)
        check(self.length_batching or (cfg.data.max_tokens_per_batch is None and not cfg.data.group_by_length),
              f"data.max_tokens_per_batch and data.group_by_length plan padded batches by length, for {planners}; "
              f"{self.name.upper()} batches are trainer.batch_size {self.batch_unit}")
        token_loss = "/".join(f"trainer={m.name}" for m in methods.registry().values() if m.trains_on_prompt)
        check(self.trains_on_prompt or not cfg.data.train_on_prompt,
              f"data.train_on_prompt puts a token loss on the prompt too, for {token_loss}; trainer={self.name} "
              f"does not train on a token loss of the sequence ({self.summary})")

    # -- data ----------------------------------------------------------------------------------------------------

    def read_rows(self, data_cfg, problems: Optional[list] = None) -> Tuple[List[dict], List[dict]]:
        """(train rows, held-out rows) in this method's canonical form, data.max_samples applied. Bad rows raise
        DataError, or go to `problems` when a list is given."""
        raise NotImplementedError

    def measurer(self, processor, data_cfg) -> Callable[[dict], Any]:
        """row -> SampleStats (data/collate.py): everything the collator would check and count, without pixel
        values. Raises DataError for an invalid row and RowDropped for one data.overlength leaves out."""
        raise NotImplementedError

    def to_dataset(self, rows: List[dict]):
        """A datasets.Dataset of canonical rows, as the method's TRL trainer takes it."""
        raise NotImplementedError

    def collator(self, processor, data_cfg):
        raise NotImplementedError

    # -- the prepared store (data/prepare.py: rows read once, checked, measured and cached for every method) ----

    def store_kind(self):
        """How this method's canonical rows are written to the memory-mapped Arrow store (a data/store.py
        RowKind: the columns and how a row becomes a record of them)."""
        raise NotImplementedError

    def converters(self) -> Mapping:
        """data.format -> converter of one file record into a canonical row (data/sources.py `Converter`), for
        this method's formats that are read from files."""
        raise NotImplementedError

    def generate(self, data_cfg) -> Tuple[List[dict], List[dict]]:
        """(train rows, held-out rows) of this method's generated format (`generated_formats`)."""
        raise NotImplementedError

    def from_store(self, dataset):
        """A stored split (memory-mapped, with each row's measured `length`) as the dataset this method's trainer
        takes: the store itself unless the method needs otherwise."""
        return dataset

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

    def _generation_check(self, trainer, parts: TrainerParts, when: str) -> Dict[str, Any]:
        if not parts.cfg.trainer.eval_generation or parts.eval_rows is None:
            return {}
        from qwenvl_ft.training.common import held_out_generation

        return held_out_generation(trainer.model, parts.processor, self.generation_rows(list(parts.eval_rows)),
                                   parts.cfg, when)

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

    # -- estimate ----------------------------------------------------------------------------------------------

    def batch_data(self, cfg):
        """The data settings `estimate` sizes a training batch by (data.max_length tokens per row); GRPO's rows
        are a prompt plus a generated completion."""
        return cfg.data

    def sequences_per_row(self) -> int:
        """Sequences the language model runs per dataset row (DPO: 2, chosen and rejected)."""
        return 1

    def memory_rows(self, cfg, counts, weight_bytes: int) -> List[tuple]:
        """(component, bytes, how) rows the method adds to `estimate` (e.g. a reference model)."""
        return []

    def reference_forwards(self, cfg) -> int:
        """Forward passes of a frozen reference model per training batch, beyond the policy's forward and backward:
        model FLOPs for the MFU every run logs (estimate.training_flops)."""
        return 0
