"""The varlen attention paths (qwenvl_ft/modeling/varlen_attention.py, varlen_kernel.py): which one runs, the
sequence boundaries the kernel gets, and that the one-call path computes what the per-sample / per-image one does.

torch's varlen_attn runs on CUDA only, so on a CPU the one-call path runs with `reference_kernel` in its place: one
SDPA call over the whole batch with a block-diagonal mask built from the same `cu_seqlens`. What these tests prove
is then the bookkeeping (boundaries, layouts, heads, scale, causality, the dispatch inside transformers' vision
attention); the `@gpu` test runs the real kernel against per-sample SDPA.
"""

import logging
from dataclasses import replace

import pytest
import torch

from qwenvl_ft import families
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.config.model import Dtype
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.modeling import varlen_attention, varlen_kernel
from qwenvl_ft.modeling.varlen_attention import PER_SAMPLE, TORCH, choose

from family_models import DEFAULT_MODEL, TEST_MODELS
from test_packing import ROWS, _collator, _model, _packer, _typed


# ----------------------------------------------------------------------------------------------------------------
# which path


def test_auto_is_per_sample_on_this_cpu():
    assert not torch.cuda.is_available()
    choice = choose("auto")
    assert choice.path == PER_SAMPLE and "no CUDA GPU" in choice.reason
    assert choose("per_sample").path == PER_SAMPLE
    with pytest.raises(ConfigError, match="model.varlen_attention=torch cannot run here: no CUDA GPU"):
        choose("torch")


def test_auto_is_torch_with_cuda_and_a_torch_that_has_the_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose("auto").path == TORCH and choose("torch").path == TORCH
    assert choose("per_sample").path == PER_SAMPLE
    assert choose("auto", dtype="float32").path == PER_SAMPLE  # flash kernels compute in bf16 / fp16
    with pytest.raises(ConfigError, match="float32"):
        choose("torch", dtype="float32")


def test_auto_is_per_sample_with_a_torch_before_2_10(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(varlen_kernel, "_varlen_function", lambda: None)  # what `import` finds before torch 2.10
    choice = choose("auto")
    assert choice.path == PER_SAMPLE and "torch >= 2.10" in choice.reason
    with pytest.raises(ConfigError, match="torch >= 2.10"):
        choose("torch")


def test_the_setting_is_typed():
    with pytest.raises(ConfigError, match="per_sample"):
        compose(["recipe=demo", "model.varlen_attention=fast"], output_dir="/tmp/unused")
    typed = validate(compose(["recipe=demo", "model.varlen_attention=per_sample"], output_dir="/tmp/unused"))
    assert typed.model.varlen_attention.value == "per_sample"


def test_the_run_log_says_which_path_runs(monkeypatch, caplog):
    from qwenvl_ft.training.speed import varlen_attention as set_up

    typed = _typed(DEFAULT_MODEL)
    model, padded = _model(typed, "sdpa"), _model(typed, "sdpa")  # loaded before CUDA is faked
    with caplog.at_level(logging.INFO, logger="qwenvl_ft"):
        line = set_up([model, None], typed.model, packing=True)
    assert line.startswith("varlen attention: per-sample SDPA (model.varlen_attention=auto: no CUDA GPU")
    assert "one SDPA call per sample" in line and line in caplog.text
    assert model.config.get_text_config()._attn_implementation == varlen_attention.NAME
    assert model.config.vision_config._attn_implementation == "sdpa"  # transformers' loop over the images

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model_cfg = replace(typed.model, dtype=Dtype.bfloat16)  # a GPU run's dtype (the model stays in fp32 here)
    line = set_up([model], model_cfg, packing=True)
    assert "torch's varlen_attn" in line and "one kernel call per decoder layer" in line
    assert model.config.get_text_config()._attn_implementation == varlen_attention.TORCH_NAME
    assert model.config.vision_config._attn_implementation == varlen_attention.VISION_NAME
    assert "packed rows" not in set_up([padded], model_cfg, packing=False)  # images in one call, text as it is
    assert padded.config.get_text_config()._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# the kernel's signature, whichever torch


def _varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "torch 2.10 has no grouped-query attention"
    return varlen_kernel.reference_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None)


def _varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
    assert query.shape[1] == key.shape[1], "torch 2.11 has no grouped-query attention"
    causal = window_size == (-1, 0)  # as torch compares it: a list would mean "not causal"
    return varlen_kernel.reference_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale)


