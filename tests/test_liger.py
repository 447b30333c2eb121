"""model.use_liger_kernel (qwenvl_ft/training/speed.py): what Liger Kernel really patches on each family's model,
with the transformers installed, applied exactly as the Trainer applies it (transformers' `apply_liger_kernel`
with TRL's config: fused linear cross-entropy off, TRL's own fused LM head stays), and the families it cannot
patch refused before anything loads. Patching is inspected on CPU (Liger replaces module forwards and module-level
names; its Triton kernels only run on CUDA: the @gpu test compares them with eager)."""

import importlib.util
import sys
from contextlib import contextmanager

import pytest
import torch

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError

from family_models import TEST_MODELS, family_of_option

needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason='liger-kernel is not installed (pip install "qwenvl-ft[liger]")')

# What TRL's SFT, DPO and GRPO trainers pass to the Trainer's Liger call: TRL fuses the LM head itself.
TRL_LIGER_CONFIG = {"fused_linear_cross_entropy": False}

# What Liger 0.8.5 patches on transformers 5.25 per family it can patch: rms_norm (decoder and final norms),
# swiglu (dense MLPs, the MoE families' shared expert), experts (fused MoE experts), rope (the rotary functions
# of the language model and the vision tower). Qwen3.5's RoPE patch is off by default in Liger.
EXPECTED_KERNELS = {
    "qwen3_5": {"rms_norm", "swiglu"},
    "qwen3_5_moe": {"rms_norm", "swiglu", "experts"},
    "qwen3_vl_moe": {"rms_norm", "experts", "rope"},
}


def _typed(*overrides):
    return validate(compose(["recipe=demo", *overrides], output_dir="/tmp/unused"))


@contextmanager
def _transformers_modules_restored():
    """Liger patches classes and functions of transformers' modeling modules for the whole process; put every
    name back afterwards so that no later test builds a Liger module on CPU. Yields the names as they were."""
    saved = {name: dict(vars(module)) for name, module in list(sys.modules.items())
             if name.startswith("transformers.models.") and module is not None}
    try:
        yield saved
    finally:
        for name, before in saved.items():
            module = sys.modules[name]
            for key in [key for key in vars(module) if key not in before]:
                delattr(module, key)
            for key, value in before.items():
                if vars(module).get(key) is not value:
                    setattr(module, key, value)


def _kind(qualname: str):
    for prefix, kind in (("LigerRMSNorm", "rms_norm"), ("LigerLayerNorm", "layer_norm"), ("LigerExperts", "experts")):
        if qualname.startswith(prefix):
            return kind
    return "swiglu" if qualname.startswith("Liger") and "SwiGLU" in qualname else None


def _patched_modules(model) -> dict:
    """module name -> kernel kind, for every module whose forward Liger replaced on the instance."""
    patched = {}
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        kind = _kind(getattr(getattr(forward, "__func__", forward), "__qualname__", "")) if forward else None
        if kind:
            patched[name] = kind
    return patched


def _lora_model(option):
    from qwenvl_ft.modeling.build import build_model

    typed = _typed(f"model={option}", "adapter=lora")
    torch.manual_seed(0)
    return build_model(typed.model, typed.adapter)


@needs_liger
@pytest.mark.parametrize("option", TEST_MODELS)
def test_liger_patches_every_target_it_names_or_the_family_is_refused(option):
    from transformers.integrations.liger import apply_liger_kernel

    from qwenvl_ft.modeling.build import model_parts
    from qwenvl_ft.training.speed import liger_problem

    family = family_of_option(option).name
    model = _lora_model(option)
    base = model.get_base_model()
    modeling = type(base).__module__
    problem = liger_problem(family)
    with _transformers_modules_restored() as before:
        if problem is not None:  # the refusal is true: Liger's own patch fails or does nothing
            try:
                apply_liger_kernel(model, TRL_LIGER_CONFIG)
            except ImportError:
                return
            assert not _patched_modules(base), f"{family} refused ({problem}) but Liger patched it"
            return
        apply_liger_kernel(model, TRL_LIGER_CONFIG)
        names = vars(sys.modules[modeling])
        added = sorted(set(names) - set(before[modeling]))
        replaced = {key for key, value in before[modeling].items() if names[key] is not value}
        patched = _patched_modules(base)
    # Every name Liger sets must exist in transformers' module: one that no longer exists (Qwen2-VL's
    # apply_multimodal_rotary_pos_emb in transformers 5) would be a patch that silently does nothing.
    assert not added, f"Liger set {added} on {modeling}, which transformers no longer defines"
    rope = {"rope"} if any("rotary" in key for key in replaced) else set()
    assert set(patched.values()) | rope == EXPECTED_KERNELS[family], (patched, replaced)
    kernels = {id(module): patched[name] for name, module in base.named_modules() if name in patched}
    for layer in model_parts(base).decoder_layers:  # the norms of every decoder layer, not only some
        assert kernels.get(id(layer.input_layernorm)) == kernels.get(id(layer.post_attention_layernorm)) == "rms_norm"
    assert "forward" not in vars(base), "Liger replaced the model's forward: TRL's fused LM head would be lost"


@needs_liger
@pytest.mark.parametrize("option", TEST_MODELS)
def test_use_liger_kernel_is_refused_at_preflight_for_a_family_liger_cannot_patch_or_on_cpu(option):
    from qwenvl_ft.training.preflight import preflight
    from qwenvl_ft.training.speed import liger_problem

    family = family_of_option(option).name
    typed = _typed(f"model={option}", "model.use_liger_kernel=true", "trainer.report_to=[none]")
    problem = liger_problem(family)
    if problem is None and torch.cuda.is_available():
        preflight(typed)
        return
    expected = (rf"model.use_liger_kernel=true: Liger Kernel .* cannot patch {family} models" if problem
                else "model.use_liger_kernel=true needs a CUDA GPU")
    with pytest.raises(ConfigError, match=expected) as error:
        preflight(typed)
    assert "\n" not in str(error.value)


@pytest.mark.gpu
@needs_liger
def test_liger_kernels_give_the_eager_loss_and_gradients_on_cuda():
    """Liger's RMSNorm, SwiGLU, RoPE and expert kernels against transformers' modules, on the first family Liger
    can patch: the model's loss and the LoRA gradients."""
    from transformers.integrations.liger import apply_liger_kernel

    from qwenvl_ft.training.speed import liger_problem

    option = next(o for o in TEST_MODELS if liger_problem(family_of_option(o).name) is None)
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 64), device="cuda")  # ordinary tokens: the special ones start at 567
    results = []
    for liger in (False, True):
        model = _lora_model(option).to("cuda")
        with _transformers_modules_restored():
            if liger:
                apply_liger_kernel(model, TRL_LIGER_CONFIG)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach().float(), grads))
    (eager_loss, eager_grads), (liger_loss, liger_grads) = results
    torch.testing.assert_close(liger_loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == liger_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(liger_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
