"""What a training method declares, and the registry of the declared methods.

A method (SFT, DPO, GRPO, ...) is one module in this package holding one `Method` subclass and an instance of it
named `METHOD`. Its class attributes are the declaration: the settings dataclass that becomes `trainer.<name>`, the
data formats it reads, whether it runs distributed, the TrainingArguments it sets itself, the terms `estimate`
sizes its batches by, and where its implementation lives. They are read when the config schema is built, so a
method module imports only the standard library, `qwenvl_ft.errors` and `qwenvl_ft.rewards` at its top (like TRL's
`*_config.py`): nothing here imports torch, TRL or the data and model layers.

The implementation is in two halves, each named by a dotted path and loaded by name where it is used (torchtune's
recipe registry idea): `rows`, the data layer's reading, measuring, storing and collating of the method's rows
(qwenvl_ft/data/kinds.py, `rows_of`), and `training`, its TRL trainer and its hooks around training and `eval`
(qwenvl_ft/trainers/, `training_of`). The run skeleton that calls them is `qwenvl_ft/commands/train.py`. A
default here is what most methods want; a method overrides only what differs (LLaMA-Factory's mm_plugin idea,
applied to methods).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from qwenvl_ft.errors import check

# TrainingArguments that qwenvl-ft sets -> the config key it sets them from (trainer.extra_args may not set them;
# tests/test_config_ux.py keeps this in step with training/arguments.py's `training_arguments`).
ARGUMENT_SOURCES = {
    "output_dir": "output_dir", "num_train_epochs": "trainer.epochs", "max_steps": "trainer.max_steps",
    "per_device_train_batch_size": "trainer.batch_size", "per_device_eval_batch_size": "trainer.eval_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps", "learning_rate": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay", "adam_beta1": "optimizer.betas", "adam_beta2": "optimizer.betas",
    "adam_epsilon": "optimizer.eps", "optim": "optimizer.name", "lr_scheduler_type": "optimizer.scheduler",
    "warmup_steps": "optimizer.warmup_steps or optimizer.warmup_ratio", "max_grad_norm": "optimizer.max_grad_norm",
    "bf16": "trainer.precision", "fp16": "trainer.precision", "tf32": "trainer.tf32",
    "activation_checkpointing": "model.gradient_checkpointing",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "activation_checkpointing_kwargs": "model.gradient_checkpointing (always non-reentrant)",
    "gradient_checkpointing_kwargs": "model.gradient_checkpointing (always non-reentrant)",
    "logging_steps": "trainer.logging_steps", "logging_first_step": "trainer.logging_steps (always true)",
    "save_strategy": "trainer.save_strategy", "save_steps": "trainer.save_steps",
    "save_total_limit": "trainer.save_total_limit", "report_to": "trainer.report_to",
    "run_name": "trainer.tracker.run_name", "disable_tqdm": "trainer.disable_tqdm", "seed": "seed",
    "data_seed": "data.seed", "dataloader_num_workers": "data.num_workers",
    "dataloader_persistent_workers": "data.num_workers (persistent with workers)",
    "dataloader_prefetch_factor": "data.num_workers and trainer.gradient_accumulation_steps (a step ready)",
    "dataloader_pin_memory": "the device (pinned only with CUDA)", "eval_strategy": "trainer.eval_steps",
    "eval_steps": "trainer.eval_steps", "prediction_loss_only": "trainer.eval_steps (loss only)",
    "load_best_model_at_end": "trainer.load_best_model_at_end",
    "metric_for_best_model": "trainer.metric_for_best_model", "greater_is_better": "trainer.greater_is_better",
    "use_liger_kernel": "model.use_liger_kernel (off where qwenvl-ft swaps Liger's modules in itself)",
    # TRL's SFT/DPO/GRPO take a mixture-of-experts model's coefficient from its config, where
    # modeling/build.py's train_the_router_balance puts it
    "router_aux_loss_coef": "model.router_aux_loss_coef",
    "logging_nan_inf_filter": "trainer.on_nonfinite (a non-finite loss is logged as it is)",
}


@dataclass(frozen=True)
class GenerationBatch:
    """What a method samples before its loss forward (GRPO's completions), as `estimate` sizes it: `completions`
    sequences per device, each `prompt_tokens` + `new_tokens` long, and whether the training process holds their
    KV cache (not when vLLM samples them)."""

    completions: int
    prompt_tokens: int
    new_tokens: int
    kv_cache: bool


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
    # "module:Class" of the TRL config its training builds; trainer.extra_args are checked against its fields
    arguments_class: ClassVar[str] = "transformers:TrainingArguments"
    # fields of that config the method sets itself -> the config key (or reason) they come from; trainer.extra_args
    # may not set them (the shared TrainingArguments' own are this module's ARGUMENT_SOURCES)
    argument_sources: ClassVar[Mapping[str, str]] = {}
    # "module:NAME" of its rows in the data layer (a qwenvl_ft/data/kinds.py `MethodRows`; `rows_of` loads it)
    rows: ClassVar[str]
    # "module:NAME" of its implementation (a qwenvl_ft/trainers/ `Training`; `training_of` loads it)
    training: ClassVar[str]

    # -- config ------------------------------------------------------------------------------------------------

    def check_config(self, cfg) -> None:
        """Cross-field rules of this method over the whole TrainConfig (raise ConfigError)."""
        planners = "/".join(f"trainer={m.name}" for m in registry().values() if m.length_batching)
        check(self.length_batching or (cfg.data.max_tokens_per_batch is None and not cfg.data.group_by_length),
              f"data.max_tokens_per_batch and data.group_by_length plan padded batches by length, for {planners}; "
              f"{self.name.upper()} batches are trainer.batch_size {self.batch_unit}")
        token_loss = "/".join(f"trainer={m.name}" for m in registry().values() if m.trains_on_prompt)
        check(self.trains_on_prompt or not cfg.data.train_on_prompt,
              f"data.train_on_prompt puts a token loss on the prompt too, for {token_loss}; trainer={self.name} "
              f"does not train on a token loss of the sequence ({self.summary})")

    # -- estimate: arithmetic on the config ----------------------------------------------------------------------

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

    def generation_batch(self, cfg) -> Optional[GenerationBatch]:
        """What the method samples before each loss forward, for `estimate` (None: it trains on given sequences)."""
        return None

    def reference_forwards(self, cfg) -> int:
        """Forward passes of a frozen reference model per training batch, beyond the policy's forward and backward:
        model FLOPs for the MFU every run logs (estimate.training_flops)."""
        return 0


def load(path: str) -> Any:
    """What `path` ("package.module:NAME") names, imported on first use: a method's `rows`, `training` or
    `arguments_class`, loaded by name by the layer that uses it."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ----------------------------------------------------------------------------------------------------------------
# the registry: every module of this package that defines METHOD


_NOT_METHODS = {"base"}


@lru_cache(maxsize=None)
def registry() -> Dict[str, Method]:
    """Method name -> method, SFT first (the default), the others by name."""
    found: Dict[str, Method] = {}
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in _NOT_METHODS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, Method):
            raise TypeError(f"{module.__name__} must define METHOD, an instance of qwenvl_ft.methods.base.Method")
        if method.name in found:
            raise TypeError(f"two training methods are named {method.name!r}")
        found[method.name] = method
    return dict(sorted(found.items(), key=lambda item: (item[0] != "sft", item[0])))


def names() -> List[str]:
    return list(registry())


def get(name) -> Method:
    """The method called `name` (a str or a TrainerKind member)."""
    key = getattr(name, "value", name)
    try:
        return registry()[key]
    except KeyError:
        raise KeyError(f"unknown training method {key!r}; registered: {', '.join(registry())}") from None


def format_owner(data_format) -> Method:
    """The method that reads `data_format` (a str or a DataFormat member)."""
    key = getattr(data_format, "value", data_format)
    for method in registry().values():
        if key in method.data_formats:
            return method
    raise KeyError(f"no training method reads data.format={key}")