def _varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa == (query.shape[1] != key.shape[1])
    causal = window_size == (-1, 0)
    return varlen_kernel.reference_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale)


@pytest.mark.parametrize("function", [_varlen_2_10, _varlen_2_11, _varlen_2_12, None])
@pytest.mark.parametrize("causal, scale, kv_heads", [(True, None, 2), (True, 0.3, 2), (False, 0.3, 4)])
def test_the_call_adapts_to_each_signature(function, causal, scale, kv_heads):
    """Causality, a scale of its own and grouped-query heads reach the kernel whatever its release takes; None:
    this venv's own varlen_attn signature (its CUDA op is swapped for the reference)."""
    if function is None:
        from torch.nn.attention.varlen import varlen_attn

        function = _this_torchs_signature(varlen_attn)
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    q, k, v = torch.randn(18, 4, 8), torch.randn(18, kv_heads, 8), torch.randn(18, kv_heads, 8)
    out = varlen_kernel.call_varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), causal, scale, function=function)
    expected = varlen_kernel.per_span_sdpa(q, k, v, cu, causal, scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _this_torchs_signature(varlen_attn):
    import functools
    import inspect

    @functools.wraps(varlen_attn)
    def stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options):
        bound = inspect.signature(varlen_attn).bind(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options)
        arguments = {**bound.arguments}
        causal = arguments.get("window_size", (-1, -1)) == (-1, 0) or arguments.get("is_causal", False)
        if query.shape[1] != key.shape[1]:
            assert arguments.get("enable_gqa", False)
        return varlen_kernel.reference_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal,
                                              arguments.get("scale"))

    return stand_in


def test_the_reference_kernel_checks_its_bookkeeping():
    q = torch.randn(6, 2, 4)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="below the longest"):
        varlen_kernel.reference_kernel(q, q, q, cu, cu, 3, 3, True, None)
    with pytest.raises(ValueError, match="covers 5 tokens"):
        bad = torch.tensor([0, 2, 5], dtype=torch.int32)
        varlen_kernel.reference_kernel(q, q, q, bad, bad, 4, 4, True, None)


# ----------------------------------------------------------------------------------------------------------------
# the model through the one-call path


class Recorder:
    """The reference kernel, recording the boundaries of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_q, cu_k, max_q, max_k, causal, scale):
        self.calls.append((cu_q.tolist(), max_q, causal))
        return varlen_kernel.reference_kernel(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale)


def _one_call_model(typed):
    model = _model(typed, "sdpa")
    assert varlen_attention.use_for_vision(model)  # first the tower: switching the text after it must keep it
    assert varlen_attention.use_for_language_model(model, varlen_attention.TORCH_NAME)
    assert model.config.vision_config._attn_implementation == varlen_attention.VISION_NAME
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(result, reference):
    torch.testing.assert_close(result[0], reference[0], rtol=1e-5, atol=1e-6)
    assert result[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _vision_segments(batch, key):
    """Patches of every image, and of every frame of a video: what each one attends within."""
    return [int(h * w) for t, h, w in batch[key].tolist() for _ in range(int(t))] if key in batch else []


@pytest.mark.parametrize("option", TEST_MODELS)
def test_one_call_path_equals_per_sample_and_per_image(option, monkeypatch):
    """A packed row (images of several sizes, two in one row, a video) through the torch path, kernel = the
    reference: the same loss and gradients as per-sample SDPA in the language model and transformers' per-image
    loop in the vision tower; each vision block and each attention layer makes ONE call, with the images' and the
    samples' boundaries."""
    recorder = Recorder()
    monkeypatch.setattr(varlen_attention, "KERNEL", recorder)
    typed, collator = _typed(option), _collator(option)
    samples = [collator.encode(row) for row in ROWS]
    reference = _model(typed, "sdpa_varlen")
    batch = _packer(reference, collator).pack(samples)
    expected = _loss_and_grads(reference, batch)
    assert not recorder.calls

    model = _one_call_model(typed)
    _assert_same(_loss_and_grads(model, batch), expected)

    family = families.of_model(model)
    blocks = len(family.parts(model).vision_blocks)
    text = model.config.get_text_config()
    attention_layers = sum(1 for kind in getattr(text, "layer_types", None) or ["full_attention"] *
                           text.num_hidden_layers if kind != "linear_attention")
    lengths = [s["input_ids"].numel() for s in samples]
    text_calls = [c for c in recorder.calls if c[2]]
    assert text_calls == [(_offsets(lengths), max(lengths), True)] * attention_layers
    for key in ("image_grid_thw", "video_grid_thw"):  # the images, then the video: one vision forward each
        segments = _vision_segments(batch, key)
        calls = [c for c in recorder.calls if not c[2] and c[0][-1] == sum(segments)]
        assert len(calls) == blocks, (key, recorder.calls)
        assert _offsets(segments) in [cu for cu, _, _ in calls]  # (window-attention blocks cut finer)
        assert all(longest == max(b - a for a, b in zip(cu, cu[1:])) for cu, longest, _ in calls)
    assert len(recorder.calls) == len(text_calls) + 2 * blocks


