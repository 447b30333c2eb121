"""The training-method registry (qwenvl_ft/methods/): every registered method declares what the skeleton and the
commands need, and `data-check`, `estimate` and `eval` run on every method's demo recipe. A new method gets these
tests by registering itself."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qwenvl_ft import methods
from qwenvl_ft.config.compose import compose, config_dir, validate
from qwenvl_ft.config.data import DataFormat
from qwenvl_ft.config.trainer import TrainerKind
from qwenvl_ft.errors import ConfigError

METHODS = methods.names()
# Small enough for seconds per command: a few rows of every demo's generated data.
SMALL = ["data.shapes.num_train=16", "data.shapes.num_eval=4", "trainer.report_to=[none]"]


def test_sft_is_the_default_and_every_format_has_one_owner():
    assert METHODS[0] == "sft" and {"sft", "dpo"} <= set(METHODS)
    assert [kind.value for kind in TrainerKind] == METHODS
    owners = {fmt: [m for m in METHODS if fmt in methods.get(m).data_formats] for fmt in DataFormat}
    assert all(len(found) == 1 for found in owners.values()), owners
    assert {fmt.value for fmt in DataFormat} == {f for m in METHODS for f in methods.get(m).data_formats}


@pytest.mark.parametrize("name", METHODS)
def test_a_method_declares_what_the_commands_need(name):
    method = methods.get(name)
    assert method.name == name and method.summary and method.row_kind and method.batch_unit
    assert method.data_formats and set(method.generated_formats) <= set(method.data_formats)
    assert (config_dir() / "trainer" / f"{name}.yaml").is_file(), "each method has its conf/trainer option"
    if method.settings is not None:
        assert dataclasses.is_dataclass(method.settings)
        cfg = validate(compose([f"recipe={method.demo_recipe}"], output_dir="/tmp/unused"))
        assert isinstance(getattr(cfg.trainer, name), method.settings), f"trainer.{name} holds its settings"
    demo = validate(compose([f"recipe={method.demo_recipe}"], output_dir="/tmp/unused"))
    assert demo.trainer.kind.value == name and demo.data.format.method is method


def test_a_kind_without_a_method_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="sft.*dpo"):
        compose(["trainer.kind=kto"], output_dir="/tmp/unused")
    with pytest.raises(KeyError, match="registered: sft"):
        methods.get("kto")


def test_format_and_method_must_agree_both_ways():
    with pytest.raises(ConfigError, match="trainer=dpo needs preference pairs, but data.format=shapes holds "
                                          "conversations: train it with trainer=sft"):
        compose(["recipe=demo", "trainer=dpo"], output_dir="/tmp/unused")


@pytest.mark.parametrize("name", METHODS)
def test_data_check_reads_and_measures_every_methods_rows(name, tmp_path):
    from qwenvl_ft.commands.data_check import data_check

    method = methods.get(name)
    summary = data_check(compose([f"recipe={method.demo_recipe}", *SMALL], output_dir=str(tmp_path)))
    assert summary["invalid_rows"] == 0 and summary["train"]["rows_kept"] == 16 and summary["eval"]["rows_kept"] == 4
    assert summary["train"]["images"] == 16 and summary["train"]["sequence_length"]["min"] > 0
    report = json.loads((tmp_path / "data_check.json").read_text())
    assert report["settings"]["method"] == name


@pytest.mark.parametrize("name", METHODS)
def test_estimate_runs_for_every_method(name, capsys):
    from qwenvl_ft.commands.estimate import estimate

    method = methods.get(name)
    result = estimate(compose([f"recipe={method.demo_recipe}"], output_dir="/tmp/unused"))
    assert result["predicted_peak_gib"] > 0 and result["trainable"] > 0
    assert "predicted peak" in capsys.readouterr().out


def test_dpo_estimate_adds_the_reference_copy_only_when_it_exists():
    from qwenvl_ft.estimate.memory import estimate_memory

    def components(*overrides):
        cfg = validate(compose(["recipe=dpo_demo", *overrides], output_dir="/tmp/unused"))
        return [name for name, _, _ in estimate_memory(cfg).rows]

    assert "reference model" not in components()  # LoRA: the adapter disabled is the reference
    assert "reference model" in components("adapter=full")
    assert "reference model" not in components("adapter=full", "trainer.dpo.precompute_ref_log_probs=true")


@pytest.mark.parametrize("name", METHODS)
def test_eval_of_the_base_model_runs_for_every_method(name, tmp_path):
    from qwenvl_ft.commands.eval import evaluate

    method = methods.get(name)
    cfg = compose([f"recipe={method.demo_recipe}", *SMALL, "eval.model_path=null", "eval.generation.max_new_tokens=4"],
                  config_name="eval", output_dir=str(tmp_path))
    result = evaluate(cfg)
    assert set(result) >= {"base_exact_match", "base_bleu", "base_rouge_l"}
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["num_samples"] == 4 and all(example["reference"] for example in report["examples"])


@pytest.mark.parametrize("name", METHODS)
def test_data_check_estimate_and_eval_run_on_qwen3_5_for_every_method(name, tmp_path, capsys):
    """The tiny Qwen3.5 (Gated DeltaNet layers, a thinking template) through each method's data check, estimate
    and base-model eval, its prompts' think block closed (data.enable_thinking=false)."""
    from qwenvl_ft.commands.data_check import data_check
    from qwenvl_ft.commands.estimate import estimate
    from qwenvl_ft.commands.eval import evaluate

    common = [f"recipe={methods.get(name).demo_recipe}", "model=tiny_qwen3_5", *SMALL, "data.enable_thinking=false"]
    summary = data_check(compose(common, output_dir=str(tmp_path / "check")))
    assert summary["invalid_rows"] == 0 and summary["train"]["rows_kept"] == 16
    assert estimate(compose(common, output_dir="/tmp/unused"))["predicted_peak_gib"] > 0
    assert "Gated DeltaNet x" in capsys.readouterr().out
    result = evaluate(compose(common + ["eval.model_path=null", "eval.generation.max_new_tokens=4"],
                              config_name="eval", output_dir=str(tmp_path / "eval")))
    assert set(result) >= {"base_exact_match", "base_bleu", "base_rouge_l"}


