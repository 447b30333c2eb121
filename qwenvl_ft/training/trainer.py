"""What every method's TRL trainer gets: the callbacks every run shares, the trainer class (TRL's, with our mixins),
and what is done to a trainer once built."""

from __future__ import annotations

from typing import Any, Sequence

from qwenvl_ft.config.dist import DistEngine
from qwenvl_ft.config.schema import TrainConfig


def training_callbacks(cfg: TrainConfig) -> list:
    """Callbacks every method shares: checkpoint completion markers (for resuming), the run's telemetry (fed by
    the trainer class's TelemetryMixin), the non-finite loss check (trainer.on_nonfinite), the last step's loss
    logged, early stopping, and the vision blocks' own gradient checkpointing setting."""
    from transformers import EarlyStoppingCallback

    from qwenvl_ft.training.divergence import DivergenceGuard
    from qwenvl_ft.training.resume import CheckpointCompleteMarker
    from qwenvl_ft.training.speed import vision_checkpointing_callback
    from qwenvl_ft.training.telemetry import RunTelemetry

    callbacks = [CheckpointCompleteMarker(), RunTelemetry(cfg), DivergenceGuard(cfg.trainer.on_nonfinite),
                 log_last_step_callback()]
    if cfg.dist.engine != DistEngine.none:
        from qwenvl_ft.distributed.modality import vision_in_step_callback

        callbacks.append(vision_in_step_callback(always=cfg.dist.is_sharded))
    if cfg.trainer.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.trainer.early_stopping_patience,
                                               early_stopping_threshold=cfg.trainer.early_stopping_threshold))
    if cfg.model.vision_checkpointing != cfg.model.gradient_checkpointing:
        callbacks.append(vision_checkpointing_callback(cfg.model.vision_checkpointing))
    return callbacks


def log_last_step_callback():
    """The Trainer logs every `logging_steps` steps (and the first), so a run whose length is not a multiple of it
    ended on an older loss: a 5-step run at logging_steps=10 reported its first loss as its last. The last step
    is logged too (the loss averaged over the steps since the previous log, as every logged loss is)."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


# ----------------------------------------------------------------------------------------------------------------
# the trainer class: TRL's, with our mixins. Overriding public Trainer methods in a subclass is the extension point
# transformers documents (`create_optimizer`, `get_train_dataloader`, ...); a mixin per concern keeps each override
# small and lets every method's trainer get the same ones.


class PerModuleLearningRates:
    """optimizer.vision_lr / merger_lr: the Trainer's optimizer with one parameter group per learning rate.

    Built inside `create_optimizer`, i.e. on the model as the Trainer trains it (after PEFT wrapping, FSDP or
    DeepSpeed preparation): an optimizer passed in from outside is refused under FSDP and would hold the wrong
    parameters after wrapping. `optimizer_settings` (the optimizer group) is set on the configured subclass.
    """

    optimizer_settings: Any = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from qwenvl_ft.modeling.build import optimizer_param_groups

            target = self.model if model is None else model
            groups = optimizer_param_groups(target, self.optimizer_settings, self.get_decay_parameter_names(target))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)  # the Trainer's own bookkeeping (it keeps an optimizer it finds)


def trainer_mixins(cfg: TrainConfig) -> tuple:
    """The mixins this run's trainer class gets, configured: the telemetry every run logs (training/telemetry.py),
    the loss watch of trainer.on_nonfinite (training/divergence.py), and what the config asks for."""
    from qwenvl_ft.training.divergence import WatchLoss
    from qwenvl_ft.training.telemetry import TelemetryMixin

    mixins = [TelemetryMixin, WatchLoss]
    if cfg.optimizer.vision_lr is not None or cfg.optimizer.merger_lr is not None:
        mixins.append(type("PerModuleLearningRates", (PerModuleLearningRates,),
                           {"optimizer_settings": cfg.optimizer}))
    return tuple(mixins)


def trainer_class(base: type, mixins: Sequence[type]) -> type:
    """`base` (SFTTrainer, DPOTrainer, ...) with `mixins` in front of it; `base` itself when there are none."""
    if not mixins:
        return base
    return type(base.__name__, (*mixins, base), {"__module__": base.__module__})


def finish_trainer(trainer, cfg: TrainConfig):
    """What every method's trainer gets once built: Liger's modules where qwenvl-ft swaps them
    (model.use_liger_kernel) and varlen attention for packed rows (data.packing) and the images of a batch
    (model.varlen_attention), on the policy and on a reference model when there is one; full-precision modules
    where there is no autocast; the policy's decoder layers compiled (model.compile)."""
    from qwenvl_ft.training.speed import compile_decoder_layers, use_liger, varlen_attention

    models = [trainer.model, getattr(trainer, "ref_model", None)]
    use_liger(models, cfg.model)
    varlen_attention(models, cfg.model, cfg.data.packing)
    if not (trainer.args.bf16 or trainer.args.fp16):
        restore_fully_trained_modules(trainer.model, cfg.model.dtype.value)
    if cfg.model.compile:
        compile_decoder_layers(trainer.model)
    return trainer


def restore_fully_trained_modules(model, dtype: str) -> None:
    """TRL's trainers cast every trainable parameter of a 4-bit model to bf16 (QLoRA's adapters in bf16, for
    autocast). In a run without autocast (fp32, as on a CPU) a module that trains in full, such as a merger after
    a frozen 4-bit vision tower, then gets inputs in the model's dtype with bf16 weights, and LayerNorm refuses
    the mix ("mixed dtype (CPU)"). Such modules go back to the model's dtype; LoRA factors keep TRL's bf16 (PEFT
    casts their inputs)."""
    import torch

    target = getattr(torch, dtype)
    if target == torch.bfloat16:
        return
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype == torch.bfloat16 and "lora_" not in name:
            param.data = param.data.to(target)
