"""Tier 2: the tiny random Qwen2-VL fine-tuned end to end on CPU with every adapter method."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.modeling.random_init import materialize
from qwenvl_ft.commands.train import train

pytestmark = pytest.mark.slow

QUICK = ["recipe=demo", "data.shapes.num_train=64", "data.shapes.num_eval=4", "trainer.max_steps=16",
         "trainer.logging_steps=1", "trainer.eval_generation=false", "trainer.disable_tqdm=true",
         "optimizer.scheduler=constant", "optimizer.warmup_ratio=0"]


def _run(tmp_path, *overrides):
    cfg = compose(QUICK + list(overrides), output_dir=str(tmp_path / "run"))
    metrics = train(cfg)
    return validate(cfg), metrics, tmp_path / "run"


def _assert_loss_fell(out, factor):
    losses = [e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < factor * first, losses


# A random base has near-uniform outputs; adapters on every projection with a high lr move it within 16 steps.
ADAPTER_FAST = ["optimizer.lr=3e-2", "adapter.r=16", "adapter.alpha=32",
                "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_adapter_methods_train_and_load_back(tmp_path, method):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    # Vision tower and merger frozen here, so that only the adapter trains and the base must stay unchanged.
    typed, metrics, out = _run(tmp_path, f"adapter={method}", "model.freeze_vision_tower=true",
                               "model.freeze_merger=true", *ADAPTER_FAST)
    _assert_loss_fell(out, 0.97)
    final = out / "final"
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] == (method == "dora")
    adapter = load_file(str(final / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero and must have trained"
    assert not any("visual" in k for k in adapter), "the frozen vision tower got adapter weights"
    assert all(".language_model." in k for k in adapter)

    base_path = materialize(typed.model.architecture)
    base = Qwen2VLForConditionalGeneration.from_pretrained(base_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(final))
    assert AutoProcessor.from_pretrained(str(final)).tokenizer.convert_tokens_to_ids("<|image_pad|>") > 0
    merged = model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("proj.weight") and ".language_model." in k for k in changed)


def test_full_fine_tune_trains_unfrozen_parts_only(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    typed, metrics, out = _run(tmp_path, "adapter=full", "model.freeze_vision_tower=true",
                               "model.freeze_merger=false")
    _assert_loss_fell(out, 0.8)
    base = Qwen2VLForConditionalGeneration.from_pretrained(materialize(typed.model.architecture)).state_dict()
    tuned = Qwen2VLForConditionalGeneration.from_pretrained(str(out / "final")).state_dict()
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    frozen_vision = {k for k in base if ".visual." in k and ".merger." not in k}
    assert frozen_vision and not (changed & frozen_vision), "the frozen vision tower changed"
    assert any(".visual.merger." in k for k in changed), "the merger did not train"
    assert any(".language_model.layers." in k for k in changed), "the language model did not train"


def test_outputs_hold_config_tensorboard_and_processor(tmp_path):
    typed, metrics, out = _run(tmp_path, "adapter=lora")
    assert (out / "config.yaml").read_text().startswith("model:")
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "final" / "processor_config.json").exists() or (out / "final" / "preprocessor_config.json").exists()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 16


def test_separate_vision_and_merger_learning_rates(tmp_path):
    from qwenvl_ft.modeling.build import build_model, optimizer_param_groups

    typed = validate(compose(QUICK + ["adapter=full", "optimizer.vision_lr=1e-5", "optimizer.merger_lr=1e-4",
                                      "optimizer.lr=1e-3"], output_dir=str(tmp_path)))
    model = build_model(typed.model, typed.adapter)
    groups = optimizer_param_groups(model, typed.optimizer, decay_names=[])
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in groups}
    visual = model.model.visual
    merger = sum(p.numel() for p in visual.merger.parameters())
    vision = sum(p.numel() for p in visual.parameters()) - merger
    assert by_lr == {1e-5: vision, 1e-4: merger, 1e-3: sum(p.numel() for p in model.parameters()) - vision - merger}
    # and training with them runs
    _, metrics, _ = _run(tmp_path, "adapter=full", "optimizer.vision_lr=1e-5", "optimizer.merger_lr=1e-4")
    assert metrics["global_step"] == 16


def test_demo_recipe_learns_the_task(tmp_path, caplog):
    """The README's demo: loss falls and held-out exact match rises clearly (fixed seeds); it prints its start-up
    budget and ends with its performance line, both also in the metrics (and so in summary.json)."""
    cfg = compose(["recipe=demo", "trainer.disable_tqdm=true"], output_dir=str(tmp_path / "demo"))
    with caplog.at_level("INFO", logger="qwenvl_ft"):
        metrics = train(cfg)
    assert metrics["last_logged_loss"] < 0.2 * metrics["first_logged_loss"]
    assert metrics["eval_exact_match_before"] <= 0.1
    assert metrics["eval_exact_match_after"] >= 0.7

    phases = ["imports (torch, transformers, TRL, PEFT)", "data check", "model load", "trainer build"]
    budget = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up:"))
    assert all(f"  {phase}  " in budget for phase in phases), budget
    assert set(phases) <= set(metrics["startup_s"]) and set(phases) <= set(metrics["startup_cpu_s"])
    assert metrics["first_step_s"] > 0 and all(v >= 0 for v in metrics["startup_s"].values())
    assert caplog.records[-1].getMessage().startswith("performance: ")
    assert {"tokens_per_s", "samples_per_s", "padding_fraction", "step_time_s", "data_wait_fraction",
            "peak_rss_gib", "model_tflops_per_s_per_device"} <= set(metrics["performance"])


def test_vision_lora_with_frozen_language_model(tmp_path):
    """LoRA on the vision blocks only: adapter weights land in the vision tower and nowhere else."""
    typed, metrics, out = _run(tmp_path, "adapter=lora", "adapter.vision_lora=true",
                               "model.freeze_language_model=true", "model.freeze_merger=true",
                               "model.freeze_vision_tower=true", "trainer.max_steps=4")
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all(".visual.blocks." in k for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


@pytest.mark.gpu
def test_qlora_bf16_on_cuda(tmp_path):
    """The QLoRA path as users run it: NF4 base, bf16 compute and autocast, fused AdamW, tf32."""
    typed, metrics, out = _run(tmp_path, "adapter=qlora", "model.dtype=bfloat16", "trainer.precision=bf16",
                               "trainer.tf32=true", "optimizer=adamw_fused", *ADAPTER_FAST)
    _assert_loss_fell(out, 0.97)
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_qlora_with_a_frozen_4bit_tower_and_a_merger_that_trains_runs_in_fp32(tmp_path):
    """The merger trains in full after a frozen 4-bit tower, in an fp32 run: TRL's cast of trainable parameters
    to bf16 used to leave it with bf16 weights and fp32 inputs, and the first forward (the trackers' gallery)
    failed in LayerNorm ("mixed dtype (CPU)")."""
    typed, metrics, out = _run(tmp_path, "adapter=qlora", "model.freeze_vision_tower=true",
                               "model.freeze_merger=false", "trainer.max_steps=3", "trainer.eval_generation=true",
                               "data.shapes.num_eval=2", "trainer.max_new_tokens=2")
    assert metrics["global_step"] == 3 and "eval_exact_match_after" in metrics
    saved = load_file(str(out / "final" / "adapter_model.safetensors"))
    merger = {k: v for k, v in saved.items() if ".merger." in k}
    assert merger and all(v.dtype == torch.float32 for v in merger.values())


def test_qlora_with_trainable_vision_tower_and_generation_checks(tmp_path):
    """QLoRA where the vision tower and merger train in full (kept out of 4-bit) and the before/after generation
    check runs in eval mode between training steps on CPU."""
    from qwenvl_ft.modeling.build import build_model

    typed, metrics, out = _run(tmp_path, "adapter=qlora", "model.freeze_vision_tower=false",
                               "model.freeze_merger=false", "trainer.eval_generation=true", "trainer.max_steps=6",
                               "data.shapes.num_eval=4", "trainer.max_new_tokens=4")
    assert metrics["global_step"] == 6 and "eval_exact_match_after" in metrics
    model = build_model(typed.model, typed.adapter)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert any(kind == "Linear4bit" for name, kind in kinds.items() if ".language_model." in name)
    assert not any(kind == "Linear4bit" for name, kind in kinds.items() if ".visual." in name)
