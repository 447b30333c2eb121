"""Padding-free DPO (qwenvl_ft/modeling/padding_free.py, data.packing=true with trainer=dpo).

The claim: TRL's DPO loss, its logged metrics and every gradient are the same whether the batch runs padded or
padding-free with each pair's images encoded once -- on the tiny random model of every family in fp32 (Qwen3-VL's
DeepStack features and visual_pos_masks included), for a batch whose pairs differ in image size, image count and
answer length.
"""

import json

import pytest
import torch
from PIL import Image

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.preference import to_pair_dataset
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.modeling.padding_free import repeated_half, share_pair_images, unpad_language_model

from family_models import TEST_MODELS

QUICK = ["recipe=dpo_demo", "data.shapes.num_train=64", "data.shapes.num_eval=8", "trainer.max_steps=8",
         "trainer.logging_steps=1", "trainer.disable_tqdm=true", "trainer.report_to=[none]"]


def _text(role, text):
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _pair(sizes, question, chosen, rejected, index):
    content = [{"type": "image", "text": None} for _ in sizes] + [{"type": "text", "text": question}]
    return {"prompt": [{"role": "user", "content": content}], "chosen": [_text("assistant", chosen)],
            "rejected": [_text("assistant", rejected)], "source": f"test:{index}",
            "images": [Image.new("RGB", size, (50 * i + 20, 100, 30 * index)) for i, size in enumerate(sizes)]}


# Pairs of different image sizes and counts (one without an image) and answers of different lengths, so that the
# padded batch has padding in every place it can: after short prompts, after short answers, between chosen and
# rejected of one pair.
PAIRS = [
    _pair([(56, 56)], "What is in the image?", "a red circle", "a blue square drawn in the middle of the image", 0),
    _pair([(112, 84)], "Describe the image.", "The quick brown fox jumps over the lazy dog twice.", "a fox", 1),
    _pair([], "Say hello.", "hello", "goodbye to everyone in the room", 2),
    _pair([(28, 56), (84, 56)], "Compare the two images.", "the first is smaller", "they are the same", 3),
]


@pytest.fixture(scope="module", params=TEST_MODELS)
def trainer(request, tmp_path_factory):
    from qwenvl_ft.data.collate_preference import VisionPreferenceCollator
    from qwenvl_ft.trainers.dpo import build_trainer
    from qwenvl_ft.modeling.build import build_base_model, build_lora_config, build_processor

    out = tmp_path_factory.mktemp("dpo_packing")
    # LoRA on the language model and the vision blocks, merger trained: gradients reach every part
    typed = validate(compose(QUICK + [f"model={request.param}", "adapter.vision_lora=true",
                                      "model.freeze_merger=false"], output_dir=str(out)))
    processor = build_processor(typed.model, typed.data)
    base = build_base_model(typed.model, typed.adapter)
    rows = to_pair_dataset(PAIRS)
    trainer = build_trainer(typed, base, build_lora_config(base, typed.model, typed.adapter), processor,
                            VisionPreferenceCollator(processor, typed.data), rows, None)
    # a policy different from the reference, so that the log-ratios and rewards are not all zero
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return trainer


def _loss_metrics_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), metrics, grads


