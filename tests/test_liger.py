"""model.use_liger_kernel (qwenvl_ft/training/speed.py, qwenvl_ft/modeling/liger.py). Two paths:
  - families whose Liger patch works with the installed transformers: what Liger really patches on each family's
    model, applied exactly as the Trainer applies it (transformers' `apply_liger_kernel` with TRL's config: fused
    linear cross-entropy off, TRL's own fused LM head stays);
  - families that declare `liger_modules` (Liger's patch fails on transformers 5): qwenvl-ft swaps those modules
    for Liger's public module classes, and the Trainer's own patch stays off.
Inspected on CPU (Liger's modules have no CPU path: their Triton kernels only run on CUDA, and Triton's
interpreter cannot run Liger 0.8.5's kernels), with Liger's kernels replaced by torch references of their math to
check the wiring; the @gpu test compares the real kernels with eager for every family."""

import importlib.util
import sys
from collections import Counter
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


def _lora_model(option, *overrides):
    from qwenvl_ft.modeling.build import build_model

    typed = _typed(f"model={option}", "adapter=lora", *overrides)
    torch.manual_seed(0)
    return build_model(typed.model, typed.adapter)


@needs_liger
@pytest.mark.parametrize("option", TEST_MODELS)
def test_liger_patches_every_target_it_names_or_the_family_swaps_its_own(option):
    from transformers.integrations.liger import apply_liger_kernel

    from qwenvl_ft.modeling.build import model_parts
    from qwenvl_ft.training.speed import liger_problem

    family = family_of_option(option).name
    model = _lora_model(option)
    base = model.get_base_model()
    modeling = type(base).__module__
    problem = liger_problem(family)
    with _transformers_modules_restored() as before:
        if problem is not None:  # Liger's own patch fails or does nothing: the family must swap its own modules
            assert family_of_option(option).liger_modules, f"{family}: {problem}, and no liger_modules declared"
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


# What qwenvl-ft swaps per family that declares liger_modules: module kinds, and the leaf names they sit at.
EXPECTED_SWAPS = {
    "qwen2_vl": {"rms_norm": {"input_layernorm", "post_attention_layernorm", "norm"}, "swiglu": {"mlp"},
                 "layer_norm": {"norm1", "norm2", "ln_q"}},
    "qwen2_5_vl": {"rms_norm": {"input_layernorm", "post_attention_layernorm", "norm", "norm1", "norm2", "ln_q"},
                   "swiglu": {"mlp"}},
    "qwen3_vl": {"rms_norm": {"input_layernorm", "post_attention_layernorm", "norm", "q_norm", "k_norm"},
                 "swiglu": {"mlp"}, "layer_norm": {"norm1", "norm2", "norm"}},
}
SWAP_OPTIONS = [option for option in TEST_MODELS if family_of_option(option).liger_modules]
LIGER_CLASSES = {"rms_norm": "LigerRMSNorm", "layer_norm": "LigerLayerNorm", "swiglu": "LigerSwiGLUMLP"}


def test_every_family_liger_cannot_patch_declares_its_swaps_and_only_those():
    assert {family_of_option(option).name for option in SWAP_OPTIONS} == set(EXPECTED_SWAPS)


