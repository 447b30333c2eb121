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
from qwenvl_ft.modeling.linear_attention import PACK_INPUTS, packed_lengths, run_linear_attention_per_sample
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
    positions_only = {key: value for key, value in batch.items() if key not in PACK_INPUTS}
    assert _largest_gap(model, collator, samples, positions_only) > 1e-3  # transformers' torch path: the state leaks
    with pytest.raises(ValueError, match="can't keep packed sequences apart"):  # given the boundaries, it refuses
        model(**batch, use_cache=False)
    assert run_linear_attention_per_sample(model) > 0
    assert _largest_gap(model, collator, samples, batch) < 1e-5
    assert _largest_gap(model, collator, samples, positions_only) < 1e-5


@pytest.mark.parametrize("option", RECURRENT)
def test_a_pack_of_one_sample_runs_as_that_sample(option):
    """A pack that holds one sample carries its boundaries too (data/packing.py); transformers' torch path refuses
    any, so the wrapped layer runs the row without them."""
    model, collator, samples, _ = _setup(option)
    run_linear_attention_per_sample(model)
    batch = PackingCollator(collator, position_function(model.config)).pack(samples[1:2])
    assert batch["cu_seq_lens_q"].tolist() == [0, samples[1]["input_ids"].numel()]
    assert _largest_gap(model, collator, samples[1:2], batch) < 1e-5


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


# ----------------------------------------------------------------------------------------------------------------
# which kernels run the recurrent layers: flash-linear-attention on CUDA when installed, transformers' torch path
# otherwise


def test_the_backend_is_torch_on_cpu_even_with_fla(monkeypatch):
    from qwenvl_ft.modeling import linear_attention

    model, *_ = _setup(RECURRENT[0])
    assert linear_attention.linear_attention_backend(model) == linear_attention.TORCH
    monkeypatch.setattr(linear_attention, "fla_installed", lambda: True)
    assert linear_attention.linear_attention_backend(model) == linear_attention.TORCH  # fla's kernels need CUDA
    other, *_ = _setup(next(option for option in TEST_MODELS if option not in RECURRENT))
    assert linear_attention.linear_attention_backend(other) is None


@pytest.mark.slow
def test_the_run_log_and_run_info_name_the_backend(tmp_path, caplog):
    import json
    import logging

    from qwenvl_ft.commands.train import train

    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="qwenvl_ft"):
        train(compose(["recipe=demo", f"model={RECURRENT[0]}", "adapter=lora", "data.shapes.num_train=8",
                       "data.shapes.num_eval=2", "trainer.max_steps=1", "trainer.eval_generation=false"],
                      output_dir=str(run)))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("linear attention: ")]
    assert len(said) == 1 and "delta rule runs on torch" in said[0] and ".[fla]" in said[0]
    assert json.loads((run / "run_info.json").read_text())["linear_attention"] == "torch"


def _deltanet_on_cuda(option):
    """A Gated DeltaNet layer of the tiny model's config, widened to kernel-friendly head sizes, on CUDA."""
    from qwenvl_ft.families.base import attribute

    typed = validate(compose(["recipe=demo", f"model={option}", "model.architecture.linear_key_head_dim=64",
                              "model.architecture.linear_value_head_dim=64"], output_dir="/tmp/unused"))
    model = model_class(typed.model).from_pretrained(model_source(typed.model), dtype=torch.float32)
    family = family_of_option(option)
    layer_class = family.load_linear_attention_class()
    layer = next(m for m in attribute(model, family.decoder_layers).modules() if isinstance(m, layer_class))
    return layer.cuda().train()


@pytest.mark.gpu
@pytest.mark.parametrize("option", RECURRENT)
def test_fla_matches_the_torch_path_forward_and_gradients(option):
    """The same layer, weights and inputs through fla's chunk kernel (transformers' choice for CUDA inputs when fla
    is installed) and through transformers' torch path (its choice for CPU inputs): outputs, input gradients and
    weight gradients agree."""
    pytest.importorskip("fla")
    import copy

    on_cuda = _deltanet_on_cuda(option)
    on_cpu = copy.deepcopy(on_cuda).cpu()
    torch.manual_seed(0)
    hidden = torch.randn(2, 192, on_cuda.hidden_size)

    def run(layer, device):
        inputs = hidden.to(device).requires_grad_(True)
        output = layer(inputs)
        output.pow(2).mean().backward()
        return [t.detach().cpu() for t in (output, inputs.grad, layer.in_proj_qkv.weight.grad, layer.A_log.grad)]

    for fla_value, torch_value in zip(run(on_cuda, "cuda"), run(on_cpu, "cpu")):
        torch.testing.assert_close(fla_value, torch_value, atol=2e-3, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("option", RECURRENT)
def test_packed_rows_stay_apart_on_cuda(option):
    """On CUDA (fla's kernels when installed) the per-sample loop keeps a pack's samples apart as on CPU."""
    from qwenvl_ft.modeling.linear_attention import linear_attention_backend

    model, collator, samples, batch = _setup(option)
    model = model.cuda()
    run_linear_attention_per_sample(model)
    assert linear_attention_backend(model) in ("torch", "flash-linear-attention")

    def on_gpu(inputs):
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    with torch.no_grad():
        packed = model(**on_gpu(batch), use_cache=False).logits[0]
        starts = sample_boundaries(batch["position_ids"]) + [batch["input_ids"].shape[1]]
        gap = max(float((packed[a:b] - model(**on_gpu(collator.pad([s])), use_cache=False).logits[0]).abs().max())
                  for s, a, b in zip(samples, starts, starts[1:]))
    assert gap < 1e-4
