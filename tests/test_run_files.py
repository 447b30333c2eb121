"""Damaged run folders (qwenvl_ft/config/run_files.py): a corrupt config.yaml, adapter_config.json or truncated
weights are named with what to do, through the commands that read them; resuming past a damaged newest checkpoint
reaches the same final step as an undamaged run. The checkpoint choice itself is tested in tests/test_resume.py."""

import json
from pathlib import Path

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.run_files import checkpoint_problem, read_json, safetensors_problem, torch_file_problem
from qwenvl_ft.errors import ConfigError


def _cli(capsys, *args):
    status = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, err


def _weights(path: Path, cut: int = 0) -> Path:
    from safetensors.torch import save_file

    import torch

    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(path))
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


def test_the_checks_read_headers_and_name_what_is_wrong(tmp_path):
    import torch

    assert safetensors_problem(_weights(tmp_path / "whole.safetensors")) is None
    assert "is truncated (" in safetensors_problem(_weights(tmp_path / "cut.safetensors", cut=5))
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    assert safetensors_problem(tmp_path / "tiny.safetensors") == "tiny.safetensors is truncated (3 bytes, no header)"
    torch.save({"x": torch.ones(3)}, tmp_path / "optimizer.pt")
    assert torch_file_problem(tmp_path / "optimizer.pt") is None
    (tmp_path / "cut.pt").write_bytes((tmp_path / "optimizer.pt").read_bytes()[:-30])
    assert "truncated or damaged" in torch_file_problem(tmp_path / "cut.pt")
    (tmp_path / "bad.json").write_text('{"a": 1,}')
    with pytest.raises(ConfigError, match=r"bad.json is damaged \(not valid JSON at line 1, column 9: .*\)\. Fix it"):
        read_json(tmp_path / "bad.json", "Fix it.")
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    _weights(folder / "model.safetensors")
    assert checkpoint_problem(folder) is None
    (folder / "sub").mkdir()
    (folder / "sub" / "adapter_config.json").write_text("{")
    assert checkpoint_problem(folder).startswith("sub/adapter_config.json is not valid JSON")


def test_eval_on_a_run_whose_config_yaml_is_corrupt_names_it(tmp_path, capsys):
    run = tmp_path / "outputs" / "demo" / "exp1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name_or_path: tiny\n data: {\n")
    status, err = _cli(capsys, "eval", "recipe=demo", f"hydra.run.dir={run / 'eval'}")
    assert status == 2
    assert f"{run / 'config.yaml'} is damaged (not valid YAML at line 3" in err
    assert "restore it" in err and "move it away" in err


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "adapter_config.json").write_text('{"r": 8, '),
     "adapter_config.json is damaged (not valid JSON at line 1"),
    (lambda folder: _weights(folder / "adapter_model.safetensors", cut=10),
     "adapter_model.safetensors is truncated"),
])
def test_merge_of_a_damaged_adapter_names_the_file_before_the_base_loads(tmp_path, capsys, damage, message):
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    damage(adapter)
    status, err = _cli(capsys, "merge", "recipe=demo", "adapter=lora", f"merge.adapter_path={adapter}",
                       f"merge.output_path={tmp_path / 'merged'}", f"hydra.run.dir={tmp_path / 'merge'}")
    assert status == 2 and message in err and "checkpoint-*/" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_resume_past_a_damaged_newest_checkpoint_reaches_the_same_final_step(tmp_path, capsys):
    """A full disk truncated checkpoint-4's weights after its marker was written: the same command (with more
    steps) sets it aside, says so, resumes from checkpoint-2 and ends where an undamaged run ends."""
    common = ["train", "recipe=demo", "data.shapes.num_train=48", "data.shapes.num_eval=4", "trainer.save_steps=2",
              "trainer.logging_steps=1", "trainer.eval_generation=false", "trainer.report_to=[none]",
              "trainer.disable_tqdm=true"]
    run, reference = tmp_path / "run", tmp_path / "reference"
    assert _cli(capsys, *common, "trainer.max_steps=4", f"hydra.run.dir={run}")[0] == 0
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status, err = _cli(capsys, *common, "trainer.max_steps=6", f"hydra.run.dir={run}")
    assert status == 0, err[-2000:]
    log = (run / "cli.log").read_text()
    assert "checkpoint-4 is marked complete but cannot be loaded (model.safetensors is truncated" in log
    assert "moved to damaged-checkpoint-4, resuming from checkpoint-2 instead" in log
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in log
    assert (run / "damaged-checkpoint-4" / "model.safetensors").exists()
    assert _cli(capsys, *common, "trainer.max_steps=6", f"hydra.run.dir={reference}")[0] == 0
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (run, reference)]
    assert metrics[0]["global_step"] == metrics[1]["global_step"] == 6
    steps = [e["step"] for e in json.loads((run / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 again after the fallback, each logged once
    assert checkpoint_problem(run / "checkpoint-6") is None and (run / "final").is_dir()


def test_eval_of_a_truncated_full_model_names_the_file(tmp_path, capsys):
    final = tmp_path / "outputs" / "demo" / "exp1" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    _weights(final / "model.safetensors", cut=7)
    status, err = _cli(capsys, "eval", "recipe=demo", "trainer.eval_generation=false",
                       f"hydra.run.dir={final.parent / 'eval'}")
    assert status == 2 and f"{final}: model.safetensors is truncated" in err and "train (or merge) it again" in err