@needs_liger
@pytest.mark.parametrize("option", SWAP_OPTIONS)
def test_liger_swap_replaces_exactly_the_declared_modules_and_keeps_their_weights(option):
    from qwenvl_ft.modeling.build import model_parts
    from qwenvl_ft.modeling.liger import use_liger_modules

    family = family_of_option(option)
    model = _lora_model(option, "adapter.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]")
    classes = dict(family.load_liger_classes())
    before = dict(model.named_modules())
    declared = {name: classes[type(module)] for name, module in before.items() if type(module) in classes}
    state = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    counts = use_liger_modules(model, list(classes.items()))
    after = dict(model.named_modules())

    # same names everywhere (checkpoints, LoRA targets, FSDP wrapping), less the swapped MLPs' activation modules
    # (Liger's SwiGLU kernel is the activation)
    activations = {f"{name}.act_fn" for name, kind in declared.items() if kind == "swiglu"}
    assert after.keys() == before.keys() - activations and activations <= before.keys()
    swapped = {name for name in after if after[name] is not before[name]}
    assert swapped == declared.keys()
    assert {kind: count["swapped"] for kind, count in counts.items()} == dict(Counter(declared.values()))
    leaves = {}
    for name in swapped:
        leaves.setdefault(declared[name], set()).add(name.rsplit(".", 1)[-1])
        assert type(after[name]).__name__ == LIGER_CLASSES[declared[name]], name
    assert leaves == EXPECTED_SWAPS[family.name]
    # every decoder layer's norms and MLP, and the final norm
    base = model.get_base_model()
    for layer in model_parts(base).decoder_layers:
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            assert type(module).__name__.startswith("Liger")
    # the same tensors under the same keys, the same trainable parameters
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    for key, tensor in state.items():
        assert after_state[key].data_ptr() == tensor.data_ptr() and torch.equal(after_state[key], tensor), key
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert any("lora_A" in name and ".mlp." in name for name in trainable)  # LoRA inside the swapped MLPs
    for name in swapped:
        old, new = before[name], after[name]
        if declared[name] == "swiglu":
            assert (new.gate_proj, new.up_proj, new.down_proj) == (old.gate_proj, old.up_proj, old.down_proj)
        elif declared[name] == "rms_norm":
            assert (new.variance_epsilon, new.offset, new.casting_mode) == (old.variance_epsilon, 0.0, "llama")
        else:
            assert new.variance_epsilon == old.eps and new.bias is old.bias
        assert new.training == old.training


def _liger_math_in_torch(monkeypatch):
    """Liger's three kernels replaced by torch code of the math they document (RMSNorm in "llama" casting mode:
    the statistics in fp32, the normalised input cast back before the weight multiplies it; SiLU(gate) * up;
    LayerNorm), so that the swapped model runs on CPU: what this checks is the wiring (which weights, eps, offset,
    casting mode, gate against up), not Liger's kernels (the @gpu test)."""
    import torch.nn.functional as F
    from liger_kernel.transformers import layer_norm, rms_norm, swiglu

    class RMSNormMath:
        @staticmethod
        def apply(x, weight, eps, offset, casting_mode, in_place, row_mode):
            assert casting_mode == "llama"
            x32 = x.float()
            return (offset + weight) * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    monkeypatch.setattr(rms_norm, "LigerRMSNormFunction", RMSNormMath)
    monkeypatch.setattr(swiglu, "_swiglu_dispatch", lambda a, b: F.silu(a) * b)
    monkeypatch.setattr(layer_norm, "_functional_layer_norm",
                        lambda x, w, b, eps, impl=None, mode=None: F.layer_norm(x, (x.shape[-1],), w, b, eps))


def _image_batch(option, device="cpu"):
    """Two rows with images of different sizes, through the family's processor and our collator."""
    from PIL import Image

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_processor

    typed = _typed(f"model={option}")
    collator = VisionChatCollator(build_processor(typed.model, typed.data), typed.data)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
             "images": [Image.new("RGB", size, color)], "source": f"test:{index}"}
            for index, (size, color, question, answer) in enumerate([
                ((56, 56), (200, 40, 40), "What is in the image?", "a red square"),
                ((112, 84), (40, 40, 200), "Describe the image.", "a blue rectangle, wider than tall")])]
    return {key: value.to(device) for key, value in collator(rows).items()}


def _full_model(option, device="cpu"):
    from qwenvl_ft.modeling.build import model_class, model_source

    typed = _typed(f"model={option}")
    torch.manual_seed(0)
    return model_class(typed.model).from_pretrained(model_source(typed.model), dtype=torch.float32).to(device).train()


def _loss_and_grads(model, batch):
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


