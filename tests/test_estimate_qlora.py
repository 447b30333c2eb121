"""`qwenvl-ft estimate` under QLoRA, for both settings of adapter.qlora_fp32_upcast: the weight bytes and the
dtypes of the residual stream and of the 4-bit Linears' outputs, checked against the model the run builds and the
tensors autograd saves when its real layers run (CPU, bf16 weights under bf16 autocast)."""

import pytest
import torch
from torch import nn

from qwenvl_ft.estimate.counts import count_parameters
from qwenvl_ft.estimate.memory import GiB, ActivationDtypes, estimate_memory

from family_models import TEST_MODELS, family_of_option
from test_estimate import ARCH, FAMILY_ARCH, _layer_counts, _saved_bytes, _skip_qlora, _typed

UPCAST = [pytest.param(False, id="lean"), pytest.param(True, id="fp32_upcast")]


def _upcast(upcast: bool) -> str:
    return f"adapter.qlora_fp32_upcast={str(upcast).lower()}"


@pytest.mark.parametrize("upcast", UPCAST)
def test_qlora_7b_weight_bytes(upcast):
    est = estimate_memory(_typed("recipe=qlora_7b_amazon", _upcast(upcast)))
    rows = {name: b for name, b, _ in est.rows}
    c = est.counts
    # every Linear but lm_head is 4-bit (the vision tower too: it is frozen); embeddings, lm_head, norms and
    # biases stay in the model's bf16, or are what PEFT's preparation casts to fp32 (adapter.qlora_fp32_upcast)
    other = c.fp32_base if upcast else c.base_other
    assert c.quantized + other == c.total and (c.base_other if upcast else c.fp32_base) == 0
    assert other > 2 * 152064 * 3584  # embed_tokens + lm_head (untied in the 7B)
    assert rows["weights (4-bit)"] == int(c.quantized * (0.5 + 1 / 64 + 4 / (64 * 256)))
    assert rows["weights (fp32)" if upcast else "weights (bfloat16)"] == other * (4 if upcast else 2)
    # TRL's trainers cast the LoRA factors of a 4-bit model to bf16 (test_trained_qlora_adapter_is_the_estimated_bytes)
    assert rows["optimizer states"] == 2 * 2 * c.lora and rows["gradients"] == 2 * c.lora
    assert 8 < est.total / GiB < 16  # a 24 GB GPU recipe
    # issue 20's target for the default: at most 10.5 GiB (9.69; 14.94 with the fp32 cast)
    assert est.total / GiB > 14 if upcast else est.total / GiB <= 10.5


@pytest.mark.parametrize("upcast", UPCAST)
@pytest.mark.parametrize("option", TEST_MODELS)
def test_built_qlora_weights_are_the_estimated_bytes(option, upcast):
    """The base weights that are not 4-bit, in the model build_model makes (bf16 weights), take the bytes the
    estimate's weight rows say: 2 each by default, 4 each with adapter.qlora_fp32_upcast."""
    from qwenvl_ft.modeling.build import build_model

    _skip_qlora(option)
    typed = _typed("recipe=demo", f"model={option}", "adapter=qlora", "model.dtype=bfloat16",
                   "model.freeze_vision_tower=true", "model.freeze_merger=true", _upcast(upcast))
    model = build_model(typed.model, typed.adapter)
    base = [p for name, p in model.named_parameters() if "lora_" not in name]
    other = [p for p in base if type(p).__name__ != "Params4bit"]
    assert {p.dtype for p in other} == {torch.float32 if upcast else torch.bfloat16}
    assert not any(p.requires_grad for p in base)
    est = estimate_memory(typed)
    rows = {name: b for name, b, _ in est.rows}
    assert rows.get("weights (fp32)", 0) + rows.get("weights (bfloat16)", 0) == sum(
        p.numel() * p.element_size() for p in other)


@pytest.mark.parametrize("option", TEST_MODELS)
def test_quantized_linears_are_the_ones_bitsandbytes_replaces(option):
    from qwenvl_ft.modeling.build import build_model

    _skip_qlora(option)
    typed = _typed("recipe=demo", f"model={option}", "adapter=qlora", "model.freeze_vision_tower=true",
                   "model.freeze_merger=false")
    model = build_model(typed.model, typed.adapter)
    built = sum(m.weight.numel() * 2 for m in model.modules()  # Params4bit packs two values per byte
                if isinstance(m, nn.Linear) and type(m.weight).__name__ == "Params4bit")
    assert count_parameters(typed).quantized == built > 0


def _built_layer_saved_bytes(adapter: str, option: str, *overrides) -> tuple:
    """(saved bytes per token of one decoder layer, dtype of the residual stream entering the layers, config, the
    indices of the layers measured) of the model the run builds (build_model: 4-bit loading and, for QLoRA,
    modeling/build.py's prepare_4bit_model), bf16 weights under bf16 autocast; the difference between the layer
    counts and between two lengths leaves the added layers' per-token bytes."""
    from qwenvl_ft.modeling.build import build_model, model_parts

    few, many = _layer_counts(option)
    measured, residual = {}, []
    for layers in (few, many):
        cfg = _typed("recipe=demo", f"model={option}", f"adapter={adapter}", "model.dtype=bfloat16",
                     "trainer.precision=bf16", "adapter.target_modules=[q_proj,v_proj,down_proj]", *ARCH,
                     *FAMILY_ARCH.get(option, []), f"model.architecture.num_hidden_layers={layers}",
                     "model.architecture.vision_depth=1", *overrides)
        model = build_model(cfg.model, cfg.adapter).train()
        lm = model_parts(model).language_model
        first = model_parts(model).decoder_layers[0]
        hook = first.register_forward_pre_hook(
            lambda module, args, kwargs: residual.append((args[0] if args else kwargs["hidden_states"]).dtype),
            with_kwargs=True)
        for tokens in (64, 128):
            ids = torch.randint(10, 200, (1, tokens))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                measured[layers, tokens] = _saved_bytes(model, lambda: lm(input_ids=ids, use_cache=False))
        hook.remove()
    added = (measured[many, 128] - measured[many, 64]) - (measured[few, 128] - measured[few, 64])
    return added / 64 / (many - few), residual[0], cfg, range(few, many)


