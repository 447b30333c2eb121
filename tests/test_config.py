"""Tier 1: composing and validating configs (seconds, no torch needed)."""

import subprocess
import sys

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.adapter import AdapterMethod
from qwenvl_ft.config.compose import available_recipes, compose, validate
from qwenvl_ft.config.model import ModelFamily
from qwenvl_ft.errors import ConfigError

# Recipes whose data lives on the user's disk need data.path to validate.
NEEDS_PATH = {"lora_2b_coco", "full_7b_llava", "lora_qwen25vl_3b_llava", "dpo_lora_2b", "lora_qwen3vl_8b_llava",
              "lora_7b_llava_ddp", "lora_qwen3_vl_30b_a3b_llava", "lora_qwen3_5_35b_a3b_llava",
              "lora_qwen3_5_9b_llava", "lora_qwen25vl_7b_grounding"}


@pytest.mark.parametrize("recipe", sorted(available_recipes()))
def test_every_recipe_composes_and_validates(recipe):
    overrides = [f"recipe={recipe}"] + (["data.path=/data/train.json"] if recipe in NEEDS_PATH else [])
    typed = validate(compose(overrides, output_dir="/tmp/out"))
    assert typed.output_dir == "/tmp/out"


def test_every_config_file_opens_with_a_header_comment():
    from qwenvl_ft.config.compose import config_dir

    files = list(available_recipes().values()) + sorted(config_dir().rglob("*.yaml"))
    assert len(files) > 20
    for path in files:
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert path.read_text().startswith("# "), f"{path} must open with a comment saying what it is for"
        assert "qwenvl-ft " in header, f"{path}: the header comment should show how to launch it"


def test_qlora_7b_amazon_matches_the_reference_settings():
    typed = validate(compose(["recipe=qlora_7b_amazon"], output_dir="/tmp/out"))
    assert typed.model.name_or_path == "Qwen/Qwen2-VL-7B-Instruct"
    assert typed.adapter.method == AdapterMethod.qlora and typed.adapter.load_in_4bit
    assert typed.adapter.bnb_4bit_quant_type == "nf4" and typed.adapter.bnb_4bit_use_double_quant
    assert (typed.adapter.r, typed.adapter.alpha, typed.adapter.dropout) == (8, 16, 0.05)
    assert list(typed.adapter.target_modules) == ["q_proj", "v_proj"]
    assert typed.data.system_message == "You are an expert product description writer for Amazon."
    assert "##PRODUCT NAME##" in typed.data.prompt and "##CATEGORY##" in typed.data.prompt
    t, o = typed.trainer, typed.optimizer
    assert (t.epochs, t.batch_size, t.gradient_accumulation_steps) == (3, 4, 8)
    assert (o.lr, o.scheduler.value, o.warmup_ratio, o.max_grad_norm, o.name) == \
        (2e-4, "constant", 0.03, 0.3, "adamw_torch_fused")
    assert t.precision.value == "bf16" and t.tf32 and "tensorboard" in t.report_to
    assert typed.model.gradient_checkpointing


def test_group_swap_and_override():
    typed = validate(compose(["recipe=demo", "model=qwen2_5_vl_3b", "adapter=qlora", "optimizer.lr=1e-4"],
                             output_dir="/tmp/out"))
    assert typed.model.family == ModelFamily.qwen2_5_vl
    assert typed.adapter.method == AdapterMethod.qlora
    assert typed.optimizer.lr == 1e-4


def test_real_architecture_facts():
    two = validate(compose(["model=qwen2_vl_2b"], output_dir="/tmp/o")).model.architecture
    seven = validate(compose(["model=qwen2_vl_7b"], output_dir="/tmp/o")).model.architecture
    assert (two.hidden_size, two.intermediate_size, two.num_hidden_layers, two.num_attention_heads,
            two.num_key_value_heads, two.vocab_size, two.tie_word_embeddings) == (1536, 8960, 28, 12, 2, 151936, True)
    assert (seven.hidden_size, seven.intermediate_size, seven.num_attention_heads, seven.num_key_value_heads,
            seven.vocab_size, seven.tie_word_embeddings) == (3584, 18944, 28, 4, 152064, False)
    for arch in (two, seven):
        assert list(arch.mrope_section) == [16, 24, 24] and arch.rope_theta == 1e6
        assert (arch.vision_depth, arch.vision_embed_dim, arch.vision_num_heads, arch.vision_mlp_ratio,
                arch.patch_size, arch.temporal_patch_size, arch.spatial_merge_size) == (32, 1280, 16, 4, 14, 2, 2)


