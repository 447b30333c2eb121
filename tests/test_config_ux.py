"""The newcomer's path, config side: precision=auto, trackers named by their extra, trainer.extra_args, warmup steps,
per-epoch saving, recipe files, `--help`, the outputs/custom folder, and silenced library noise."""

import logging
import subprocess
import sys

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.config.schema import GROUP_SCHEMAS
from qwenvl_ft.config.trainer import Precision, Tracker
from qwenvl_ft.errors import ConfigError


def _cfg(*overrides):
    return validate(compose(["recipe=demo", *overrides], output_dir="/tmp/qwenvl_ft_test_out"))


# -- precision ---------------------------------------------------------------------------------------------------


def test_precision_auto_resolves_for_the_machine():
    from transformers.utils import is_torch_bf16_gpu_available

    from qwenvl_ft.training.arguments import training_arguments
    from qwenvl_ft.training.preflight import effective_precision

    cfg = validate(compose([], output_dir="/tmp/qwenvl_ft_test_out"))  # the default; the demo says fp32
    assert cfg.trainer.precision == Precision.auto
    expected = Precision.bf16 if is_torch_bf16_gpu_available() else Precision.fp32
    assert effective_precision(Precision.auto) == expected
    arguments = training_arguments(cfg)
    assert (arguments["bf16"], arguments["fp16"]) == (expected == Precision.bf16, False)


@pytest.mark.skipif("__import__('transformers').utils.is_torch_bf16_gpu_available()")
def test_explicit_bf16_without_support_is_a_config_error_before_anything_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipe=demo", "trainer.precision=bf16", "run_name=bf16"]) == 2
    err = capsys.readouterr().err
    assert "trainer.precision=bf16" in err and "trainer.precision=auto" in err and "Traceback" not in err
    run = tmp_path / "outputs" / "demo" / "bf16"
    assert not (run / "config.yaml").exists() and not (run / "data_check.json").exists()  # stopped at once


# -- trackers ----------------------------------------------------------------------------------------------------


def test_report_to_takes_every_tracker_and_names_the_extra_of_a_missing_one(monkeypatch):
    import importlib.util

    from qwenvl_ft.training import preflight

    cfg = _cfg("trainer.report_to=[tensorboard,wandb,swanlab,mlflow]", "trainer.tracker.project=p",
               "trainer.tracker.tags=[a,b]")
    assert [t.value for t in cfg.trainer.report_to] == ["tensorboard", "wandb", "swanlab", "mlflow"]
    preflight.check_trackers(cfg.trainer.report_to)  # all four are installed here
    assert preflight.active_trackers([Tracker.none]) == [] and preflight.active_trackers([]) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a))
    with pytest.raises(ConfigError, match=r'swanlab, which is not installed: pip install "qwenvl-ft\[swanlab\]"'):
        preflight.check_trackers(cfg.trainer.report_to)
    with pytest.raises(ConfigError, match="tensorboard, wandb, swanlab, mlflow, none"):
        _cfg("trainer.report_to=[comet]")
    with pytest.raises(ConfigError, match="none cannot be combined"):
        _cfg("trainer.report_to=[none,wandb]")


def test_tracker_run_name_defaults_to_the_run_folder():
    from qwenvl_ft.training.arguments import tracker_run_name

    assert tracker_run_name(validate(compose(["recipe=demo"], output_dir="/x/outputs/demo/exp1"))) == "exp1"
    assert tracker_run_name(validate(compose(["recipe=demo"], output_dir="/x/multirun/demo/sweep1/3"))) == "sweep1-3"
    named = validate(compose(["recipe=demo", "trainer.tracker.run_name=mine"], output_dir="/x/outputs/demo/exp1"))
    assert tracker_run_name(named) == "mine"


# -- TrainingArguments: extra_args, warmup_steps, save_strategy ---------------------------------------------------


def test_extra_args_reach_the_methods_config_and_are_checked_against_it():
    from trl import DPOConfig, SFTConfig

    from qwenvl_ft.training.arguments import training_arguments
    from qwenvl_ft.training.preflight import preflight

    cfg = _cfg("+trainer.extra_args.neftune_noise_alpha=5", "+trainer.extra_args.lr_scheduler_kwargs={min_lr: 1e-5}")
    preflight(cfg)
    args = SFTConfig(**training_arguments(cfg))
    assert args.neftune_noise_alpha == 5 and args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    with pytest.raises(ConfigError, match="Did you mean 'trainer.extra_args.neftune_noise_alpha'"):
        preflight(_cfg("+trainer.extra_args.neftune_noise_alfa=5"))
    with pytest.raises(ConfigError, match="qwenvl-ft sets learning_rate from optimizer.lr"):
        preflight(_cfg("+trainer.extra_args.learning_rate=0.1"))
    # the method decides the class: ld_alpha is DPO's, not SFT's; beta is DPO's own setting
    with pytest.raises(ConfigError, match="not a field of trl.SFTConfig"):
        preflight(_cfg("+trainer.extra_args.ld_alpha=0.5"))
    dpo = validate(compose(["recipe=dpo_demo", "+trainer.extra_args.ld_alpha=0.5"], output_dir="/tmp/o"))
    preflight(dpo)
    assert DPOConfig(**training_arguments(dpo)).ld_alpha == 0.5
    with pytest.raises(ConfigError, match="from trainer.dpo.beta"):
        preflight(validate(compose(["recipe=dpo_demo", "+trainer.extra_args.beta=0.5"], output_dir="/tmp/o")))


