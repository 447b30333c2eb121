"""Model families as declarations (qwenvl_ft/families): the registry, what each declaration names, and that nothing
outside the family modules knows a family by name."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_ft import families
from qwenvl_ft.config.compose import compose, validate

from family_models import TEST_MODELS

PACKAGE = Path(families.__file__).resolve().parent.parent
# Identifiers of a family: module, class, config and option names (qwen2_vl, Qwen2VLConfig, qwen2_5_vl,
# Qwen2_5_VLProcessor, qwen3_vl, Qwen3VL...), also in strings; "qwen3" in prose too.
FAMILY_SPECIFIC = re.compile(r"qwen2_vl|qwen2vl|qwen2_5|qwen3", re.IGNORECASE)


def test_no_family_specific_name_outside_the_family_modules():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "families":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY_SPECIFIC.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "family-specific names belong in qwenvl_ft/families:\n" + "\n".join(offenders)


def test_importing_the_families_imports_neither_torch_nor_transformers_nor_the_config():
    code = ("import sys; from qwenvl_ft import families; families.names(); "
            "print(sorted(m for m in ('torch', 'transformers', 'qwenvl_ft.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_registry_finds_every_family_module():
    # modules named with a leading underscore hold what family modules share (the registry skips them)
    modules = {p.stem for p in (PACKAGE / "families").glob("*.py") if not p.stem.startswith("_")} - {"base"}
    assert set(families.names()) == modules >= {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    assert families.DEFAULT in families.names()
    known = "qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe"
    with pytest.raises(ValueError, match=f"unknown model family 'nope'; known: {known}"):
        families.get("nope")


def test_model_family_choices_are_the_registered_names():
    from qwenvl_ft.config.model import ModelFamily
    from qwenvl_ft.errors import ConfigError

    assert [f.value for f in ModelFamily] == families.names()
    with pytest.raises(ConfigError, match="qwen3_vl"):  # the error lists the valid choices
        compose(["recipe=demo", "model.family=qwen4_vl"], output_dir="/tmp/unused")


@pytest.mark.parametrize("family", families.all_families(), ids=lambda f: f.name)
def test_declarations_name_what_exists(family):
    """Classes import, the test model is of this family, and every attribute path resolves on a model built from
    the test model's config on the meta device."""
    import torch

    from transformers.quantizers.quantizers_utils import should_convert_module

    from qwenvl_ft.estimate.counts import hf_config
    from qwenvl_ft.modeling.build import build_processor

    typed = validate(compose(["recipe=demo", f"model={family.test_model}"], output_dir="/tmp/unused"))
    assert typed.model.family.value == family.name
    config = hf_config(typed.model)
    assert isinstance(config, family.load_config_class()) and config.model_type == family.name
    assert families.of_config(config) is family
    with torch.device("meta"):
        model = family.load_model_class()._from_config(config)
    assert families.of_model(model) is family
    layer, block = family.wrap_classes()
    parts = family.parts(model)
    arch = typed.model.architecture
    assert all(isinstance(m, layer) for m in parts.decoder_layers)
    assert len(parts.decoder_layers) == arch.num_hidden_layers
    assert all(isinstance(m, block) for m in parts.vision_blocks) and len(parts.vision_blocks) == arch.vision_depth
    for path in (*family.vision_stem, *family.projectors, family.embeddings):
        assert model.get_submodule(path) is not None
    names = [name for name, _ in model.named_modules()]
    for pattern in family.never_quantized:  # bitsandbytes' skip patterns: each names at least one module
        assert any(not should_convert_module(name, [pattern]) for name in names), pattern
    vision = {id(p) for p in parts.vision.parameters()}
    assert all(id(p) in vision for projector in parts.projectors for p in projector.parameters())
    leaves = {name.rsplit(".", 1)[-1] for layer in parts.decoder_layers for name, _ in layer.named_modules()}
    # every target name is a Linear leaf of the decoder layers, or (MoE) names fused expert weights they all have
    expert_names = {name for name, _ in family.expert_lora_targets}
    assert set(family.language_lora_targets) <= leaves | expert_names
    for layer in parts.decoder_layers:
        layer_parameters = {name for name, _ in layer.named_parameters()}
        assert set(family.expert_parameters) <= layer_parameters
        assert all(layer.get_parameter(p).dim() == 3 for p in family.expert_parameters)
    if family.moe_block_class:
        assert all(isinstance(layer.mlp, family.load_moe_block_class()) for layer in parts.decoder_layers)
    processor = build_processor(typed.model, typed.data)
    assert families.of_processor(processor) is family
    assert processor.image_processor.patch_size == family.patch_size == typed.model.architecture.patch_size
    assert family.factor == family.patch_size * processor.image_processor.merge_size


def test_a_lora_target_the_family_lacks_is_named():
    from qwenvl_ft.errors import ConfigError
    from qwenvl_ft.estimate.counts import count_parameters

    with pytest.raises(ConfigError, match=r"adapter.target_modules has \['qkv'\].*valid: \['q_proj'"):
        count_parameters(validate(compose(["recipe=demo", "adapter=lora", "adapter.target_modules=[q_proj,qkv]"],
                                          output_dir="/tmp/unused")))


def test_every_family_has_a_test_model_option():
    from qwenvl_ft.config.compose import config_dir

    options = {p.stem for p in (config_dir() / "model").glob("*.yaml")}
    assert set(TEST_MODELS) <= options


def test_a_checkpoint_of_another_family_is_refused_before_loading():
    from qwenvl_ft.config.model import ModelConfig, ModelFamily
    from qwenvl_ft.errors import ConfigError
    from qwenvl_ft.modeling.build import check_family, model_source

    typed = validate(compose(["recipe=demo"], output_dir="/tmp/unused"))
    source = model_source(typed.model)  # a qwen2_vl checkpoint
    check_family(typed.model, source)
    with pytest.raises(ConfigError, match="model.family=qwen3_vl but .* is a qwen2_vl checkpoint"):
        check_family(ModelConfig(name_or_path=source, family=ModelFamily.qwen3_vl), source)