def test_typo_in_override_names_the_key_and_lists_valid_keys(capsys):
    assert main(["train", "recipe=demo", "optimizer.lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optimizer.lrr'" in err
    assert "Did you mean 'optimizer.lr'?" in err
    assert "Valid keys of optimizer: name, lr," in err
    assert "Traceback" not in err


def test_nested_typo_and_top_level_typo(capsys):
    assert main(["train", "model.architecture.hiden_size=8"]) == 2
    assert "Valid keys of model.architecture" in capsys.readouterr().err
    assert main(["train", "sed=3"]) == 2
    assert "Did you mean 'seed'?" in capsys.readouterr().err


def test_wrong_type_and_wrong_choice_fail_at_compose_time():
    with pytest.raises(ConfigError, match="could not be converted to Float"):
        compose(["optimizer.lr=fast"], output_dir="/tmp/o")
    with pytest.raises(ConfigError, match=r"expected one of \[full, lora, dora, qlora\]"):
        compose(["adapter.method=dorra"], output_dir="/tmp/o")
    # a group option that does not exist: a did-you-mean and the options (was Hydra's "Could not find 'model/qwen3'")
    with pytest.raises(ConfigError, match=r"unknown model 'qwen3'. Did you mean .*\(options: .*qwen3_vl_8b"):
        compose(["model=qwen3"], output_dir="/tmp/o")


def test_unknown_key_inside_a_recipe_file_is_reported(tmp_path):
    (tmp_path / "broken.yaml").write_text("# broken\noptimizer:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match="lrr"):
        compose(["recipe=broken"], extra_recipe_dirs=[str(tmp_path)], output_dir="/tmp/o")


@pytest.mark.parametrize("override, message", [
    ("adapter.dropout=1.5", "adapter.dropout must be in"),
    ("optimizer.lr=-1", "optimizer.lr must be > 0"),
    ("adapter.method=qlora", "needs adapter.load_in_4bit=true"),
    ("data.resized_height=280", "must be set together"),
    ("model.family=qwen2_5_vl", "needs model.architecture.vision_intermediate_size"),
    ("model=tiny_qwen2_5_vl model.architecture.vision_fullatt_block_indexes=[2]", "below vision_depth"),
    ("model=tiny_qwen2_5_vl model.architecture.vision_window_size=42", "multiple of patch_size"),
    ("model=tiny_qwen3_vl model.architecture.deepstack_visual_indexes=[2]", "deepstack_visual_indexes must be"),
    ("model=tiny_qwen3_vl model.architecture.vision_num_position_embeddings=200", "must be a square"),
    ("model=tiny_qwen3_vl model.architecture.mrope_section=[24,20,20]", "must sum to head_dim/2 = 8"),
])
def test_range_checks(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["recipe=demo", *override.split()], output_dir="/tmp/o")


def test_user_recipe_directory(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "# my recipe\ndefaults:\n  - override /adapter: dora\n\noptimizer:\n  lr: 0.005\n")
    typed = validate(compose(["recipe=mine"], extra_recipe_dirs=[str(tmp_path)], output_dir="/tmp/o"))
    assert typed.adapter.method == AdapterMethod.dora and typed.optimizer.lr == 0.005


def test_cfg_job_prints_without_importing_torch():
    code = ("import sys; from qwenvl_ft.commands.cli import main; rc = main(['train', 'recipe=qlora_7b_amazon', '--cfg', "
            "'job']); assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "name_or_path: Qwen/Qwen2-VL-7B-Instruct" in out.stdout
    assert "method: qlora" in out.stdout


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (root / "README.md").read_text()