def test_padding_free_dpo_equals_padded(trainer):
    from qwenvl_ft.modeling.build import model_parts

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    mask = batch["attention_mask"]
    assert mask.shape[0] == 8 and (mask == 0).float().mean() > 0.15, "the batch should have padding to remove"
    padded = _loss_metrics_and_grads(trainer, batch)

    parts = model_parts(trainer.model)
    seen = {"tokens": [], "patches": []}
    probes = [parts.decoder_layers[0].register_forward_hook(
                  lambda m, a, o: seen["tokens"].append(tuple(a[0].shape[:2]))),
              parts.vision_blocks[0].register_forward_hook(lambda m, a, o: seen["patches"].append(a[0].shape[0]))]
    handles = unpad_language_model(trainer.model) + share_pair_images(trainer.model)
    try:
        packed = _loss_metrics_and_grads(trainer, batch)
    finally:
        for handle in handles + probes:
            handle.remove()

    # it ran padding-free: decoder layers saw one row of the real tokens, the vision tower each image once,
    # in the policy forward and in the reference forward (adapter disabled)
    real_tokens, all_patches = int(mask.sum()), batch["pixel_values"].shape[0]
    assert seen["tokens"] == [(1, real_tokens)] * 2, seen["tokens"]
    assert seen["patches"] == [all_patches // 2] * 2
    # ... and computed the same thing
    assert torch.allclose(packed[0], padded[0], atol=1e-5), (packed[0], padded[0])
    assert packed[1].keys() == padded[1].keys()
    for key in set(padded[1]) - {"num_tokens"}:  # num_tokens is a running total over calls
        assert packed[1][key] == pytest.approx(padded[1][key], abs=1e-4), key
    assert abs(padded[1]["rewards/margins"]) > 1e-3, "the rewards are all zero: the comparison would be vacuous"
    assert packed[2].keys() == padded[2].keys()
    assert any("visual" in name for name in padded[2]) and any("language_model" in name for name in padded[2])
    for name, grad in padded[2].items():
        assert grad.abs().max() > 0, f"{name}: no gradient in the padded run"
        assert torch.allclose(packed[2][name], grad, atol=1e-5, rtol=1e-4), name


def test_padding_free_dpo_on_the_one_call_varlen_path(trainer, monkeypatch):
    """With model.varlen_attention's kernel (the CPU reference standing in for torch's CUDA one, as in
    tests/test_varlen_attention.py): the unpadded language model attends in one call per attention layer, from the
    offsets the hook builds on the device and the padded length as the bound, and the images in one call per vision
    block; loss, metrics and gradients as padded."""
    from qwenvl_ft.modeling import varlen_attention, varlen_kernel

    calls = []

    def recording(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
        calls.append((cu_q.tolist(), max_q, causal))
        return varlen_kernel.reference_kernel(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale)

    monkeypatch.setattr(varlen_attention, "KERNEL", recording)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    padded = _loss_metrics_and_grads(trainer, batch)
    base = trainer.model.get_base_model()
    assert varlen_attention.use_for_language_model(trainer.model, varlen_attention.TORCH_NAME)
    assert varlen_attention.use_for_vision(trainer.model)
    handles = unpad_language_model(trainer.model) + share_pair_images(trainer.model)
    try:
        packed = _loss_metrics_and_grads(trainer, batch)
    finally:
        for handle in handles:
            handle.remove()
        base.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})  # the fixture is shared
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    offsets = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    text_calls = [call for call in calls if call[2]]
    assert text_calls and all(call == (offsets, batch["attention_mask"].shape[1], True) for call in text_calls)
    assert len(calls) > len(text_calls)  # the vision tower's
    assert torch.allclose(packed[0], padded[0], atol=1e-5), (packed[0], padded[0])
    for key in set(padded[1]) - {"num_tokens"}:
        assert packed[1][key] == pytest.approx(padded[1][key], abs=1e-4), key
    assert packed[2].keys() == padded[2].keys()
    for name, grad in padded[2].items():
        assert torch.allclose(packed[2][name], grad, atol=1e-5, rtol=1e-4), name


def test_forward_logits_equal_at_real_tokens_and_generation_is_untouched(trainer):
    model = trainer.model
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    real = inputs["attention_mask"].bool()
    # generation from the first pair's prompt (a cached forward: the hooks must step aside)
    prompt_length = int((batch["completion_mask"][0] == 0).sum())
    prompt = {k: inputs[k][:1, :prompt_length] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    prompt.update(pixel_values=inputs["pixel_values"][:int(inputs["image_grid_thw"][0].prod())],
                  image_grid_thw=inputs["image_grid_thw"][:1])
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
        expected_tokens = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    handles = unpad_language_model(model) + share_pair_images(model)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
            tokens = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(logits[real], expected[real], atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def test_repeated_half_detects_only_exact_repeats():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])
    pixels = torch.randn(12, 6)
    both = torch.cat([pixels, pixels]), torch.cat([grid, grid])
    assert repeated_half(*both) == 12
    changed = both[0].clone()
    changed[20, 3] += 1e-3
    assert repeated_half(changed, both[1]) is None
    assert repeated_half(pixels, grid) is None  # two different images
    assert repeated_half(pixels[:4], grid[:1]) is None  # one image
    assert repeated_half(torch.cat([pixels, pixels]), torch.cat([grid, grid.flip(0)])) is None


def test_config_allows_packing_for_dpo_only_as_padding_free():
    typed = validate(compose(["recipe=dpo_demo", "data.packing=true"], output_dir="/tmp/o"))
    assert typed.data.packing
    for override in ("data.max_tokens_per_batch=4096", "data.group_by_length=true"):
        with pytest.raises(ConfigError, match="trainer=sft"):
            compose(["recipe=dpo_demo", override], output_dir="/tmp/o")


@pytest.mark.slow
def test_padding_free_dpo_trains_like_padded(tmp_path):
    from qwenvl_ft.commands.train import train

    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing_{packing}"
        metrics = train(compose(QUICK + ["optimizer.lr=3e-3", "trainer.max_steps=6", f"data.packing={packing}"],
                                output_dir=str(out)))
        history = json.loads((out / "log_history.json").read_text())
        runs[packing] = (metrics, [e["rewards/margins"] for e in history if "loss" in e],
                         [e["loss"] for e in history if "loss" in e])
    (plain, plain_margins, plain_losses), (packed, packed_margins, packed_losses) = runs[False], runs[True]
    assert any(abs(m) > 1e-3 for m in plain_margins[1:]), "nothing trained"
    assert packed_margins == pytest.approx(plain_margins, abs=1e-4)
    assert packed_losses == pytest.approx(plain_losses, abs=1e-4)
    assert packed["eval_reward_accuracy"] == pytest.approx(plain["eval_reward_accuracy"])
    assert packed["eval_reward_margin"] == pytest.approx(plain["eval_reward_margin"], abs=1e-4)
