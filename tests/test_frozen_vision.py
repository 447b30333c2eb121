"""A vision tower that does not train stays out of autograd (qwenvl_ft/modeling/frozen_vision.py), on every family:
the trainable parameters get exactly the gradients they got with the whole tower in the graph, and a tower that
trains (vision LoRA) keeps its gradients."""

import pytest
import torch
from PIL import Image

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.collate import VisionChatCollator

from family_models import TEST_MODELS

ROWS = [
    {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                               {"type": "text", "text": "What is in the image?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}],
     "images": [Image.new("RGB", (56, 84), (200, 40, 40))], "source": "test:0"},
    {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                               {"type": "text", "text": "Describe it."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a blue square on grey"}]}],
     "images": [Image.new("RGB", (112, 56), (40, 40, 200))], "source": "test:1"},
]


def _lora_model(option, *overrides):
    """The LoRA model as a training run has it: built by build_model, checkpointing on (non-reentrant), and the
    input-embedding hooks the Trainer and PEFT install (`enable_input_require_grads`), which reach the tower."""
    from qwenvl_ft.modeling.build import build_model, build_processor

    cfg = validate(compose(["recipe=demo", f"model={option}", "adapter=lora", "model.gradient_checkpointing=true",
                            *overrides], output_dir="/tmp/unused"))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = VisionChatCollator(build_processor(cfg.model, cfg.data), cfg.data)(ROWS)
    return model, batch


def _step(model, batch):
    """(gradients of the trainable parameters, whether the first ViT block's input required grad)."""
    from qwenvl_ft.modeling.build import model_parts

    seen = []
    probe = model_parts(model).vision_blocks[0].register_forward_pre_hook(  # runs after the detaching hook
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).requires_grad),
        with_kwargs=True)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    probe.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}, seen[0]


def _with_and_without_the_hook(option, *overrides):
    """The step's gradients and first-block flag with the detaching hook, then with it removed (the whole tower in
    the graph, as before the fix). No dropout, so that both steps compute the same thing."""
    from qwenvl_ft.modeling.build import model_parts

    model, batch = _lora_model(option, "adapter.dropout=0.0", *overrides)
    with_hook = _step(model, batch)
    model_parts(model).vision._qwenvl_ft_detach_hook.remove()
    return with_hook, _step(model, batch)


def _assert_same(first: dict, second: dict):
    assert first.keys() == second.keys() and first
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("option", TEST_MODELS)
def test_frozen_tower_leaves_autograd_and_every_gradient_unchanged(option):
    (cut, cut_requires_grad), (whole, _) = _with_and_without_the_hook(
        option, "model.freeze_vision_tower=true", "adapter.vision_lora=false")
    assert not cut_requires_grad  # without the hook, True where transformers hooks the patch embedding
    _assert_same(cut, whole)


@pytest.mark.parametrize("option", TEST_MODELS)
def test_a_tower_with_lora_keeps_its_gradients(option):
    (with_hook, _), (without, _) = _with_and_without_the_hook(
        option, "model.freeze_vision_tower=true", "adapter.vision_lora=true")
    vision_lora_b = [name for name in with_hook if "lora_B" in name and ".visual.blocks." in name]
    assert vision_lora_b and all(with_hook[name].abs().sum() > 0 for name in vision_lora_b)
    _assert_same(with_hook, without)
