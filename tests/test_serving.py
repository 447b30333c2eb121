"""publish/serving.py: whether vLLM can serve an adapter unmerged, read from the adapter and the family's
declaration; said at the start of training (run log), by `merge` (log, merge_info.json, card) and on the card of
final/."""

import json
import logging
from types import SimpleNamespace

import pytest

from qwenvl_ft import families
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.publish.serving import EXPERTS, SAVED_COPIES, VISION, serving_of_folder, serving_of_model, \
    vllm_serving

LANGUAGE = ["base_model.model.model.language_model.layers.0.self_attn.q_proj",
            "base_model.model.model.language_model.layers.0.mlp.down_proj"]


def test_language_model_lora_is_servable():
    serving = vllm_serving(families.get("qwen2_vl"), LANGUAGE)
    assert serving.servable and serving.reasons == ()
    assert "vLLM can serve this adapter unmerged" in serving.sentence()


def test_vision_lora_and_saved_copies_are_not():
    family = families.get("qwen3_vl")
    vision = vllm_serving(family, LANGUAGE + ["base_model.model.model.visual.blocks.0.attn.qkv"])
    assert not vision.servable and vision.reasons == (VISION,)
    copies = vllm_serving(family, LANGUAGE, modules_to_save=["model.visual.merger"])
    assert copies.reasons == (SAVED_COPIES.format(names="model.visual.merger"),)
    sentence = copies.sentence()
    assert sentence.startswith("vLLM cannot serve this adapter unmerged") and "`qwenvl-ft merge`" in sentence
    # a module whose name only starts like the vision tower's is not in it
    assert vllm_serving(family, ["model.visualizer.fc"]).servable


def test_expert_lora_is_not_servable_where_the_family_declares_experts():
    """Families with fused experts declare `expert_parameters`; one without the attribute has no experts."""
    moe = SimpleNamespace(vision_tower="model.visual",
                          expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    by_target = vllm_serving(moe, LANGUAGE, target_parameters=["mlp.experts.gate_up_proj"])
    assert by_target.reasons == (EXPERTS,)
    by_name = vllm_serving(moe, LANGUAGE + ["model.language_model.layers.3.mlp.experts.down_proj"])
    assert by_name.reasons == (EXPERTS,)
    assert vllm_serving(moe, LANGUAGE + ["model.language_model.layers.3.mlp.shared_expert.down_proj"]).servable
    dense = families.get("qwen3_5")
    assert vllm_serving(dense, LANGUAGE, target_parameters=["mlp.experts.gate_up_proj"]).servable


@pytest.mark.parametrize("overrides, reasons", [
    ([], ["modules_to_save"]),  # the tiny default trains its vision tower and merger in full
    (["model.freeze_vision_tower=true", "model.freeze_merger=true"], []),
    (["model.freeze_vision_tower=true", "model.freeze_merger=true", "adapter.vision_lora=true"], ["vision tower"]),
])
def test_the_models_the_run_builds(overrides, reasons, tmp_path):
    from qwenvl_ft.modeling.build import build_model

    typed = validate(compose(["recipe=demo", "model=tiny_qwen3_5", "adapter=lora", *overrides],
                             output_dir=str(tmp_path)))
    model = build_model(typed.model, typed.adapter)  # the PEFT model, as training holds it
    serving = serving_of_model(model, families.of_model(model))
    assert len(serving.reasons) == len(reasons)
    assert all(word in reason for word, reason in zip(reasons, serving.reasons))
    model.save_pretrained(str(tmp_path / "adapter"))  # the saved folder says the same
    assert serving_of_folder(tmp_path / "adapter", families.of_model(model)) == serving


@pytest.mark.slow
def test_training_merge_and_cards_say_it(tmp_path, caplog):
    """A tiny run that trains its vision tower in full (modules_to_save): the run log, the card of final/, merge's
    log, merge_info.json and the merged card all say vLLM cannot serve the adapter unmerged, and that merge does."""
    from qwenvl_ft.commands.merge import merge
    from qwenvl_ft.commands.train import train

    run = tmp_path / "outputs" / "demo" / "exp1"
    data = ["recipe=demo", "model=tiny_qwen3_5", "adapter=lora", "data.shapes.num_train=8", "data.shapes.num_eval=2"]
    with caplog.at_level(logging.INFO, logger="qwenvl_ft"):
        train(compose(data + ["trainer.max_steps=1", "trainer.eval_generation=false"], output_dir=str(run)))
        merge(compose(data, config_name="merge", output_dir=str(run / "merge")))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving: ")]
    assert len(said) == 2 and all("vLLM cannot serve this adapter unmerged" in line for line in said)
    assert "the merged folder is a plain model" in said[1]
    final_card = (run / "final" / "README.md").read_text()
    assert "| serving | vLLM cannot serve this adapter unmerged" in final_card and "modules_to_save" in final_card
    assert json.loads((run / "merged" / "merge_info.json").read_text())["adapter_servable_by_vllm"] is False
    assert "| serving | vLLM serves this merged folder as a plain model" in (run / "merged" / "README.md").read_text()
