"""Recipe files read defensively (qwenvl_ft/config/recipe_files.py): a broken file in a recipe folder stops only the
command that chooses it, with file:line:column and the parser's reason; empty and non-mapping recipes are errors;
model.start_from.* on a recipe without start_from is refused clearly; a misspelt recipe or group option gets a
one-line did-you-mean."""

import os

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose
from qwenvl_ft.errors import ConfigError


@pytest.fixture
def recipe_dir(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.yaml").write_text("defaults:\n  - override /model: tiny\noptimizer:\n  lr: 1e-3\n")
    (folder / "bad.yaml").write_text("optimizer:\n  lr: 1e-3\ntrainer:\n  epochs: [1\n")
    (folder / "empty.yaml").write_text("# nothing yet\n")
    (folder / "alist.yaml").write_text("- optimizer.lr=1e-3\n")
    (folder / "folder.yaml").mkdir()
    return folder


def _cli(capsys, *args):
    status = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "HYDRA_FULL_ERROR" not in out + err
    return status, err


def test_a_broken_recipe_stops_only_the_command_that_uses_it(recipe_dir, capsys, tmp_path):
    status, _ = _cli(capsys, "estimate", "recipe=mine", "--recipe-dir", str(recipe_dir), "--cfg", "job")
    assert status == 0  # the broken neighbours do not matter
    cases = {
        "bad": f"recipe bad: {recipe_dir / 'bad.yaml'}:5:1: while parsing a flow sequence: expected ',' or ']'",
        "empty": f"recipe empty is empty ({recipe_dir / 'empty.yaml'})",
        "alist": f"recipe alist: {recipe_dir / 'alist.yaml'} holds a list, not a mapping of config keys",
        "folder": f"recipe folder: {recipe_dir / 'folder.yaml'} is a folder, not a YAML file",
    }
    for name, message in cases.items():
        status, err = _cli(capsys, "estimate", f"recipe={name}", "--recipe-dir", str(recipe_dir),
                           f"hydra.run.dir={tmp_path / name}")
        assert status == 2 and message in err, (name, err)
    status, _ = _cli(capsys, "recipes", "--recipe-dir", str(recipe_dir))
    assert status == 0
    with pytest.raises(ConfigError, match="recipe empty is empty"):
        compose(["recipe=empty"], extra_recipe_dirs=[str(recipe_dir)], output_dir="/tmp/o")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_recipe_is_named(recipe_dir, capsys, tmp_path):
    locked = recipe_dir / "locked.yaml"
    locked.write_text("optimizer:\n  lr: 1e-3\n")
    locked.chmod(0)
    try:
        status, err = _cli(capsys, "estimate", "recipe=locked", "--recipe-dir", str(recipe_dir),
                           f"hydra.run.dir={tmp_path / 'run'}")
        assert status == 2 and f"recipe locked: cannot read {locked} (PermissionError" in err
        assert _cli(capsys, "estimate", "recipe=mine", "--recipe-dir", str(recipe_dir), "--cfg", "job")[0] == 0
    finally:
        locked.chmod(0o644)


def test_a_misspelt_recipe_or_option_gets_a_did_you_mean(capsys, tmp_path):
    status, err = _cli(capsys, "train", "recipe=qlora_7b_amazn", f"hydra.run.dir={tmp_path / 'a'}")
    assert status == 2
    assert "unknown recipe 'qlora_7b_amazn'. Did you mean 'recipe=qlora_7b_amazon'?" in err
    assert len(err.strip().splitlines()) == 1 and "search path" not in err.lower()
    status, err = _cli(capsys, "train", "recipe=demo", "model=qwen2_vl_7", f"hydra.run.dir={tmp_path / 'b'}")
    assert status == 2 and "unknown model 'qwen2_vl_7'. Did you mean 'model=qwen2_vl_7b'?" in err
    with pytest.raises(ConfigError, match=r"unknown recipe 'dmo'. Did you mean 'recipe=demo'\?"):
        compose(["recipe=demo,dmo"], output_dir="/tmp/o")  # each choice of a -m sweep
    with pytest.raises(ConfigError, match=r"unknown dist 'zero4'. Did you mean 'dist=zero3'\?"):
        compose(["recipe=demo", "dist=zero4"], output_dir="/tmp/o")


def test_start_from_on_a_recipe_without_it_is_refused_clearly(capsys, tmp_path):
    for override in ("model.start_from.recipe=demo", "+model.start_from={recipe: demo, output_dir: /tmp/x}"):
        status, err = _cli(capsys, "train", "recipe=demo", override, f"hydra.run.dir={tmp_path / 'run'}")
        assert status == 2 and "recipe demo has no model.start_from to change" in err
        assert "model: {start_from: {recipe: NAME, output_dir: DIR" in err
    # on a recipe that has one, a field of it changes
    cfg = compose(["recipe=grpo_demo", "model.start_from.recipe=dpo_demo"], output_dir="/tmp/o")
    assert cfg.model.start_from.recipe == "dpo_demo" and cfg.model.start_from.output_dir.endswith("grpo_demo_start")


def test_a_command_reads_only_the_recipes_it_chooses(recipe_dir, monkeypatch):
    """Parsing every recipe file was ~0.16 s of each command's start; the names are all known (the did-you-mean
    above), the files of the chosen ones are read, and all of them where Hydra may need any."""
    from qwenvl_ft.commands import cli
    from qwenvl_ft.config import compose as compose_module
    from qwenvl_ft.config.recipe_files import NAMES, read_recipe

    read = []

    def counted(path, name=None):
        read.append(path.stem)
        return read_recipe(path, name)

    monkeypatch.setattr(compose_module, "read_recipe", counted)
    folder = ["--recipe-dir", str(recipe_dir)]
    assert cli._prepare("train", ["recipe=mine", *folder, "optimizer.lr=1e-3"])[0] is None
    assert set(read) == {"mine"} and {"demo", "mine", "bad"} <= NAMES  # registered, then its keys checked
    read.clear()
    cli._prepare("train", ["-m", "recipe=demo,mine", *folder])
    assert set(read) == {"demo", "mine"}
    for wider in (["-m", "recipe=glob(*)"], ["--info"], ["-m", "sweep=optuna", "recipe=demo"]):
        read.clear()
        cli.register_all([str(recipe_dir)], [], "train", cli.recipes_chosen("train", [*wider], []))
        assert {"demo", "mine", "lora_2b_coco"} <= set(read), wider
