"""A run that diverges: a non-finite loss or gradient stops it (trainer.on_nonfinite=stop) with one message, skips
that optimizer step (skip_step) or is let through (ignore); and final/ is never written with non-finite weights.

The check sits between backward and the optimizer step (the Trainer's `on_pre_optimizer_step` event), so that a
stopped run neither applies the step nor saves a checkpoint of it: the newest complete checkpoint stays the last
good one. The loss of each micro-batch comes from `training_step` (a trainer mixin, `WatchLoss`), the gradients
from the model; one `.item()` per optimizer step, over the gradient norm the Trainer's clipping pass already
makes as costly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional

from transformers import TrainerCallback

from qwenvl_ft.config.trainer import OnNonFinite
from qwenvl_ft.errors import TrainingDiverged

log = logging.getLogger("qwenvl_ft")


class WatchLoss:
    """Trainer mixin: hands each micro-batch's loss to the run's DivergenceGuard (no device sync here), and has it
    correct the logged loss of a window with skipped steps (`log`, the Trainer's public logging method)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        guard = self._guard()
        return loss if guard is None else guard.observe(loss)

    def log(self, logs, *args, **kwargs):
        guard = self._guard()
        if guard is not None and "loss" in logs:
            logs = guard.logged(logs, self.state.global_step)
        return super().log(logs, *args, **kwargs)

    def _guard(self):
        if "_divergence_guard" not in self.__dict__:
            self.__dict__["_divergence_guard"] = guard_of(self)
        return self.__dict__["_divergence_guard"]


def guard_of(trainer) -> Optional["DivergenceGuard"]:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DivergenceGuard)]
    return found[0] if found else None


class DivergenceGuard(TrainerCallback):
    """Checks every optimizer step's losses and gradients before the step is applied (see the module docstring)."""

    def __init__(self, mode: OnNonFinite):
        self.mode = mode
        self.losses: List = []  # this step's micro-batch losses (WatchLoss)
        self.last_finite: Optional[tuple] = None  # (step, logged loss)
        self.nonfinite_steps: List[int] = []
        self.last_logged_step = 0

    def observe(self, loss):
        """A micro-batch's loss, kept for the step's check. With skip_step the Trainer's running sum gets a NaN as
        0 (a NaN there would stay in every later logged loss; `logged` leaves the skipped steps out of the mean)."""
        import torch

        self.losses.append(loss.detach())
        if self.mode == OnNonFinite.skip_step:
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        return loss

    def logged(self, logs: dict, step: int) -> dict:
        """The Trainer's logs of the window (last_logged_step, step]: with skip_step, the loss is the mean over the
        steps taken (NaN when every one was skipped)."""
        window, self.last_logged_step = step - self.last_logged_step, step
        skipped = sum(1 for s in self.nonfinite_steps if step - window < s <= step)
        if self.mode != OnNonFinite.skip_step or not skipped or window <= 0:
            return logs
        loss = float("nan") if skipped >= window else logs["loss"] * window / (window - skipped)
        return {**logs, "loss": loss}

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_logged_step = state.global_step  # a resumed run's first window starts at its checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self.last_finite = (state.global_step, float(loss))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        from qwenvl_ft.distributed import ranks

        losses, self.losses = self.losses, []
        bad_loss = _nonfinite(losses)
        # ignore: counted by the loss only, the gradients are not looked at
        bad_grad = self.mode != OnNonFinite.ignore and _nonfinite_gradients(model, optimizer)
        # one collective per step; every rank then takes the same decision (a rank's shard alone may be NaN)
        if not ranks.any_rank(bad_loss or bad_grad, device=args.device):
            return
        bad_loss = ranks.any_rank(bad_loss, device=args.device)
        bad_grad = ranks.any_rank(bad_grad, device=args.device)
        step = state.global_step + 1
        self.nonfinite_steps.append(step)
        what = {(True, False): "the loss is", (False, True): "the gradient norm is"}.get(
            (bad_loss, bad_grad), "the loss and the gradient norm are")
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan")
        if self.mode == OnNonFinite.stop:
            raise TrainingDiverged(self.message(args, state, step, what, lr))
        if self.mode == OnNonFinite.skip_step:
            model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter and its state
            log.warning("step %d skipped (trainer.on_nonfinite=skip_step): %s not finite (learning rate %.3g)",
                        step, what, lr)
        elif len(self.nonfinite_steps) == 1:
            log.warning("step %d: %s not finite; trainer.on_nonfinite=ignore lets it through", step, what)

    def on_train_end(self, args, state, control, **kwargs):
        if self.nonfinite_steps and self.mode != OnNonFinite.stop:
            verb = "skipped" if self.mode == OnNonFinite.skip_step else "let through (ignore)"
            log.warning("%d optimizer step(s) with a non-finite loss or gradient %s: steps %s",
                        len(self.nonfinite_steps), verb, _steps(self.nonfinite_steps))

    def message(self, args, state, step: int, what: str, lr: float) -> str:
        last = (f"the last finite logged loss was {self.last_finite[1]:.4g} (step {self.last_finite[0]})"
                if self.last_finite else "no finite loss was logged before")
        return (f"training diverged at step {step} of {state.max_steps}: {what} not finite (NaN or inf); "
                f"{last}; learning rate {lr:.3g}.\n"
                f"{kept_checkpoint(Path(args.output_dir))}\n"
                f"Lower optimizer.lr (or raise optimizer.warmup_steps / lower optimizer.max_grad_norm), or set "
                f"trainer.on_nonfinite=skip_step to skip such steps.")