def test_grpo_extra_args_are_checked_against_grpoconfig():
    from trl import GRPOConfig

    from qwenvl_ft.rewards import build_rewards
    from qwenvl_ft.trainers.grpo import grpo_arguments
    from qwenvl_ft.training.arguments import training_arguments
    from qwenvl_ft.training.preflight import preflight

    def grpo(*overrides):
        return validate(compose(["recipe=grpo_demo", *overrides], output_dir="/tmp/o"))

    cfg = grpo("+trainer.extra_args.steps_per_generation=2", "+trainer.extra_args.shuffle_dataset=false")
    preflight(cfg)
    args = GRPOConfig(**training_arguments(cfg), **grpo_arguments(cfg, build_rewards(cfg.trainer.grpo.rewards)))
    assert (args.steps_per_generation, args.shuffle_dataset) == (2, False)
    with pytest.raises(ConfigError, match="qwenvl-ft sets num_generations from trainer.grpo.num_generations"):
        preflight(grpo("+trainer.extra_args.num_generations=4"))
    with pytest.raises(ConfigError, match="Did you mean 'num_generations'. qwenvl-ft sets it from trainer.grpo"):
        preflight(grpo("+trainer.extra_args.num_generation=4"))  # a typo of a key qwenvl-ft sets: its own key
    with pytest.raises(ConfigError, match="not a field of trl.GRPOConfig"):
        preflight(grpo("+trainer.extra_args.assistant_only_loss=true"))  # SFT's, not GRPO's


def test_every_argument_qwenvl_ft_sets_names_its_config_key():
    import dataclasses

    from qwenvl_ft import methods
    from qwenvl_ft.methods.base import ARGUMENT_SOURCES
    from qwenvl_ft.rewards import build_rewards
    from qwenvl_ft.trainers.grpo import grpo_arguments
    from qwenvl_ft.training.arguments import training_arguments
    from qwenvl_ft.training.preflight import arguments_class

    assert set(training_arguments(_cfg())) <= set(ARGUMENT_SOURCES)
    for method in methods.registry().values():  # a method names only real fields of its TRL config
        fields = {f.name for f in dataclasses.fields(arguments_class(method))}
        assert set(method.argument_sources) | set(ARGUMENT_SOURCES) <= fields, method.name
    cfg = validate(compose(["recipe=grpo_demo", "trainer.grpo.vllm.enabled=true"], output_dir="/tmp/o"))
    assert set(grpo_arguments(cfg, build_rewards(cfg.trainer.grpo.rewards))) <= set(
        methods.get("grpo").argument_sources)


def test_warmup_steps_and_save_strategy():
    from qwenvl_ft.training.arguments import training_arguments

    arguments = training_arguments(_cfg("optimizer.warmup_ratio=0", "optimizer.warmup_steps=7",
                                        "trainer.save_strategy=epoch"))
    assert arguments["warmup_steps"] == 7 and arguments["save_strategy"] == "epoch"
    assert training_arguments(_cfg())["warmup_steps"] == 0.05  # the demo's warmup_ratio
    with pytest.raises(ConfigError, match="warmup_steps and optimizer.warmup_ratio are alternatives"):
        _cfg("optimizer.warmup_steps=7")  # the demo sets warmup_ratio=0.05
    with pytest.raises(ConfigError, match="load_best_model_at_end needs trainer.save_strategy=steps"):
        _cfg("trainer.save_strategy=epoch", "trainer.eval_steps=5", "trainer.load_best_model_at_end=true")
    with pytest.raises(ConfigError, match="expected one of"):
        _cfg("trainer.save_strategy=never")


# -- command line: recipe files, --help, outputs/custom ------------------------------------------------------------


