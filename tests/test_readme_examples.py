"""The worked example of docs/data.md runs as written: its recipe file is examples/llava_tiny.yaml, and its commands
(check, train, eval, infer, merge with the tiny model; estimate with Qwen2-VL-2B) run offline from a copy of the
repository's examples/ folder."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose, validate

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Worked example: your own LLaVA file"


def _section() -> str:
    readme = (ROOT / "docs" / "data.md").read_text()
    start = readme.index(SECTION)
    return readme[start: readme.index("\n## ", start + len(SECTION))]


def _blocks(text: str, language: str):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _commands(block: str):
    return [shlex.split(line)[1:] for line in block.strip().splitlines() if line.startswith("qwenvl-ft ")]


def test_the_readme_shows_the_example_file_as_it_is():
    yaml_block, = _blocks(_section(), "yaml")
    assert yaml_block == (ROOT / "examples" / "llava_tiny.yaml").read_text()


@pytest.mark.slow
def test_own_llava_file_with_the_tiny_model_end_to_end(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    tiny, two_b = _blocks(_section(), "bash")
    commands = _commands(tiny)
    assert [c[0] for c in commands] == ["data-check", "train", "eval", "infer", "merge"]
    for command in commands:
        assert main(command) == 0, command
    out = capsys.readouterr()
    assert "Traceback" not in out.err

    run = tmp_path / "outputs" / "llava_tiny" / "first"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 20  # 40 rows, batch 4, 2 epochs
    assert "eval_exact_match_before" in metrics and "eval_exact_match_after" in metrics
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]  # one per epoch
    assert (run / "final" / "adapter_config.json").is_file()
    # eval, infer and merge used the run's config.yaml: its 8 held-out rows of the LLaVA file, its LoRA adapter
    report = json.loads((run / "eval" / "eval_report.json").read_text())
    assert report["num_samples"] == 8 and report["model_path"] == str((run / "final").resolve())
    prediction, = [json.loads(line) for line in (run / "infer" / "predictions.jsonl").read_text().splitlines()]
    assert prediction["image"] == "examples/llava_shapes/images/000.png"
    assert json.loads((run / "merged" / "merge_info.json").read_text())["method"] == "lora"
    assert (run / "merged" / "model.safetensors").is_file()

    # Qwen2-VL-2B: the estimate runs offline (no weights); the training command composes and validates.
    estimate, train, evaluate = _commands(two_b)
    assert main(estimate) == 0
    assert "predicted peak                 6.27" in capsys.readouterr().out
    cfg = validate(compose(["recipe=llava_tiny", *train[2:]], extra_recipe_dirs=["examples"],
                           output_dir=str(tmp_path / "2b")))
    assert cfg.model.name_or_path == "Qwen/Qwen2-VL-2B-Instruct" and cfg.adapter.method.value == "lora"
    assert train[1] == evaluate[1] == "examples/llava_tiny.yaml"
