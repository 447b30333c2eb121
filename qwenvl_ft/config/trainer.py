"""The `trainer` group: the training method, the loop's length, batch, precision, logging and checkpoints, and one
sub-config per method that has settings of its own (`trainer.dpo.*`, ...).

Imports only the standard library and the torch-free method registry (`qwenvl_ft.methods`): `--cfg job` must not
pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional, Union

from qwenvl_ft import methods
from qwenvl_ft.errors import check as _check


# One choice per registered training method (qwenvl_ft/methods/: sft, dpo, ...).
TrainerKind = Enum("TrainerKind", [(name, name) for name in methods.names()], type=str)


class Precision(str, Enum):
    auto = "auto"  # bf16 where the accelerator supports it, else fp32 (CPU)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class SaveStrategy(str, Enum):
    steps = "steps"  # a checkpoint every trainer.save_steps optimizer steps
    epoch = "epoch"  # a checkpoint at the end of every epoch


class OnNonFinite(str, Enum):
    """What a non-finite (NaN or inf) loss or gradient norm does to the run (qwenvl_ft/training/divergence.py)."""

    stop = "stop"  # stop with one message (step, last finite loss, learning rate); the last checkpoint is kept
    skip_step = "skip_step"  # skip that optimizer step (counted and reported); the schedule goes on
    ignore = "ignore"  # let it through (logged as nan); final/ is still never written with non-finite weights


class Tracker(str, Enum):
    """Experiment trackers (transformers' own integrations). Each but TensorBoard is an optional extra:
    pip install "qwenvl-ft[wandb]", "qwenvl-ft[swanlab]", "qwenvl-ft[mlflow]"."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    swanlab = "swanlab"
    mlflow = "mlflow"
    none = "none"  # alone: no tracker (same as [])


@dataclass
class TrackerConfig:
    """What the experiment trackers of trainer.report_to call the run (TensorBoard needs none of it)."""

    # W&B and SwanLab project, MLflow experiment (None: the tracker's environment variable WANDB_PROJECT,
    # SWANLAB_PROJECT or MLFLOW_EXPERIMENT_NAME, else "qwenvl-ft")
    project: Optional[str] = None
    run_name: Optional[str] = None  # the run's name in the tracker (None: the run folder's name)
    tags: List[str] = field(default_factory=list)  # W&B and SwanLab tags, MLflow tag keys
    # Held-out rows shown in the prediction gallery (image, prompt, prediction, reference) before training, at
    # each evaluation (trainer.eval_steps) and after training; 0: no gallery.
    gallery_size: int = 8

    def __post_init__(self) -> None:
        _check(self.gallery_size >= 0, "trainer.tracker.gallery_size must be >= 0")
        _check(all(tag.strip() for tag in self.tags), "trainer.tracker.tags has an empty tag")


@dataclass
class TrainerSettings:
    """The training loop: length, batch, precision, logging and checkpoints. `TrainerConfig` below adds one
    sub-config per training method that has settings of its own (`trainer.dpo.*`, ...)."""

    kind: TrainerKind = TrainerKind.sft  # the training method (qwenvl_ft/methods/); trainer=NAME sets it
    epochs: float = 1.0  # passes over the training rows (fractions allowed)
    max_steps: int = -1  # > 0 overrides epochs; -1: not set
    # Per device: a number, or auto: the largest batch whose estimated peak fits the GPU (qwenvl_ft/estimate/autofit.py;
    # docs/speed.md says the rule).
    batch_size: Union[int, str] = 4
    eval_batch_size: int = 8  # per device, for generation and evaluation
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    # Rows per optimizer step over all devices (batch_size x gradient_accumulation_steps x devices), kept whatever
    # batch_size=auto picks: gradient_accumulation_steps is derived from it (null: batch_size x the accumulation).
    effective_batch_size: Optional[int] = None
    precision: Precision = Precision.auto  # mixed-precision autocast (auto: bf16 where supported, else fp32)
    tf32: bool = False  # TF32 matmuls on Ampere and newer GPUs (ignored without CUDA)
    logging_steps: int = 10  # log the training loss every this many optimizer steps
    save_strategy: SaveStrategy = SaveStrategy.steps  # when checkpoints are written: every save_steps, or per epoch
    save_steps: int = 500  # with save_strategy=steps: a checkpoint every this many optimizer steps
    save_total_limit: Optional[int] = 2  # checkpoints kept (the oldest deleted; None: all)
    # Experiment trackers, any of tensorboard, wandb, swanlab, mlflow ([] or [none]: none); trainer.tracker names
    # the run. Each gets the resolved config, the training curves, the held-out metrics and the prediction gallery.
    report_to: List[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    # Any other field of the method's TRL config (SFTConfig, DPOConfig, GRPOConfig; TrainingArguments' included), e.g.
    # {lr_scheduler_kwargs: {min_lr: 1e-6}, torch_compile: true}. Keys are checked against that dataclass.
    extra_args: Dict[str, Any] = field(default_factory=dict)
    # Generate on the held-out rows before and after training and report the metric (needs eval rows).
    eval_generation: bool = True
    max_new_tokens: int = 64  # tokens generated per held-out row
    num_predictions_to_print: int = 4  # held-out predictions shown in the log
    disable_tqdm: bool = False  # no progress bar (logs only)
    # A NaN or inf loss or gradient norm: stop (the last good checkpoint kept), skip_step (that optimizer step is
    # skipped, counted and reported) or ignore. final/ is never written with non-finite weights.
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    # Dense bf16 peak of one GPU in TFLOP/s, the denominator of the MFU every run logs (None: looked up from the
    # GPU's name in qwenvl_ft/training/telemetry.py; a GPU not in that table logs no MFU until this is set).
    peak_tflops: Optional[float] = None
    # Resuming: "auto" continues from the newest complete checkpoint-* in output_dir (a fresh start when there is
    # none), a path names a checkpoint folder, null always starts fresh. A fixed `run_name` makes the same command
    # land in the same output_dir, so running it again after an interruption resumes.
    resume_from: Optional[str] = "auto"
    # Evaluation during training, on the held-out rows: loss every eval_steps optimizer steps (None: never).
    eval_steps: Optional[int] = None
    load_best_model_at_end: bool = False  # final/ gets the best checkpoint by metric_for_best_model
    metric_for_best_model: str = "eval_loss"  # what load_best_model_at_end and early stopping compare
    greater_is_better: Optional[bool] = None  # None: False for metrics ending in "loss", else True
    early_stopping_patience: Optional[int] = None  # stop after this many evaluations without improvement
    early_stopping_threshold: float = 0.0  # an improvement must beat the best by more than this

    def __post_init__(self) -> None:
        # -1 is transformers' "not set": train trainer.epochs. Any other value below 1 is a mistake, not a request.
        _check(self.max_steps == -1 or self.max_steps > 0,
               f"trainer.max_steps={self.max_steps}: must be > 0, or -1 to train trainer.epochs")
        _check(self.epochs > 0 or self.max_steps > 0, "trainer.epochs or trainer.max_steps must be > 0")
        _check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size > 0),
               f"trainer.batch_size must be auto or a number > 0, not {self.batch_size!r}")
        _check(self.eval_batch_size > 0, "trainer.eval_batch_size must be > 0")
        _check(self.effective_batch_size is None or self.effective_batch_size > 0,
               "trainer.effective_batch_size must be > 0 (or null: batch_size x gradient_accumulation_steps)")
        # A fixed batch size: the effective one must be batch_size x gradient_accumulation_steps x some devices (the
        # run checks the devices it has); batch_size=auto derives gradient_accumulation_steps from it instead.
        _check(self.effective_batch_size is None or self.batch_size == "auto"
               or self.effective_batch_size % (self.batch_size * self.gradient_accumulation_steps) == 0,
               f"trainer.effective_batch_size={self.effective_batch_size} is not a multiple of trainer.batch_size x "
               f"gradient_accumulation_steps = {self.batch_size} x {self.gradient_accumulation_steps}: set "
               f"trainer.batch_size=auto to derive gradient_accumulation_steps from it")
        _check(self.gradient_accumulation_steps > 0, "trainer.gradient_accumulation_steps must be > 0")
        _check(self.logging_steps > 0 and self.save_steps > 0, "trainer.logging_steps and save_steps must be > 0")
        _check(self.save_total_limit is None or self.save_total_limit > 0,
               f"trainer.save_total_limit={self.save_total_limit}: must be > 0 (or null: keep every checkpoint)")
        _check(self.max_new_tokens > 0, "trainer.max_new_tokens must be > 0")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "trainer.peak_tflops must be > 0")
        _check(Tracker.none not in self.report_to or len(self.report_to) == 1,
               "trainer.report_to: none cannot be combined with a tracker (use [] or [none] for no tracker)")
        _check(len(set(self.report_to)) == len(self.report_to), "trainer.report_to lists a tracker twice")
        _check(self.resume_from is None or self.resume_from.strip() != "",
               "trainer.resume_from must be auto, a checkpoint folder or null")
        _check(self.eval_steps is None or self.eval_steps > 0, "trainer.eval_steps must be > 0")
        needs_eval = [name for name, on in (("load_best_model_at_end", self.load_best_model_at_end),
                                            ("early_stopping_patience", self.early_stopping_patience is not None))
                      if on]
        _check(not needs_eval or self.eval_steps is not None,
               f"trainer.{needs_eval[0] if needs_eval else ''} needs trainer.eval_steps (evaluation during training)")
        # The Trainer can only load the best checkpoint if every evaluation step is also a save step.
        _check(not self.load_best_model_at_end or self.save_strategy == SaveStrategy.steps,
               "trainer.load_best_model_at_end needs trainer.save_strategy=steps (a checkpoint at every evaluation)")
        _check(not self.load_best_model_at_end or self.eval_steps is None or self.save_steps % self.eval_steps == 0,
               "trainer.load_best_model_at_end needs trainer.save_steps to be a multiple of trainer.eval_steps")
        _check(self.early_stopping_patience is None or self.early_stopping_patience > 0,
               "trainer.early_stopping_patience must be > 0")
        _check(self.early_stopping_threshold >= 0, "trainer.early_stopping_threshold must be >= 0")
        # fp16's loss scaler skips the steps whose gradients overflow itself (and needs their gradients to do so)
        _check(self.on_nonfinite != OnNonFinite.skip_step or self.precision != Precision.fp16,
               "trainer.on_nonfinite=skip_step cannot be combined with trainer.precision=fp16: fp16's loss scaler "
               "skips overflowing steps itself (use on_nonfinite=stop or ignore, or precision=bf16)")


TrainerConfig = make_dataclass(
    "TrainerConfig",
    [(m.name, m.settings, field(default_factory=m.settings)) for m in methods.registry().values() if m.settings],
    bases=(TrainerSettings,),
)
TrainerConfig.__doc__ = TrainerSettings.__doc__
