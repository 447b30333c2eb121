"""Tier 2: a Hydra multirun sweep runs every job in its own folder and summarises them; a failure is contained."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

QUICK = ["recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=2", "trainer.max_steps=2",
         "trainer.eval_generation=false", "trainer.disable_tqdm=true"]


def _cli(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "qwenvl_ft.commands.cli", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_job_sweep_produces_two_runs_and_a_summary(tmp_path):
    out = _cli(["-m", *QUICK, "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["overrides"][-1] for r in rows] == ["optimizer.lr=0.001", "optimizer.lr=0.003"]
    for job in ("0", "1"):
        assert (tmp_path / job / "final" / "model.safetensors").exists()
        assert (tmp_path / job / "config.yaml").exists()
    table = (tmp_path / "sweep_summary.txt").read_text()
    assert "optimizer.lr=0.003" in table and "train_loss" in table


def test_a_failing_job_does_not_stop_the_others(tmp_path):
    out = _cli(["-m", *QUICK, "optimizer.name=no_such_optimizer,adamw_torch", f"hydra.sweep.dir={tmp_path}"],
               cwd=tmp_path)
    assert out.returncode == 1  # the sweep reports the failure in its exit status
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert "no_such_optimizer" in rows[0]["error"]
    assert (tmp_path / "1" / "final").is_dir()
