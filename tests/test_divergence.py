"""A run that diverges (qwenvl_ft/training/divergence.py): trainer.on_nonfinite stops it with one message and a
non-zero status, skips the step, or lets it through; final/ is never written with non-finite weights."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError, TrainingDiverged

# 48 rows in batches of 8; lr 1e6 (after a first warm-up step at 0) turns every weight huge at step 2 and the
# loss NaN at step 3. A checkpoint every step: the newest one before the divergence must be kept.
DIVERGING = ["recipe=demo", "data.shapes.num_train=48", "data.shapes.num_eval=4", "trainer.max_steps=8",
             "trainer.save_steps=1", "trainer.logging_steps=1", "trainer.eval_generation=false",
             "trainer.report_to=[none]", "trainer.disable_tqdm=true", "optimizer.lr=1e6"]


def _finite_weights(folder: Path) -> bool:
    from safetensors.torch import load_file

    import torch

    tensors = load_file(str(folder / "model.safetensors"))
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_diverging_run_stops_with_one_message_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["train", *DIVERGING, f"hydra.run.dir={run}"])
    out, err = capsys.readouterr()
    assert status == TrainingDiverged.exit_status != 0
    assert "Traceback" not in out + err
    assert "training diverged at step 3 of 8: the loss and the gradient norm are not finite" in err
    assert "the last finite logged loss was" in err and "(step 2); learning rate 9.5e+05" in err
    assert f"the newest complete checkpoint, {run / 'checkpoint-2'}, is kept" in err
    assert "trainer.on_nonfinite=skip_step" in err
    assert not (run / "final").exists() and not (run / ".final.partial").exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert _finite_weights(run / "checkpoint-2")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "training diverged at step 3" in summary["error"]


def test_ignore_lets_the_steps_through_but_never_writes_a_final_of_nan_weights(tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["train", *DIVERGING, "trainer.on_nonfinite=ignore", "trainer.save_steps=100",
                   f"hydra.run.dir={run}"])
    out, err = capsys.readouterr()
    assert status == TrainingDiverged.exit_status
    assert "Traceback" not in out + err
    assert "the trained weights hold NaN or inf values" in err and "after step 8" in err
    assert "The first non-finite loss or gradient was at step 3" in err
    assert not (run / "final").exists()


# ----------------------------------------------------------------------------------------------------------------
# the guard, step by step


def _guard_and_model(mode: str):
    import torch

    from qwenvl_ft.config.trainer import OnNonFinite
    from qwenvl_ft.training.divergence import DivergenceGuard

    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    return DivergenceGuard(OnNonFinite(mode)), model


def _step(guard, model, losses, step=4, output_dir="/nonexistent"):
    import torch
    from transformers import TrainerControl, TrainerState

    state = TrainerState(global_step=step, max_steps=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    guard.losses = [torch.tensor(v) for v in losses]
    return guard.on_pre_optimizer_step(SimpleNamespace(device="cpu", output_dir=output_dir), state,
                                       TrainerControl(), model=model, optimizer=optimizer)


def test_skip_step_drops_that_steps_gradients_and_counts_it():
    guard, model = _guard_and_model("skip_step")
    _step(guard, model, [1.0, 2.0])
    assert guard.nonfinite_steps == [] and model.weight.grad is not None
    _step(guard, model, [1.0, float("nan")], step=6)
    assert guard.nonfinite_steps == [7]
    assert all(p.grad is None for p in model.parameters())  # the optimizer's step leaves them as they are


def test_stop_names_the_step_the_last_finite_loss_and_the_learning_rate():
    import torch

    guard, model = _guard_and_model("stop")
    guard.on_log(None, SimpleNamespace(global_step=4), None, logs={"loss": 2.5})
    guard.on_log(None, SimpleNamespace(global_step=5), None, logs={"loss": float("nan")})
    model.weight.grad[0, 0] = float("inf")  # a finite loss, an infinite gradient
    with pytest.raises(TrainingDiverged) as err:
        _step(guard, model, [1.0], step=5)
    message = str(err.value)
    assert message.startswith("training diverged at step 6 of 10: the gradient norm is not finite")
    assert "last finite logged loss was 2.5 (step 4); learning rate 0.5" in message
    assert "no checkpoint was saved before that step" in message
    assert torch.isinf(model.weight.grad).any()  # nothing applied or dropped: the run stops here


def test_on_nonfinite_is_checked_at_compose_time():
    assert validate(compose(["recipe=demo"], output_dir="/tmp/o")).trainer.on_nonfinite.value == "stop"
    choices = r"(?s)skip.*expected one of \[stop, skip_step, ignore\].*trainer.on_nonfinite"
    with pytest.raises(ConfigError, match=choices):
        compose(["recipe=demo", "trainer.on_nonfinite=skip"], output_dir="/tmp/o")
    with pytest.raises(ConfigError, match=r"skip_step cannot be combined with trainer.precision=fp16"):
        compose(["recipe=demo", "trainer.on_nonfinite=skip_step", "trainer.precision=fp16"], output_dir="/tmp/o")


def test_a_nan_loss_is_logged_and_carded_as_nan_not_zero():
    from qwenvl_ft.publish.card import _loss_section
    from qwenvl_ft.training.divergence import nonfinite_note

    section = _loss_section([{"step": 1, "loss": 6.9}, {"step": 2, "loss": 6.5}, {"step": 3, "loss": float("nan")}])
    assert "6.9 at step 1 -> 6.5 at step 2" in section and "1 non-finite left out" in section
    assert nonfinite_note({"nonfinite_steps": 2}).startswith("; 2 optimizer step(s) with a non-finite loss")
    # transformers' filter would log the window's earlier mean in its place: 0.000 for the window's first step
    from qwenvl_ft.training.arguments import logging_arguments

    cfg = validate(compose(["recipe=demo", "trainer.report_to=[none]"], output_dir="/tmp/o"))
    assert logging_arguments(cfg)["logging_nan_inf_filter"] is False


def test_skip_step_skips_a_nan_step_and_the_run_finishes(tmp_path, monkeypatch, caplog):
    """The loss of step 3 (and with it every gradient) made NaN, as a bad batch would: the step is skipped, the
    weights stay finite, the run finishes and reports it."""
    from safetensors.torch import load_file
    from trl import SFTTrainer

    from qwenvl_ft.commands.train import train

    real = SFTTrainer.compute_loss

    def nan_at_step_three(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = real(self, model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step != 2:
            return result
        return (result[0] * float("nan"), result[1]) if return_outputs else result * float("nan")

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_at_step_three)
    run = tmp_path / "run"
    overrides = [o for o in DIVERGING if not o.startswith(("optimizer.lr=", "trainer.save_steps="))]
    with caplog.at_level("WARNING", logger="qwenvl_ft"):
        metrics = train(compose(overrides + ["trainer.on_nonfinite=skip_step", "trainer.max_steps=5"],
                                output_dir=str(run)))
    assert metrics["nonfinite_steps"] == 1 and metrics["global_step"] == 5
    assert "step 3 skipped (trainer.on_nonfinite=skip_step): the loss and the gradient norm are not finite" \
        in caplog.text
    losses = {e["step"]: e["loss"] for e in json.loads((run / "log_history.json").read_text()) if "loss" in e}
    assert math.isnan(losses[3]) and all(math.isfinite(losses[s]) for s in (1, 2, 4, 5))  # logged as it was
    assert _finite_weights(run / "final")