@pytest.mark.parametrize("upcast", UPCAST)
@pytest.mark.parametrize("option", TEST_MODELS)
def test_qlora_layer_residual_and_mlp_dtypes(option, upcast):
    """With adapter.qlora_fp32_upcast the decoder layers see an fp32 residual stream (PEFT's
    prepare_model_for_kbit_training casts norms and embeddings) and bitsandbytes returns the 4-bit MLP projections'
    outputs in that dtype: the layer saves its MLP tensors at 4 bytes, where a bf16 LoRA model saves them at 2, and
    nothing else changes (the GPU measurement of QLoRA was 29% above the estimate before the estimate counted
    this). By default the residual stays bf16 and the QLoRA layer saves exactly what the bf16 LoRA layer saves.
    The estimate's ActivationDtypes say the same. Layers of several kinds (Qwen3.5) are checked whole under
    autocast too: the delta rule keeps its matmuls' casts."""
    from qwenvl_ft.estimate.counts import hf_config
    from qwenvl_ft.families.base import layer_kinds

    _skip_qlora(option)
    qlora, qlora_residual, cfg, added = _built_layer_saved_bytes("qlora", option, _upcast(upcast))
    lora, lora_residual, lora_cfg, _ = _built_layer_saved_bytes("lora", option)
    text, family = hf_config(cfg.model).get_text_config(), family_of_option(option)
    lora_in = {"full_attention": [128, 128, 352], "linear_attention": [352]}
    kinds = [layer_kinds(text)[i] for i in added]
    formula = {bytes_: sum(family.layer_kind_bytes(text, kind, a=2, trainable=False, lora_in=lora_in[kind], r=8,
                                                   mask_bytes=4, mlp_bytes=bytes_) for kind in kinds) / len(kinds)
               for bytes_ in (2, 4)}
    mlp = 4 if upcast else 2
    # Exact when run alone (48 runs of this test passed, 2026-12-07); in full-suite runs the QLoRA layer measured 2
    # bytes a token more than the formula twice in about eight runs (tiny and tiny_qwen2_5_vl, fp32_upcast), after
    # other tests in the same process; the cause is not found. The tolerance is that one bf16 value per token, 0.02%
    # of the layer; the MLP's dtype this test is about moves the figure by 3 x 2 x intermediate_size (2,112 bytes).
    assert abs((qlora - lora) - (formula[mlp] - formula[2])) <= 2, (qlora, lora, formula)
    if family.kind_layer_bytes is None:
        assert formula[4] - formula[2] == 3 * 2 * text.intermediate_size
    else:  # q_norm's input and the output gate are 4-bit Linears' outputs as well
        assert (qlora, lora) == (formula[mlp], formula[2])
    assert (qlora_residual, lora_residual) == (torch.float32 if upcast else torch.bfloat16, torch.bfloat16)
    predicted = {name: ActivationDtypes.of(count_parameters(c), 2, 2) for name, c in (("qlora", cfg),
                                                                                        ("lora", lora_cfg))}
    assert (predicted["qlora"].residual, predicted["qlora"].linear) == (mlp, mlp)
    assert (predicted["lora"].residual, predicted["lora"].linear) == (2, 2)


@pytest.mark.parametrize("upcast", UPCAST)
@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_trained_qlora_adapter_is_the_estimated_bytes(method, upcast, tmp_path):
    """The trainable parameters of TRL's SFTTrainer, as the run builds it, on a 4-bit bf16 base with a merger that
    trains in full (a modules_to_save copy), take the bytes of the estimate's adapter row: TRL casts the LoRA
    factors and the copy to bf16 (DoRA's magnitude vectors stay fp32). CPU runs without autocast, where the copy
    gets model.dtype back (training/trainer.py), bf16 here too."""
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.shapes import make_rows
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.sft import build_trainer

    typed = _typed("recipe=demo", f"adapter={method}", "adapter.load_in_4bit=true", "model.dtype=bfloat16",
                   "model.freeze_vision_tower=true", "model.freeze_merger=false", "trainer.report_to=[none]",
                   _upcast(upcast))
    processor = build_processor(typed.model, typed.data)
    model = build_model(typed.model, typed.adapter)
    trainer = build_trainer(typed, model, processor, VisionChatCollator(processor, typed.data),
                            to_dataset(make_rows(4, 56, seed=0, split="train")), None)
    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    magnitudes = {p.dtype for name, p in trained.items() if "lora_magnitude_vector" in name}
    assert magnitudes == ({torch.float32} if method == "dora" else set())
    assert any("merger" in name and "lora_" not in name for name in trained)
    rows = {name: b for name, b, _ in estimate_memory(typed).rows}
    assert rows["adapter weights"] == rows["gradients"] == sum(p.numel() * p.element_size() for p in trained.values())
