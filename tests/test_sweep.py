"""Tier 2: a Hydra multirun sweep runs every job in its own folder and summarises them; a failure is contained."""

import json

import pytest

from qwenvl_ft.commands.cli import main

pytestmark = pytest.mark.slow

QUICK = ["recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=2", "trainer.max_steps=2",
         "trainer.eval_generation=false", "trainer.disable_tqdm=true"]


def _cli(args, cwd, monkeypatch) -> int:
    """`qwenvl-ft train -m ...` through the CLI's main, in this process: Hydra's basic launcher runs the jobs in the
    process that starts the sweep either way, so a fresh interpreter would only add its imports (the sweeps of the
    `cluster` extra, submitit's local launcher, which starts a process per job, and Optuna's sweeper, are in
    tests/test_distributed_runs.py)."""
    monkeypatch.chdir(cwd)
    return main(["train", *args])


def test_two_job_sweep_produces_two_runs_and_a_summary(tmp_path, monkeypatch):
    assert _cli(["-m", *QUICK, "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}"], tmp_path, monkeypatch) == 0
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["overrides"][-1] for r in rows] == ["optimizer.lr=0.001", "optimizer.lr=0.003"]
    for job in ("0", "1"):
        assert (tmp_path / job / "final" / "model.safetensors").exists()
        assert (tmp_path / job / "config.yaml").exists()
    table = (tmp_path / "sweep_summary.txt").read_text()
    assert "optimizer.lr=0.003" in table and "train_loss" in table


def test_a_failing_job_does_not_stop_the_others(tmp_path, monkeypatch):
    status = _cli(["-m", *QUICK, "optimizer.name=no_such_optimizer,adamw_torch", f"hydra.sweep.dir={tmp_path}"],
                  tmp_path, monkeypatch)
    assert status == 1  # the sweep reports the failure in its exit status
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert "no_such_optimizer" in rows[0]["error"]
    assert (tmp_path / "1" / "final").is_dir()
