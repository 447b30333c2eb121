"""Padding-free packing and the other batch layouts (qwenvl_ft/data/packing.py, batching.py).

The core claim: a packed row is, sample for sample, the same computation as the samples run on their own --
same per-sample losses, same gradients -- on the tiny random model of every family in fp32 (tests that do not
depend on the family run on the default one).
"""

from functools import lru_cache

import pytest
import torch
from PIL import Image

from qwenvl_ft import families
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.data.batching import (ExpandGroups, padding_fraction, plan_packs, plan_token_budget, row_length,
                                     row_lengths, training_batches)
from qwenvl_ft.data.collate import IGNORE_INDEX, VisionChatCollator
from qwenvl_ft.data.packing import PackingCollator, position_function, sample_boundaries

from family_models import DEFAULT_MODEL, TEST_MODELS


def _row(sizes, question, answer, video_frames=0):
    content = [{"type": "image", "text": None} for _ in sizes] + [{"type": "text", "text": question}]
    row = {
        "messages": [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "images": [Image.new("RGB", size, (40 * i, 120, 200 - 30 * i)) for i, size in enumerate(sizes)],
        "source": f"test:{len(sizes)}:{answer[:8]}",
    }
    if video_frames:
        content.insert(0, {"type": "video", "text": None})
        row["videos"] = [[Image.new("RGB", (84, 56), (25 * f, 90, 60)) for f in range(video_frames)]]
    return row


# Different image sizes (so different grids and M-RoPE jumps), two images in a row, no image at all, a video
# (whose temporal patches each family numbers its own way: one position apart, spaced by time, or as separate
# timestamped spans).
ROWS = [
    _row([(56, 56)], "What is in the image?", "a red circle"),
    _row([(112, 84)], "Describe the image.", "The quick brown fox jumps over the lazy dog."),
    _row([], "What colour is it?", "blue"),
    _row([(28, 56), (140, 56)], "What shape is this?", "a green square and a cross"),
    _row([(84, 84)], "What is in the image?", "a yellow triangle"),
    _row([], "What is in the video?", "a red circle moving left", video_frames=4),
]


@lru_cache(maxsize=None)
def _typed(option):
    # small video frames, so that the video row stays short
    return validate(compose(["recipe=demo", f"model={option}", "data.video_min_pixels=3136",
                             "data.video_max_pixels=4704"], output_dir="/tmp/unused"))


@lru_cache(maxsize=None)
def _collator(option):
    from qwenvl_ft.modeling.build import build_processor

    typed = _typed(option)
    return VisionChatCollator(build_processor(typed.model, typed.data), typed.data)


@pytest.fixture
def typed():
    return _typed(DEFAULT_MODEL)


@pytest.fixture
def collator():
    return _collator(DEFAULT_MODEL)


def _packer(model, collator):
    return PackingCollator(collator, position_function(model.config))


def _model(typed, attn_implementation):
    from qwenvl_ft.modeling.build import model_class, model_source
    from qwenvl_ft.modeling.linear_attention import run_linear_attention_per_sample
    from qwenvl_ft.modeling.varlen_attention import use_for_language_model

    torch.manual_seed(0)
    model = model_class(typed.model).from_pretrained(
        model_source(typed.model), dtype=torch.float32,
        attn_implementation="sdpa" if attn_implementation == "sdpa_varlen" else attn_implementation)
    if attn_implementation == "sdpa_varlen":
        assert use_for_language_model(model)
    run_linear_attention_per_sample(model)  # as build_base_model does: recurrent layers keep samples apart too
    return model.train()  # the tiny models have no dropout; train() is what the Trainer runs


def _token_losses(model, batch):
    """Summed next-token cross-entropy per position of row 0 (zero where the label is ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[0]
    labels = batch["labels"][0]
    losses = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX,
                                               reduction="none")
    return torch.cat([losses.new_zeros(1), losses])  # index i: loss of predicting token i


@pytest.mark.parametrize("option", TEST_MODELS)
def test_mrope_positions_match_the_models_get_rope_index(option):
    typed, collator = _typed(option), _collator(option)
    family = families.get(typed.model.family.value)
    model = _model(typed, "sdpa")
    positions = position_function(model.config)
    for row in ROWS:
        sample = collator.encode(row)
        batch = collator.pad([sample])
        seconds = family.video_seconds_input
        timing = {seconds: batch[seconds]} if seconds in batch else {}
        expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 batch.get("image_grid_thw"), batch.get("video_grid_thw"), **timing)
        assert torch.equal(positions(sample), expected[:, 0]), row["source"]
    video = collator.encode(ROWS[-1])
    assert (video["mm_token_type_ids"] == 2).any()  # the video row really has video tokens
    assert video["video_grid_thw"][0, 0] == 2  # of two temporal patches, which the families number differently
    assert (family.video_seconds_input in video) == (family.video_seconds_input is not None)


def test_row_lengths_are_what_encode_produces(typed, collator):
    from dataclasses import replace

    from qwenvl_ft.data.collate import RowDropped
    from qwenvl_ft.data.shapes import make_rows

    rows = ROWS + make_rows(6, 56, 0, "train")
    for data_cfg in (typed.data, replace(typed.data, max_length=40), replace(typed.data, max_pixels=56 * 56 * 2)):
        collator = VisionChatCollator(collator.processor, data_cfg)
        for row, length in zip(rows, row_lengths(collator, rows)):
            if length is None:  # left out of the plan, as encode drops it
                with pytest.raises(RowDropped):
                    collator.encode(row)
            else:
                assert length == collator.encode(row)["input_ids"].numel(), (data_cfg, row["source"])
    assert None in row_lengths(VisionChatCollator(collator.processor, replace(typed.data, max_length=40)), ROWS)


def test_packed_row_layout(typed, collator):
    samples = [collator.encode(row) for row in ROWS]
    batch = PackingCollator(collator).pack(samples)
    lengths = [s["input_ids"].numel() for s in samples]
    total = sum(lengths)
    assert batch["input_ids"].shape == (1, total) and batch["position_ids"].shape == (4, 1, total)
    assert "attention_mask" not in batch  # its presence would switch transformers' packed-sequence detection off
    starts = sample_boundaries(batch["position_ids"])
    assert starts == [sum(lengths[:i]) for i in range(len(lengths))]
    # the varlen keywords (built here, on the CPU): every sample's offsets, and the longest sample
    for side in ("q", "k"):
        assert batch[f"cu_seq_lens_{side}"].dtype == torch.int32
        assert batch[f"cu_seq_lens_{side}"].tolist() == starts + [total]
        assert batch[f"max_length_{side}"] == max(lengths) and isinstance(batch[f"max_length_{side}"], int)
    assert batch["image_grid_thw"].shape[0] == sum(len(r["images"]) for r in ROWS)
    assert batch["video_grid_thw"].shape[0] == 1 and "pixel_values_videos" in batch
    assert batch["pixel_values"].shape[0] == sum(s["pixel_values"].shape[0] for s in samples if "pixel_values" in s)


def test_first_token_of_every_sample_is_never_a_target(typed, collator):
    # Labels on every token (as a "train on everything" collator would make): packing must still mask the first
    # token of each sample, which would otherwise be predicted from the previous sample's last token.
    samples = [collator.encode(row) for row in ROWS[:3]]
    for sample in samples:
        sample["labels"] = sample["input_ids"].clone()
    batch = PackingCollator(collator).pack(samples)
    starts = sample_boundaries(batch["position_ids"])
    labels = batch["labels"][0]
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    assert (labels != IGNORE_INDEX).sum() == sum(s["input_ids"].numel() - 1 for s in samples)


# sdpa / eager: transformers' block-diagonal mask; sdpa_varlen: qwenvl-ft's per-sample SDPA (what packing uses
# unless flash_attention_2 is set). Every family with sdpa_varlen; the mask-based kernels, which do not depend on
# the family, on the default one.
ATTENTION_CASES = [(option, "sdpa_varlen") for option in TEST_MODELS] + \
    [(DEFAULT_MODEL, "sdpa"), (DEFAULT_MODEL, "eager")]


@pytest.mark.parametrize("option, attn_implementation", ATTENTION_CASES)
def test_packed_losses_and_gradients_match_unpacked(option, attn_implementation):
    typed, collator = _typed(option), _collator(option)
    model = _model(typed, attn_implementation)
    samples = [collator.encode(row) for row in ROWS]

    # Unpacked: every sample alone (batch of one, no padding), gradients of the summed token losses.
    model.zero_grad()
    single_losses = []
    for sample in samples:
        loss = _token_losses(model, collator.pad([sample])).sum()
        loss.backward()
        single_losses.append(loss.detach())
    unpacked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # Packed: one row.
    model.zero_grad()
    batch = _packer(model, collator).pack(samples)
    token_losses = _token_losses(model, batch)
    token_losses.sum().backward()
    starts = sample_boundaries(batch["position_ids"]) + [batch["input_ids"].shape[1]]
    packed_losses = [token_losses[a:b].sum().detach() for a, b in zip(starts, starts[1:])]

    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(single_losses), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, unpacked_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # every part of the vision tower and every projector really took part
    family = families.of_model(model)
    for path in (*family.vision_stem, *family.projectors):
        assert all(p.grad.abs().sum() > 0 for p in model.get_submodule(path).parameters()), path


@pytest.mark.parametrize("option, attn_implementation", [(option, "sdpa_varlen") for option in TEST_MODELS]
                         + [(DEFAULT_MODEL, "sdpa")])
def test_packed_loss_equals_padded_loss_through_the_model(option, attn_implementation):
    """The model's own (token-mean) loss on a packed row equals the one on the padded batch of the same rows
    (with sdpa_varlen, the padded batch goes through its ordinary-mask path)."""
    typed, collator = _typed(option), _collator(option)
    model = _model(typed, attn_implementation)
    samples = [collator.encode(row) for row in ROWS]
    with torch.no_grad():
        padded = model(**collator.pad(samples), use_cache=False).loss
        packed = model(**_packer(model, collator).pack(samples), use_cache=False).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# planning


def _caption_lengths(count=3000, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.randint(30, 60) + rng.choice([4, 16, 36, 64]) for _ in range(count)]


def test_packs_cover_every_row_once_within_budget():
    lengths = _caption_lengths()
    packs = plan_packs(lengths, 1024, seed=1)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= 1024 for pack in packs)
    fill = sum(lengths) / (len(packs) * 1024)
    assert fill > 0.97, fill
    assert packs == plan_packs(lengths, 1024, seed=1)  # seeded
    assert plan_packs([50, 2000, 30], 1024, seed=0)  # a row over the budget gets a pack of its own
    assert any(pack == [1] for pack in plan_packs([50, 2000, 30], 1024, seed=0))


def test_token_budget_batches_stay_within_budget_and_pad_little():
    lengths = _caption_lengths()
    batches = plan_token_budget(lengths, 1024, seed=1)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    unsorted = [list(range(i, min(i + 8, len(lengths)))) for i in range(0, len(lengths), 8)]
    assert padding_fraction(lengths, batches, packed=False) < 0.05
    assert padding_fraction(lengths, unsorted, packed=False) > 0.2  # what plain batches of 8 pay


# ----------------------------------------------------------------------------------------------------------------
# config and layouts


@pytest.mark.parametrize("overrides, message", [
    (["data.max_tokens_per_batch=100"], "below data.max_length"),
    (["data.group_by_length=true", "data.packing=true"], "group_by_length"),
    (["data.packing=true", "data.max_length=null"], "needs data.max_tokens_per_batch"),
    (["data.max_tokens_per_batch=0"], "a number > 0"),
])
def test_batch_layout_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(["recipe=demo"] + overrides, output_dir="/tmp/unused")


def test_training_batches_layouts(collator, typed):
    from dataclasses import replace

    from qwenvl_ft.data.arrow import to_dataset

    rows = to_dataset(ROWS[:-1] * 4)  # a datasets column cannot hold in-memory video frames
    packed = training_batches(replace(typed.data, packing=True, max_tokens_per_batch=256), 8, collator, rows, 0)
    assert isinstance(packed.collator, ExpandGroups) and packed.per_device_batch_size == 1
    assert sorted(i for g in packed.dataset["row_indices"] for i in g) == list(range(len(rows)))
    batch = packed.collator([packed.dataset[0]])
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 256 and "position_ids" in batch
    evaluation = packed.collator([rows[0], rows[1]])  # evaluation hands plain rows: packed as well
    assert evaluation["input_ids"].shape[0] == 1

    budget = training_batches(replace(typed.data, max_tokens_per_batch=256), 8, collator, rows, 0)
    batch = budget.collator([budget.dataset[0]])
    assert batch["input_ids"].numel() <= 256 and "attention_mask" in batch

    grouped = training_batches(replace(typed.data, group_by_length=True), 8, collator, rows, 0)
    assert grouped.sampling_strategy == "group_by_length" and grouped.per_device_batch_size == 8
    assert grouped.dataset["length"] == [row_length(collator, r) for r in ROWS[:-1] * 4]

    plain = training_batches(typed.data, 8, collator, rows, 0)
    assert plain.dataset is rows and plain.collator is collator


@pytest.mark.parametrize("option", TEST_MODELS)
def test_vision_checkpointing_switch(option):
    from qwenvl_ft.modeling.build import model_parts
    from qwenvl_ft.training.speed import set_vision_checkpointing

    typed, collator = _typed(option), _collator(option)
    model = _model(typed, "sdpa")
    parts = model_parts(model)
    batch = _packer(model, collator).pack([collator.encode(row) for row in ROWS])
    _token_losses(model, batch).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert set_vision_checkpointing(model, False) == typed.model.architecture.vision_depth
    assert not any(b.gradient_checkpointing for b in parts.vision_blocks)
    assert all(layer.gradient_checkpointing for layer in parts.decoder_layers)
    model.gradient_checkpointing_disable()
    set_vision_checkpointing(model, True)  # vision only, the language model not checkpointed
    assert all(b.gradient_checkpointing for b in parts.vision_blocks)
    assert not any(layer.gradient_checkpointing for layer in parts.decoder_layers)
    model.zero_grad()
    _token_losses(model, batch).sum().backward()  # recomputation gives the same gradients
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_liger_switch_fails_clearly_without_the_package():
    import importlib.util

    from qwenvl_ft.training.speed import check_liger

    typed = validate(compose(["recipe=demo", "model.use_liger_kernel=true"], output_dir="/tmp/unused"))
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match="pip install liger-kernel"):
            check_liger(typed.model)
    elif not torch.cuda.is_available():  # Liger's kernels are Triton: CUDA only (tests/test_liger.py: every family)
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            check_liger(typed.model)
    else:
        check_liger(typed.model)


# ----------------------------------------------------------------------------------------------------------------
# through TRL's SFTTrainer (fused LM head) and a short packed training run


@pytest.mark.slow
@pytest.mark.parametrize("option", TEST_MODELS)
def test_sft_trainer_loss_and_gradients_packed_equal_padded(tmp_path, option):
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.modeling.build import build_model
    from qwenvl_ft.trainers.sft import build_trainer

    collator = _collator(option)
    typed = validate(compose(["recipe=demo", f"model={option}", "adapter=full", "trainer.report_to=[none]"],
                             output_dir=str(tmp_path)))
    model = build_model(typed.model, typed.adapter)
    trainer = build_trainer(typed, model, collator.processor, collator, to_dataset(ROWS[:-1]), None)
    results = []
    for batch in (collator(ROWS), _packer(model, collator)(ROWS)):
        model.zero_grad()
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_packed_training_learns(tmp_path):
    import json

    from qwenvl_ft.commands.train import train

    cfg = compose(["recipe=demo", "data.packing=true", "data.max_tokens_per_batch=640", "data.shapes.num_train=160",
                   "trainer.epochs=4", "trainer.eval_generation=false", "trainer.logging_steps=1",
                   "trainer.disable_tqdm=true", "trainer.report_to=[none]"], output_dir=str(tmp_path / "run"))
    metrics = train(cfg)
    losses = [e["loss"] for e in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in e]
    # 160 rows of 39 tokens, 16 per pack of 640 -> 10 packs per epoch
    assert metrics["global_step"] == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_batch_layout_and_vision_checkpointing_are_wired(collator):
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.trainers.base import shared_parts
    from qwenvl_ft.trainers.sft import TRAINING

    rows = to_dataset(ROWS[:-1])

    def prepared(*overrides):
        cfg = validate(compose(["recipe=demo", *overrides], output_dir="/tmp/unused"))
        parts = shared_parts(cfg, collator.processor, collator, rows, None, None)
        return parts, TRAINING.trainer_arguments(parts, parts.arguments)

    parts, args = prepared("data.group_by_length=true", "model.gradient_checkpointing=true",
                           "model.vision_gradient_checkpointing=false")
    assert (args.per_device_train_batch_size, args.train_sampling_strategy) == (8, "group_by_length")
    checkpointing = [c for c in parts.callbacks if type(c).__name__ == "VisionCheckpointing"]
    assert len(checkpointing) == 1  # turns the vision blocks' checkpointing off when training starts
    same, _ = prepared("model.vision_gradient_checkpointing=false")
    assert not [c for c in same.callbacks if type(c).__name__ == "VisionCheckpointing"]  # already the Trainer's
    _, packed = prepared("data.packing=true")
    assert packed.per_device_train_batch_size == 1


@pytest.mark.gpu
@pytest.mark.parametrize("option", TEST_MODELS)
def test_flash_attention_varlen_packed_matches_unpacked(option):
    """On a GPU with flash-attn: the varlen path (cu_seqlens from the position restarts) keeps samples apart."""
    pytest.importorskip("flash_attn")
    typed, collator = _typed(option), _collator(option)
    model = _model(typed, "flash_attention_2").to(device="cuda", dtype=torch.bfloat16)
    samples = [collator.encode(row) for row in ROWS]

    def on_gpu(batch):
        return {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}  # max_length_q is an int

    with torch.no_grad():
        single = [_token_losses(model, on_gpu(collator.pad([s]))).sum().float() for s in samples]
        batch = on_gpu(_packer(model, collator).pack(samples))
        token_losses = _token_losses(model, batch).float()
    starts = sample_boundaries(batch["position_ids"]) + [batch["input_ids"].shape[1]]
    packed = [token_losses[a:b].sum() for a, b in zip(starts, starts[1:])]
    torch.testing.assert_close(torch.stack(packed), torch.stack(single), rtol=2e-2, atol=2e-2)


def test_models_load_with_cudnn_out_of_sdpa(typed):
    """Training and generation loads switch cuDNN attention off (a plan per sequence length made a GPU step 4x
    slower, modeling/varlen_attention.py); flash and memory-efficient SDPA stay available."""
    from qwenvl_ft.modeling.build import build_base_model
    from qwenvl_ft.modeling.load import load_base

    for load in (lambda: build_base_model(typed.model, typed.adapter), lambda: load_base(typed.model, typed.adapter)):
        torch.backends.cuda.enable_cudnn_sdp(True)
        load()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_sdpa_varlen_leaves_padded_batches_and_generation_unchanged(typed, collator):
    sdpa, varlen = _model(typed, "sdpa").eval(), _model(typed, "sdpa_varlen").eval()
    rows = ROWS[:3]
    with torch.no_grad():
        padded = collator(rows)
        torch.testing.assert_close(varlen(**padded, use_cache=False).logits, sdpa(**padded, use_cache=False).logits)
        prompts = collator.generation_batch(rows)  # left-padded, with a KV cache
        outputs = [m.generate(**prompts, max_new_tokens=4, do_sample=False) for m in (sdpa, varlen)]
    assert torch.equal(outputs[0], outputs[1])