def _nonfinite(losses) -> bool:
    import torch

    if not losses:
        return False
    return not bool(torch.isfinite(torch.stack([loss.float().sum() for loss in losses])).all())


def _nonfinite_gradients(model, optimizer=None) -> bool:
    """Whether any gradient of this rank holds NaN or inf (sharded gradients: this rank's shard). The parameters
    looked at are the optimizer's, when there is one: those the step would change (a frozen parameter has no
    gradient), without walking every module of the model each step. Under DeepSpeed the gradients are the
    engine's, not the parameters': only the loss is checked there."""
    import torch

    if model is None:
        return False
    params = model.parameters() if optimizer is None else \
        (p for group in optimizer.param_groups for p in group["params"])
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not grads:
        return False
    return not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)))


def _steps(steps: List[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:10])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > 10 else "")


def kept_checkpoint(output_dir: Path, predates: bool = True) -> str:
    from qwenvl_ft.training.resume import latest_complete

    newest = latest_complete(output_dir) if output_dir.is_dir() else None
    if newest is None:
        return "final/ is not written, and no checkpoint was saved before that step."
    return f"final/ is not written; the newest complete checkpoint, {newest}, is kept" + \
        (" (it predates that step)." if predates else ".")


def check_finite_weights(trainer, output_dir: Path) -> None:
    """Before final/ is written: every trained weight must be finite (a run with trainer.on_nonfinite=ignore, or
    one whose weights overflowed without a non-finite loss). Sharded weights: each rank checks its shard."""
    import torch

    from qwenvl_ft.distributed import ranks

    bad = [name for name, p in trainer.model.named_parameters()
           if p.requires_grad and not bool(torch.isfinite(_local(p)).all())]
    if ranks.any_rank(bool(bad), device=trainer.args.device):
        named = f" ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})" if bad else ""
        guard = guard_of(trainer)
        first = (f" The first non-finite loss or gradient was at step {guard.nonfinite_steps[0]}: checkpoints "
                 f"saved since hold such weights too." if guard is not None and guard.nonfinite_steps else "")
        kept = kept_checkpoint(output_dir, predates=False)
        raise TrainingDiverged(f"the trained weights hold NaN or inf values{named} after step "
                               f"{trainer.state.global_step}.\n{kept}{first}\nLower optimizer.lr, and keep "
                               f"trainer.on_nonfinite=stop to stop at the first such step.")


def _local(param):
    """This rank's values of a parameter: a DTensor's local shard (FSDP2), a ZeRO-3 partition, else itself."""
    param = getattr(param, "ds_tensor", param)
    return param.to_local() if hasattr(param, "to_local") else param


def nonfinite_metrics(trainer) -> dict:
    """The run's count of optimizer steps with a non-finite loss or gradient (skipped or let through)."""
    guard = guard_of(trainer)
    return {"nonfinite_steps": len(guard.nonfinite_steps)} if guard is not None and guard.nonfinite_steps else {}


def nonfinite_note(metrics: dict) -> str:
    """What the result line adds when steps had a non-finite loss or gradient."""
    count = metrics.get("nonfinite_steps")
    return f"; {count} optimizer step(s) with a non-finite loss or gradient (trainer.on_nonfinite)" if count else ""