def test_a_yaml_file_is_a_recipe(tmp_path, capsys):
    run = tmp_path / "my_run.yaml"
    run.write_text("defaults:\n  - override /adapter: dora\n\noptimizer:\n  lr: 0.005\n")
    assert main(["train", str(run), "optimizer.weight_decay=0.1", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "method: dora" in out and "lr: 0.005" in out and "weight_decay: 0.1" in out

    broken = tmp_path / "broken.yaml"
    broken.write_text("optimizer:\n  lrr: 0.005\n")
    assert main(["train", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "Did you mean 'optimizer.lr'?" in err and "Traceback" not in err
    assert main(["train", str(run), "recipe=demo"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_lists_every_key_with_the_schemas_description():
    import dataclasses
    import re
    import typing

    from qwenvl_ft.commands.cli import COMMANDS
    from qwenvl_ft.config.describe import command_sections, field_comments, one_line
    from qwenvl_ft.config.schema import root_schema

    code = ("import sys; from qwenvl_ft.commands.cli import main; rc = main(['train', '--help']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"\s+", " ", out.stdout)  # descriptions wrap over lines

    def check(cls, prefix):
        comments, hints = field_comments(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            assert f" {key}" in text, key
            if f.name in comments:
                assert re.sub(r"\s+", " ", one_line(comments[f.name])) in text, key
            nested = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
            if nested:  # a group, or a list of them (trainer.grpo.rewards[].function)
                check(nested[0], key + ("[]." if typing.get_origin(hints[f.name]) is list else "."))

    for group, schema in GROUP_SCHEMAS.items():
        check(schema, f"{group}.")
    # every key of every command has its one line: a comment in the schema, or its group's docstring
    undocumented = {key for name, _ in COMMANDS.values() for _, _, rows in command_sections(root_schema(name))
                    for key, doc in rows if not doc}
    assert not undocumented, sorted(undocumented)
    assert "optimizer.warmup_steps: int = null warm up for this many optimizer steps instead" in text
    assert "(options: adapter=dora|full|lora|qlora)" in text
    assert main(["eval", "--help"]) == 0


def test_runs_without_a_recipe_go_to_custom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["data-check", "run_name=r1", "data.shapes.num_train=2", "data.shapes.num_eval=1"]) == 0
    assert (tmp_path / "outputs" / "custom" / "r1" / "data_check.json").is_file()
    assert not (tmp_path / "outputs" / "None").exists()
    # every command's folder is decided the same way (the chat page's, which starts a server, included)
    from omegaconf import OmegaConf

    from qwenvl_ft.config.compose import config_dir, register_all

    register_all()
    for primary in ("train", "eval", "infer", "merge", "chat"):
        run_dir = OmegaConf.to_container(OmegaConf.load(config_dir() / f"{primary}.yaml").hydra.run)["dir"]
        for recipe, folder in ((None, "custom"), ("demo", "demo")):
            resolved = OmegaConf.create({"hydra": {"runtime": {"choices": {"recipe": recipe}}, "dir": run_dir},
                                         "run_name": "r1"}).hydra.dir
            assert resolved.startswith(f"outputs/{folder}/r1"), (primary, resolved)


def test_library_noise_is_filtered_and_the_rest_kept(caplog):
    from qwenvl_ft.quiet import silence_library_noise

    silence_library_noise()
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.INFO):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        noisy.warning("something that matters")
        logging.getLogger("absl").info("Using default tokenizer.")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert [r.getMessage() for r in caplog.records] == ["something that matters"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_library_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("a warning that matters", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning that matters"]


# -- eval / infer / merge start from the run's saved config --------------------------------------------------------


def test_a_named_runs_saved_config_is_the_starting_point(tmp_path, caplog):
    from omegaconf import OmegaConf

    from qwenvl_ft.config.saved_run import with_saved_run

    run = tmp_path / "outputs" / "mine" / "exp1"
    run.mkdir(parents=True)
    trained = compose(["recipe=demo", "data=llava", "data.path=/data/train.json", "data.eval_size=5", "adapter=dora",
                       "trainer.max_new_tokens=12"], output_dir=str(run))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(trained, resolve=True))

    def evaluate(*overrides):
        composed = compose(["recipe=demo", *overrides], config_name="eval", output_dir=str(run / "eval"))
        return validate(with_saved_run(composed, overrides))

    cfg = evaluate()  # nothing repeated: the run's data, adapter and settings
    assert (cfg.data.format.value, cfg.data.path, cfg.data.eval_size) == ("llava", "/data/train.json", 5)
    assert cfg.adapter.method.value == "dora" and cfg.eval.generation.max_new_tokens == 12
    with caplog.at_level(logging.WARNING, logger="qwenvl_ft"):
        cfg = evaluate("data.path=/data/other.json", "adapter.r=4", "eval.num_samples=2")
    assert (cfg.data.path, cfg.data.eval_size, cfg.adapter.r, cfg.eval.num_samples) == ("/data/other.json", 5, 4, 2)
    assert "data.path: '/data/other.json' (the run trained on '/data/train.json')" in caplog.text
    assert cfg.adapter.method.value == "dora"
    cfg = evaluate("adapter=lora")  # a group swapped on the command line replaces the run's group
    assert cfg.adapter.method.value == "lora" and cfg.data.path == "/data/train.json"
    # chat too: the run's model is the base its adapter goes on
    chat = compose(["recipe=demo", "model=tiny_qwen2_5_vl"], config_name="chat", output_dir=str(run / "chat"))
    assert validate(with_saved_run(chat, [])).model.family.value == trained.model.family
    # no saved config (a run that is not there): the composed config as it is
    elsewhere = compose(["recipe=demo"], config_name="eval", output_dir=str(tmp_path / "none" / "eval"))
    assert with_saved_run(elsewhere, []) is elsewhere
