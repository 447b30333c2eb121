"""modeling/linear_attention.py: packed samples stay apart in recurrent (Gated DeltaNet) layers. The packed =
unpacked losses and gradients of every family are tests/test_packing.py's; here: that transformers' own path leaks
(so the equivalence test can fail), that the wrapping survives what the Trainer does to a model, and that it steps
aside where it does not apply."""

import pytest
import torch
from PIL import Image

from data_helpers import assistant, user
from family_models import TEST_MODELS, family_of_option
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.collate import VisionChatCollator
from qwenvl_ft.data.packing import PackingCollator, position_function, sample_boundaries
from qwenvl_ft.modeling.build import build_processor, model_class, model_source
from qwenvl_ft.modeling.linear_attention import packed_lengths, run_linear_attention_per_sample
from qwenvl_ft.modeling.varlen_attention import use_for_language_model

RECURRENT = [option for option in TEST_MODELS if family_of_option(option).linear_attention_class]
ROWS = [{"messages": [user("What is in the image?", images=1), assistant("a red circle")],
         "images": [Image.new("RGB", (56, 56), (200, 30, 30))], "source": "test:0"},
        {"messages": [user("What colour is it?"), assistant("blue, like the sky over the sea")], "source": "test:1"},
        {"messages": [user("Describe the image.", images=1), assistant("The quick brown fox jumps over the dog.")],
         "images": [Image.new("RGB", (112, 84), (30, 200, 30))], "source": "test:2"}]


def _setup(option):
    typed = validate(compose(["recipe=demo", f"model={option}"], output_dir="/tmp/unused"))
    collator = VisionChatCollator(build_processor(typed.model, typed.data), typed.data)
    model = model_class(typed.model).from_pretrained(model_source(typed.model), dtype=torch.float32,
                                                     attn_implementation="sdpa")
    use_for_language_model(model)  # attention per sample, as a packed run has it
    samples = [collator.encode(row) for row in ROWS]
    batch = PackingCollator(collator, position_function(model.config)).pack(samples)
    return model, collator, samples, batch


def _largest_gap(model, collator, samples, batch) -> float:
    """Largest difference between a sample's logits in the pack and alone."""
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        starts = sample_boundaries(batch["position_ids"]) + [batch["input_ids"].shape[1]]
        return max(float((packed[a:b] - model(**collator.pad([s]), use_cache=False).logits[0]).abs().max())
                   for s, a, b in zip(samples, starts, starts[1:]))


@pytest.mark.parametrize("option", RECURRENT)
def test_the_recurrent_layers_leak_across_a_pack_unless_run_per_sample(option):
    model, collator, samples, batch = _setup(option)
    assert _largest_gap(model, collator, samples, batch) > 1e-3  # transformers' torch path: the state leaks
    assert run_linear_attention_per_sample(model) > 0
    assert _largest_gap(model, collator, samples, batch) < 1e-5


@pytest.mark.parametrize("option", RECURRENT)
def test_the_wrapping_survives_train_and_eval_and_is_done_once(option):
    """transformers re-kernelizes the recurrent layer class on every train()/eval() switch (resetting a forward
    set on its instances); the decoder layers that hold them are wrapped instead."""
    model, collator, samples, batch = _setup(option)
    wrapped = run_linear_attention_per_sample(model)
    model.train()
    model.eval()
    assert run_linear_attention_per_sample(model) == 0 and wrapped > 0
    assert _largest_gap(model, collator, samples, batch) < 1e-5


def test_families_without_recurrent_layers_are_left_alone():
    model, *_ = _setup(next(option for option in TEST_MODELS if option not in RECURRENT))
    assert run_linear_attention_per_sample(model) == 0


def test_only_one_packed_row_is_cut():
    assert packed_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [3, 2, 1]
    assert packed_lengths(torch.tensor([[0, 1, 2, 3]])) is None  # one sample
    assert packed_lengths(torch.tensor([[0, 1, 0], [0, 1, 0]])) is None  # several rows: padded batches
    assert packed_lengths(None) is None