@pytest.mark.slow
def test_dpo_rewards_in_eval_use_the_disabled_adapter_as_the_base(tmp_path):
    """`qwenvl-ft eval` on a DPO adapter: implicit rewards against the adapter disabled equal those against a
    separately loaded base model (the reference DPO trained against)."""
    from peft import get_peft_model

    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.data.kinds import rows_of
    from qwenvl_ft.evaluation.preference import reward_metrics
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor

    cfg = validate(compose(["recipe=dpo_demo", *SMALL], output_dir=str(tmp_path)))
    _, pairs = rows_of(methods.get("dpo")).read_rows(cfg.data)
    processor = build_processor(cfg.model, cfg.data)
    collator = VisionPreferenceCollator(processor, cfg.data)
    base = build_base_model(cfg.model, cfg.adapter)
    tuned = get_peft_model(build_base_model(cfg.model, cfg.adapter), build_lora_config(base, cfg.model, cfg.adapter))
    torch.manual_seed(0)
    with torch.no_grad():
        for param_name, param in tuned.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.05)
    disabled = reward_metrics(tuned, None, collator, pairs, beta=0.1, batch_size=2)
    separate = reward_metrics(tuned, base, collator, pairs, beta=0.1, batch_size=2)
    assert disabled == pytest.approx(separate, abs=1e-5)
    assert disabled["reward_margin"] != 0.0, "the adapter must move the policy for the check to mean anything"
    assert 0.0 <= disabled["reward_accuracy"] <= 1.0