def _offsets(lengths):
    return [sum(lengths[:i]) for i in range(len(lengths) + 1)]


@pytest.mark.parametrize("option", TEST_MODELS)
def test_one_call_vision_tower_on_a_padded_batch(option, monkeypatch):
    """A padded batch: the language model keeps its masked SDPA, the vision tower still takes every image of the
    batch in one call per block."""
    recorder = Recorder()
    monkeypatch.setattr(varlen_attention, "KERNEL", recorder)
    typed, collator = _typed(option), _collator(option)
    batch = collator.pad([collator.encode(row) for row in ROWS[:4]])
    expected = _loss_and_grads(_model(typed, "sdpa"), batch)
    model = _one_call_model(typed)
    _assert_same(_loss_and_grads(model, batch), expected)
    assert len(recorder.calls) == len(families.of_model(model).parts(model).vision_blocks)
    assert all(not causal for _, _, causal in recorder.calls)
    assert any(cu == _offsets(_vision_segments(batch, "image_grid_thw")) for cu, _, _ in recorder.calls)


def test_where_the_kernel_cannot_run_each_sequence_gets_sdpa(caplog):
    """The real kernel on a CPU (or in fp32 without autocast) declines, and the path attends per sequence from the
    same boundaries instead, saying so once."""
    typed, collator = _typed(DEFAULT_MODEL), _collator(DEFAULT_MODEL)
    samples = [collator.encode(row) for row in ROWS]
    reference = _model(typed, "sdpa_varlen")
    batch = _packer(reference, collator).pack(samples)
    expected = _loss_and_grads(reference, batch)
    varlen_attention._fallback_logged.clear()
    with caplog.at_level(logging.WARNING, logger="qwenvl_ft"):
        _assert_same(_loss_and_grads(_one_call_model(typed), batch), expected)
    assert caplog.text.count("one SDPA call per sequence instead") == 1


def test_generation_is_unchanged_on_the_one_call_path(monkeypatch):
    monkeypatch.setattr(varlen_attention, "KERNEL", varlen_kernel.reference_kernel)
    typed, collator = _typed(DEFAULT_MODEL), _collator(DEFAULT_MODEL)
    prompts = collator.generation_batch(ROWS[:3])  # left-padded, several images, a KV cache
    with torch.no_grad():
        outputs = [m.eval().generate(**prompts, max_new_tokens=4, do_sample=False)
                   for m in (_model(typed, "sdpa"), _one_call_model(typed))]
    assert torch.equal(outputs[0], outputs[1])


# ----------------------------------------------------------------------------------------------------------------
# the real kernel


@pytest.mark.gpu
@pytest.mark.parametrize("option", TEST_MODELS)
def test_torch_varlen_kernel_matches_per_sample_sdpa_on_cuda(option):
    """torch's varlen_attn (bf16, CUDA) against per-sample SDPA and the per-image loop, on a packed row."""
    if varlen_kernel.torch_varlen_missing():
        pytest.skip(varlen_kernel.torch_varlen_missing())
    typed, collator = _typed(option), _collator(option)
    samples = [collator.encode(row) for row in ROWS]

    def on_gpu(model):
        return model.to(device="cuda", dtype=torch.bfloat16)

    reference = on_gpu(_model(typed, "sdpa_varlen"))
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in _packer(reference, collator).pack(samples).items()}
    batch = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    expected = _loss_and_grads(reference, batch)
    loss, grads = _loss_and_grads(on_gpu(_one_call_model(typed)), batch)
    torch.testing.assert_close(loss.float(), expected[0].float(), rtol=2e-2, atol=2e-2)
    for name, grad in expected[1].items():
        scale = grad.float().abs().max().clamp(min=1e-3)
        torch.testing.assert_close(grads[name].float() / scale, grad.float() / scale, rtol=0, atol=5e-2, msg=name)
