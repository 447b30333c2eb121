"""The vision tower's patch embedding as one matrix product on a CPU (qwenvl_ft/modeling/patch_embed.py), on every
family: the model's loss and every gradient (vision tower included: full fine-tuning) equal those of PyTorch's
Conv3d, and the parameters and state dict are the Conv3d's."""

import pytest
import torch
from PIL import Image
from torch import nn

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.collate import VisionChatCollator

from family_models import TEST_MODELS

ROWS = [
    {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                               {"type": "text", "text": "What is in the image?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]}],
     "images": [Image.effect_noise((56, 84), 40).convert("RGB")], "source": "test:0"},
    {"messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                               {"type": "text", "text": "Describe them."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "two grey squares"}]}],
     "images": [Image.effect_noise((112, 56), 60).convert("RGB"), Image.effect_noise((28, 28), 20).convert("RGB")],
     "source": "test:1"},
]


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("option", TEST_MODELS)
def test_patch_embedding_as_a_matmul_equals_conv3d(option, monkeypatch):
    from qwenvl_ft.modeling.build import build_model, build_processor, model_parts
    from qwenvl_ft.modeling.patch_embed import PatchConv3d

    cfg = validate(compose(["recipe=demo", f"model={option}", "adapter=full", "model.freeze_vision_tower=false"],
                           output_dir="/tmp/unused"))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.adapter).train()
    batch = VisionChatCollator(build_processor(cfg.model, cfg.data), cfg.data)(ROWS)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is PatchConv3d for m in convs)
    stem = model_parts(model).vision
    assert any(p.requires_grad for p in stem.parameters())  # the tower trains: its gradients are compared too
    keys = {k: v.shape for k, v in model.state_dict().items()}

    convolved = []
    original = nn.Conv3d._conv_forward
    monkeypatch.setattr(nn.Conv3d, "_conv_forward", lambda self, *args: convolved.append(1) or original(self, *args))
    matmul = _step(model, batch)
    assert not convolved  # every patch went through the matrix product
    for conv in convs:
        conv.__class__ = nn.Conv3d  # PyTorch's own convolution, same parameters
    reference = _step(model, batch)
    assert convolved
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    torch.testing.assert_close(matmul[0], reference[0], rtol=1e-5, atol=1e-6)
    assert matmul[1].keys() == reference[1].keys()
    assert any("patch_embed" in name for name in reference[1])
    for name, grad in reference[1].items():
        torch.testing.assert_close(matmul[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_other_inputs_and_convolutions_keep_conv3d():
    from qwenvl_ft.modeling.patch_embed import PatchConv3d, embed_patches_as_matmul

    model = nn.Sequential(nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4)),
                          nn.Conv3d(3, 8, kernel_size=3, padding=1))
    assert embed_patches_as_matmul(model) == 1
    assert type(model[0]) is PatchConv3d and type(model[1]) is nn.Conv3d
    video = torch.randn(2, 3, 4, 8, 8)  # several blocks per input: Conv3d's own forward
    expected = nn.functional.conv3d(video, model[0].weight, model[0].bias, stride=(2, 4, 4))
    torch.testing.assert_close(model[0](video), expected)
    patches = torch.randn(5, 3, 2, 4, 4)
    expected = nn.functional.conv3d(patches, model[0].weight, model[0].bias, stride=(2, 4, 4))
    torch.testing.assert_close(model[0](patches), expected, rtol=1e-5, atol=1e-6)
