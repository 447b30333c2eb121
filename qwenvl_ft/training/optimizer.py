"""Separate learning rates for the vision tower and the merger (optimizer.vision_lr / merger_lr), built inside the
Trainer.

A ready-made optimizer handed to the Trainer (`optimizers=`) holds the parameters as they were before the engine
touched them: FSDP replaces them by sharded ones (the Trainer refuses `optimizers=` under FSDP for that reason) and
DeepSpeed wants to build the optimizer itself. `Trainer.create_optimizer` is where every engine asks for one, after
sharding, so the parameter groups are built there.
"""

from __future__ import annotations

from typing import Optional

from qwenvl_ft.config.schema import OptimizerConfig


class ModuleLearningRates:
    """Trainer mixin (listed before the Trainer class): parameter groups with the vision tower's and the merger's
    own learning rates (modeling/build.py `optimizer_param_groups`), in the optimizer the Trainer's arguments name."""

    module_learning_rates: Optional[OptimizerConfig] = None

    def create_optimizer(self, model=None):
        optim_cfg = self.module_learning_rates
        wanted = optim_cfg is not None and (optim_cfg.vision_lr is not None or optim_cfg.merger_lr is not None)
        if self.optimizer is None and wanted:
            from qwenvl_ft.modeling.build import optimizer_param_groups

            opt_model = self.model if model is None else model
            groups = optimizer_param_groups(opt_model, optim_cfg, self.get_decay_parameter_names(opt_model))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)


def with_module_learning_rates(trainer_cls: type, optim_cfg: OptimizerConfig) -> type:
    """`trainer_cls` whose optimizer has the configured per-module learning rates (unchanged when none is set)."""
    if optim_cfg.vision_lr is None and optim_cfg.merger_lr is None:
        return trainer_cls
    return type(trainer_cls.__name__, (ModuleLearningRates, trainer_cls), {"module_learning_rates": optim_cfg})
