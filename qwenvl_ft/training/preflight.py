"""Checks that need more than the schema (installed packages, the accelerator, TRL's real config classes) and run
before anything loads: a run that cannot work stops at once with a config error, not after the data check, the
model load and the before-training generation.

The schema (config/schema.py) stays free of torch and of optional packages so that composing a config and
`--cfg job` stay fast; what depends on the machine is decided here, in `start_run` (training/start.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util

from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.config.trainer import Precision, Tracker
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.methods.base import ARGUMENT_SOURCES, load
from qwenvl_ft.training.speed import check_liger

# tracker -> (module that must be importable, the qwenvl-ft extra that installs it; None: a core dependency)
TRACKER_PACKAGES = {
    Tracker.tensorboard: ("tensorboard", None),
    Tracker.wandb: ("wandb", "wandb"),
    Tracker.swanlab: ("swanlab", "swanlab"),
    Tracker.mlflow: ("mlflow", "mlflow"),
}


def preflight(cfg: TrainConfig) -> None:
    """Every check below; raises ConfigError naming the key and the way out."""
    check_trackers(cfg.trainer.report_to)
    check_optional_packages(cfg)
    check_liger(cfg.model)
    effective_precision(cfg.trainer.precision)
    check_extra_args(cfg)


def active_trackers(report_to) -> list:
    """The trackers to report to ([] for none), as transformers' `report_to` names them."""
    return [Tracker(t).value for t in report_to if Tracker(t) != Tracker.none]


def check_trackers(report_to) -> None:
    for name in active_trackers(report_to):
        module, extra = TRACKER_PACKAGES[Tracker(name)]
        if importlib.util.find_spec(module) is None:
            install = f'pip install "qwenvl-ft[{extra}]"' if extra else f"pip install {module}"
            raise ConfigError(f"trainer.report_to has {name}, which is not installed: {install} "
                              f"(or leave {name} out of trainer.report_to)")


def optional_packages(cfg: TrainConfig, command: str = "train") -> list:
    """(what in the config asks for it, module, qwenvl-ft extra) of each optional package this command needs with
    this config (the trackers: check_trackers)."""
    needed = []
    dist = cfg.dist
    if command == "train" and dist.engine.value == "deepspeed":
        option = f"zero{dist.zero.stage}" + ("_offload" if dist.zero.offload_optimizer.value != "none" else "")
        needed.append((f"dist={option} (dist.engine=deepspeed)", "deepspeed", "deepspeed"))
    if command == "train" and cfg.model.use_liger_kernel:
        needed.append(("model.use_liger_kernel=true", "liger_kernel", "liger"))
    grpo = getattr(cfg.trainer, "grpo", None)
    if command == "train" and cfg.trainer.kind.value == "grpo" and grpo is not None and grpo.vllm.enabled:
        needed.append(("trainer.grpo.vllm.enabled=true", "vllm", "vllm"))
    if command == "chat":
        needed.append(("qwenvl-ft chat", "gradio", "ui"))
    return needed


def check_optional_packages(cfg: TrainConfig, command: str = "train") -> None:
    """ConfigError naming the first optional package this command and config need that is not installed, and the
    extra that installs it; asked of the import system without importing anything (importlib.util.find_spec)."""
    for what, module, extra in optional_packages(cfg, command):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f'{what} needs {PACKAGE_NAMES.get(module, module)}, which is not installed: '
                              f'pip install "qwenvl-ft[{extra}]"')


PACKAGE_NAMES = {"deepspeed": "DeepSpeed", "liger_kernel": "Liger Kernel", "vllm": "vLLM", "gradio": "Gradio"}


def effective_precision(precision: Precision) -> Precision:
    """`auto` resolved for this machine: bf16 where the accelerator supports it, else fp32. An explicit bf16 or
    fp16 the machine cannot run is a ConfigError (transformers would only say so after the model has loaded).
    bf16 support is asked exactly as TrainingArguments asks it."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    precision = Precision(precision)
    bf16 = is_torch_bf16_gpu_available()
    if precision == Precision.auto:
        return Precision.bf16 if bf16 else Precision.fp32
    if precision == Precision.bf16 and not bf16:
        raise ConfigError("trainer.precision=bf16, but this machine has no accelerator that supports bf16 (a CUDA "
                          "GPU of the Ampere generation or newer, or another bf16 device): use trainer.precision=auto "
                          "(bf16 where supported, fp32 here) or trainer.precision=fp32")
    if precision == Precision.fp16 and not torch.accelerator.is_available():
        raise ConfigError("trainer.precision=fp16 needs a GPU (fp16 mixed precision does not run on CPU): use "
                          "trainer.precision=auto or trainer.precision=fp32")
    return precision


def arguments_class(method) -> type:
    """The TRL config dataclass the training method builds (its fields include TrainingArguments')."""
    return load(method.arguments_class)


def check_extra_args(cfg: TrainConfig) -> None:
    """trainer.extra_args: every key a field of the method's TRL config (with a did-you-mean), and none that
    qwenvl-ft sets from a config key of its own (that key is named instead)."""
    from qwenvl_ft import methods

    extra = cfg.trainer.extra_args
    if not extra:
        return
    method = methods.get(cfg.trainer.kind)
    cls = arguments_class(method)
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    sources = {**ARGUMENT_SOURCES, **method.argument_sources}
    for key in extra:
        if key in sources:
            raise ConfigError(f"trainer.extra_args.{key}: qwenvl-ft sets {key} from {sources[key]}; set that "
                              f"instead")
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            suggestion = f" Did you mean '{hint[0]}'? qwenvl-ft sets it from {sources[hint[0]]}" \
                if hint and hint[0] in sources else f" Did you mean 'trainer.extra_args.{hint[0]}'?" if hint else ""
            raise ConfigError(f"trainer.extra_args.{key} is not a field of {cls.__module__.split('.')[0]}."
                              f"{cls.__name__} (trainer={method.name}).{suggestion}")

