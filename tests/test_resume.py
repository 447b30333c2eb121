"""Kill-safe resume: only complete checkpoints are resumed from, a SIGKILLed run continues where it stopped when the
same command runs again, and SIGTERM saves a checkpoint and exits cleanly.

Tier 1 builds checkpoint folders by hand; tier 2 (@slow) runs `qwenvl-ft train` in a subprocess and kills it, then
runs the same command again through the CLI's main in this process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.training.resume import (COMPLETE_MARKER, config_changes, is_complete, latest_complete,
                                       resolve_resume)


def _checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    # a whole safetensors file of one 2-float tensor (resuming checks the weights' headers: config/run_files.py)
    (folder / "model.safetensors").write_bytes(_SAFETENSORS)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / COMPLETE_MARKER).write_text("{}")
    else:  # what a kill in the middle of a save leaves: no trainer_state.json yet, no marker
        (folder / "optimizer.pt").write_bytes(b"trunc")
    return folder


_HEADER = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
_SAFETENSORS = len(_HEADER).to_bytes(8, "little") + _HEADER + bytes(8)


def _trainer_cfg(resume_from="auto"):
    return validate(compose(["recipe=demo", f"trainer.resume_from={resume_from}"], output_dir="/tmp/o")).trainer


def test_auto_resume_takes_the_newest_complete_checkpoint_and_drops_newer_broken_ones(tmp_path):
    _checkpoint(tmp_path, 5)
    ten = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 15, complete=False)
    # trainer_state.json written but killed before the marker: still not complete
    marker_missing = _checkpoint(tmp_path, 20)
    (marker_missing / COMPLETE_MARKER).unlink()
    assert not is_complete(marker_missing)
    assert latest_complete(tmp_path) == ten
    assert resolve_resume(_trainer_cfg(), tmp_path) == str(ten)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5"]


def test_a_complete_checkpoint_that_cannot_be_loaded_is_set_aside_for_the_one_before(tmp_path, caplog):
    five, ten, fifteen = _checkpoint(tmp_path, 5), _checkpoint(tmp_path, 10), _checkpoint(tmp_path, 15)
    (fifteen / "model.safetensors").write_bytes(_SAFETENSORS[:-4])  # truncated by a full disk, marker written
    (ten / "trainer_state.json").write_text('{"global_step": 1')  # edited by hand, or cut short
    with caplog.at_level("WARNING", logger="qwenvl_ft"):
        assert resolve_resume(_trainer_cfg(), tmp_path) == str(five)
    warned = caplog.text
    assert "checkpoint-15 is marked complete but cannot be loaded (model.safetensors is truncated (66 of 70 " \
           "bytes)); moved to damaged-checkpoint-15, resuming from checkpoint-5 instead" in warned
    assert "checkpoint-10 is marked complete but cannot be loaded (trainer_state.json is unreadable" in warned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5", "damaged-checkpoint-10",
                                                          "damaged-checkpoint-15"]
    # none loadable: an error that says so, never a silent fresh start
    (five / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError, match=r"no checkpoint in .* can be loaded \(checkpoint-5: optimizer.pt is "
                                          r"truncated or damaged.*trainer.resume_from=null"):
        resolve_resume(_trainer_cfg(), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.resume_from=.*checkpoint-5 cannot be loaded: optimizer.pt"):
        resolve_resume(_trainer_cfg(str(five)), tmp_path)


def test_a_corrupt_config_yaml_is_named_when_resuming(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  name_or_path: [tiny\n")
    with pytest.raises(ConfigError, match=r"config.yaml is damaged \(not valid YAML at line 3, column 1: .*restore "
                                          r"it, or delete it"):
        config_changes(tmp_path / "config.yaml", compose(["recipe=demo"], output_dir="/tmp/o"))


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    _checkpoint(tmp_path, 5, complete=False)
    assert resolve_resume(_trainer_cfg(), tmp_path) is None
    assert not (tmp_path / "checkpoint-5").exists()
    assert resolve_resume(_trainer_cfg(), tmp_path / "missing") is None


def test_resume_from_a_named_checkpoint_or_never(tmp_path):
    ten = _checkpoint(tmp_path, 10)
    newer = _checkpoint(tmp_path, 20)
    assert resolve_resume(_trainer_cfg(str(ten)), tmp_path) == str(ten)
    assert newer.exists()  # complete checkpoints are never removed
    assert resolve_resume(_trainer_cfg("null"), tmp_path) is None
    broken = _checkpoint(tmp_path / "other", 3, complete=False)
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        resolve_resume(_trainer_cfg(str(broken)), tmp_path)


def test_config_changes_name_the_keys_that_differ(tmp_path):
    old = compose(["recipe=demo", "run_name=a"], output_dir=str(tmp_path))
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old, resolve=True))
    same = compose(["recipe=demo", "run_name=b", "trainer.resume_from=null"], output_dir=str(tmp_path))
    assert config_changes(tmp_path / "config.yaml", same) == []
    changed = compose(["recipe=demo", "optimizer.lr=0.01", "trainer.max_steps=7"], output_dir=str(tmp_path))
    assert config_changes(tmp_path / "config.yaml", changed) == ["optimizer.lr", "trainer.max_steps"]


def test_run_name_fixes_the_output_folder(capsys):
    from qwenvl_ft.commands.cli import main

    assert main(["train", "recipe=demo", "run_name=exp1", "--cfg", "hydra"]) == 0
    out, err = capsys.readouterr()
    assert "dir: outputs/${recipe_folder:${oc.select:hydra.runtime.choices.recipe,null}}/${run_name}" in out, err
    assert validate(compose(["recipe=demo", "run_name=exp1"], output_dir="/tmp/o")).run_name == "exp1"


# ---------------------------------------------------------------------------------------------------------------
# tier 2: the CLI in a subprocess, killed part-way (a signal needs a process of its own), then the same command again

# 48 rows in batches of 8: 6 steps an epoch, so checkpoints (every 8) fall mid-epoch and the resumed run must skip
# the batches already seen in that epoch, then reshuffle the following epochs as the uninterrupted run does.
STEPS, SAVE = 32, 8
RUN = ["recipe=demo", "data.shapes.num_train=48", "data.shapes.num_eval=4", f"trainer.max_steps={STEPS}",
       f"trainer.save_steps={SAVE}", "trainer.save_total_limit=null", "trainer.logging_steps=1",
       "trainer.eval_generation=false", "trainer.disable_tqdm=true", "optimizer.scheduler=cosine",
       "optimizer.warmup_ratio=0.1"]


def _start(cwd: Path, log: Path, *overrides) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qwenvl_ft.commands.cli", "train", *overrides], cwd=cwd, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the awaited point")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out")


def _same_command_in_process(cwd: Path, monkeypatch, capsys, *overrides) -> str:
    """The same command run again after the interruption, through the CLI's main in this process: only the run
    that receives the signal needs a process of its own; resuming is the same code either way, and a fresh
    interpreter would add its imports (5-8 s of CPU) and prove nothing more. Returns what the run printed."""
    from qwenvl_ft.commands.cli import main

    monkeypatch.chdir(cwd)
    status = main(["train", *overrides])
    out, err = capsys.readouterr()
    assert status == 0, (out + err)[-3000:]
    return out + err


def _losses(history):
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.mark.slow
def test_sigkill_part_way_then_the_same_command_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                         capsys):
    from qwenvl_ft.commands.train import train

    command = RUN + ["run_name=exp1"]
    run = tmp_path / "outputs" / "demo" / "exp1"
    proc = _start(tmp_path, tmp_path / "first.log", *command)
    _wait_for(lambda: latest_complete(run) is not None, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    assert not (run / "final").exists(), "the run finished before it could be killed; the test needs more steps"
    resumed_from = latest_complete(run)
    step = int(resumed_from.name.split("-")[1])
    assert step < STEPS

    # What a kill during a save leaves: the next checkpoint, half written. It must be ignored and replaced.
    broken = run / f"checkpoint-{step + SAVE}"
    if not broken.exists():
        shutil.copytree(resumed_from, broken)
        (broken / COMPLETE_MARKER).unlink()
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    assert latest_complete(run) == resumed_from

    log = _same_command_in_process(tmp_path, monkeypatch, capsys, *command)
    assert f"resuming from {resumed_from} (step {step})" in log
    assert json.loads((run / "metrics.json").read_text())["global_step"] == STEPS
    assert is_complete(run / f"checkpoint-{step + SAVE}"), "the broken checkpoint was not rewritten"
    history = json.loads((run / "log_history.json").read_text())
    losses = _losses(history)
    assert sorted(losses) == list(range(1, STEPS + 1)), "every step logged exactly once across both runs"

    # Same model, optimizer, schedule, RNG and data position: the curve equals an uninterrupted run's, step by step.
    train(compose(RUN, output_dir=str(tmp_path / "reference")))
    reference = _losses(json.loads((tmp_path / "reference" / "log_history.json").read_text()))
    for s in range(1, STEPS + 1):
        assert losses[s] == pytest.approx(reference[s], rel=1e-3, abs=1e-4), f"step {s}: {losses[s]} vs {reference[s]}"
    lrs = {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
    assert lrs[step + 1] < lrs[step], "the cosine schedule restarted"  # warmup ends at step 4, before any save


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(tmp_path, monkeypatch, capsys):
    # Periodic saves far away: the only checkpoint is the one SIGTERM asks for.
    base = [o for o in RUN if not o.startswith(("trainer.max_steps=", "trainer.save_steps="))]
    command = base + ["trainer.save_steps=50000", "run_name=term"]
    run = tmp_path / "outputs" / "demo" / "term"
    log = tmp_path / "first.log"
    proc = _start(tmp_path, log, *command, "trainer.max_steps=100000")
    _wait_for(lambda: log.read_text().count("'loss'") >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text
    assert "Run the same command again to resume" in text
    saved = latest_complete(run)
    assert saved is not None and [p.name for p in run.glob("checkpoint-*")] == [saved.name]
    step = json.loads((saved / "trainer_state.json").read_text())["global_step"]
    assert 5 <= step < 50000 and saved.name == f"checkpoint-{step}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["metrics"]["global_step"] == step
    assert not (run / "final").exists()

    # The saved checkpoint resumes: three more steps and the run is complete.
    _same_command_in_process(tmp_path, monkeypatch, capsys, *command, f"trainer.max_steps={step + 3}")
    assert json.loads((run / "metrics.json").read_text())["global_step"] == step + 3
    assert (run / "final").is_dir()

    # Once finished, the same command again is a no-op (resuming at the last step would train one step more).
    assert "already finished" in _same_command_in_process(tmp_path, monkeypatch, capsys, *command,
                                                          f"trainer.max_steps={step + 3}")
    assert json.loads((run / "metrics.json").read_text())["global_step"] == step + 3
    assert not (run / f"checkpoint-{step + 4}").exists()