@needs_liger
@pytest.mark.parametrize("option", SWAP_OPTIONS)
def test_swapped_model_computes_what_eager_does_with_liger_math_in_torch(option, monkeypatch):
    from qwenvl_ft.modeling.liger import use_liger_modules

    batch = _image_batch(option)
    eager_loss, eager_grads = _loss_and_grads(_full_model(option), batch)
    model = _full_model(option)
    use_liger_modules(model, family_of_option(option).load_liger_classes())
    _liger_math_in_torch(monkeypatch)
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    assert any(".visual.blocks." in name for name in grads)  # the vision tower's swapped modules ran backward
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@needs_liger
@pytest.mark.parametrize("option", TEST_MODELS)
def test_use_liger_kernel_passes_preflight_with_cuda_and_is_refused_without(option, monkeypatch):
    import transformers.utils

    from qwenvl_ft.training.arguments import training_arguments
    from qwenvl_ft.training.preflight import preflight
    from qwenvl_ft.training.speed import liger_by_us, liger_problem

    family = family_of_option(option)
    typed = _typed(f"model={option}", "model.use_liger_kernel=true", "trainer.report_to=[none]")
    assert liger_by_us(typed.model) == bool(family.liger_modules)
    if not family.liger_modules:  # the Trainer's path: a family its Liger cannot patch would be refused
        assert liger_problem(family.name) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.use_liger_kernel=true needs a CUDA GPU") as error:
        preflight(typed)
    assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)  # asks the GPU
    preflight(typed)
    # the Trainer applies Liger's own patch only where we do not swap modules ourselves
    assert training_arguments(typed)["use_liger_kernel"] == (not family.liger_modules)


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("option", TEST_MODELS)
def test_liger_kernels_give_the_eager_loss_and_gradients_on_cuda(option):
    """Liger's kernels (RMSNorm, LayerNorm, SwiGLU, RoPE and experts, as each family gets them: our swap, or
    Liger's own patch applied as the Trainer does) against transformers' modules, on every family: the loss and
    every gradient of a fully trained model over a batch with images."""
    from transformers.integrations.liger import apply_liger_kernel

    from qwenvl_ft.modeling.liger import use_liger_modules

    family = family_of_option(option)
    batch = _image_batch(option, "cuda")
    eager_loss, eager_grads = _loss_and_grads(_full_model(option, "cuda"), batch)
    model = _full_model(option, "cuda")
    with _transformers_modules_restored():
        if family.liger_modules:
            use_liger_modules(model, family.load_liger_classes())
        else:
            apply_liger_kernel(model, TRL_LIGER_CONFIG)
        assert any(type(m).__name__.startswith("Liger") or "Liger" in repr(m) for m in model.modules())
        liger_loss, liger_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(liger_loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == liger_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(liger_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@needs_liger
@pytest.mark.parametrize("option", TEST_MODELS)
def test_finish_trainer_swaps_liger_modules_on_policy_and_reference_only_where_the_family_declares_them(option):
    """training/trainer.py's finish_trainer, which every method's trainer goes through: the swap on the policy
    and on a reference model, with the run log's line; a family on Liger's own patch is left to the Trainer."""
    from types import SimpleNamespace

    from qwenvl_ft.training.trainer import finish_trainer

    family = family_of_option(option)
    typed = _typed(f"model={option}", "adapter=lora", "model.use_liger_kernel=true")
    policy, reference = _lora_model(option), _lora_model(option)
    modules = {name: module for name, module in policy.named_modules()}
    trainer = SimpleNamespace(model=policy, ref_model=reference, args=SimpleNamespace(bf16=False, fp16=False))
    finish_trainer(trainer, typed)
    classes = dict(family.load_liger_classes())
    for model in (policy, reference):
        liger = [name for name, module in model.named_modules() if type(module).__name__.startswith("Liger")]
        assert bool(liger) == bool(family.liger_modules), option
        assert not any(type(module) in classes for module in model.modules())
    if not family.liger_modules:
        assert all(modules[name] is module for name, module in policy.named_modules())
