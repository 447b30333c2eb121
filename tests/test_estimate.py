"""`qwenvl-ft estimate`: parameter counts on the meta device, byte arithmetic, and the activation formula checked
against the tensors autograd really saves (on CPU; the comparison with measured GPU peaks needs a GPU)."""

import pytest
import torch

from qwenvl_ft import families
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.estimate.budget import batch_budget
from qwenvl_ft.estimate import experts
from qwenvl_ft.estimate.counts import count_parameters, meta_model
from qwenvl_ft.estimate.memory import estimate_memory

from family_models import DEFAULT_MODEL, TEST_MODELS, family_of_option, lora_settings


def _typed(*overrides):
    return validate(compose(list(overrides), output_dir="/tmp/unused"))


# The ViT by hand: 32 blocks of two LayerNorms (2 x 2 x 1280), qkv (1280 x 3840 + 3840), proj (1280^2 + 1280),
# fc1 (1280 x 5120 + 5120), fc2 (5120 x 1280 + 1280); a bias-free Conv3d patch embedding (1280 x 3 x 2 x 14 x 14).
VIT = 32 * (4 * 1280 + 1280 * 3840 + 3840 + 1280 ** 2 + 1280 + 2 * 1280 * 5120 + 5120 + 1280) + 1280 * 3 * 2 * 14 * 14


def _merger(hidden):  # LayerNorm(1280), Linear(5120, 5120), Linear(5120, hidden)
    return 2 * 1280 + 5120 * 5120 + 5120 + 5120 * hidden + hidden


@pytest.mark.parametrize("option, expected, hidden", [
    ("qwen2_vl_2b", 2_208_985_600, 1536),  # Qwen/Qwen2-VL-2B-Instruct's safetensors hold exactly this many
    ("qwen2_vl_7b", 8_291_375_616, 3584),  # Qwen/Qwen2-VL-7B-Instruct
])
def test_full_size_parameter_counts_match_the_released_models(option, expected, hidden):
    counts = count_parameters(_typed(f"model={option}", "adapter=full"))
    assert counts.total == expected
    assert sum(counts.by_part.values()) == expected
    assert counts.by_part["vision"] == VIT and counts.by_part["merger"] == _merger(hidden)


# Qwen2.5-VL's ViT: RMSNorms without bias (2 x 1280), the same attention, a gated MLP (gate and up 1280 x 3420 + 3420,
# down 3420 x 1280 + 1280); the merger's norm is an RMSNorm too.
VIT_2_5 = 32 * (2 * 1280 + 1280 * 3840 + 3840 + 1280 ** 2 + 1280 + 2 * (1280 * 3420 + 3420) + 3420 * 1280 + 1280) \
    + 1280 * 3 * 2 * 14 * 14


@pytest.mark.parametrize("option, expected, hidden", [
    ("qwen2_5_vl_3b", 3_754_622_976, 2048),  # Qwen/Qwen2.5-VL-3B-Instruct's model card: 3.75B
    ("qwen2_5_vl_7b", 8_292_166_656, 3584),  # Qwen/Qwen2.5-VL-7B-Instruct's: 8.29B
])
def test_qwen2_5_vl_parameter_counts_match_the_released_models(option, expected, hidden):
    counts = count_parameters(_typed(f"model={option}", "adapter=full"))
    assert counts.total == expected
    assert counts.by_part["vision"] == VIT_2_5 and counts.by_part["merger"] == _merger(hidden) - 1280


# Qwen3-VL's ViT: LayerNorms with bias (2 x 2d), qkv (d x 3d + 3d), proj (d^2 + d), linear_fc1 (d x mlp + mlp),
# linear_fc2 (mlp x d + d); a Conv3d patch embedding with bias (d x 3 x 2 x 16 x 16 + d) and 2304 learned
# positions (2304 x d).
def _vit_3(d, mlp, depth):
    return depth * (4 * d + d * 3 * d + 3 * d + d * d + d + d * mlp + mlp + mlp * d + d) \
        + d * 3 * 2 * 16 * 16 + d + 2304 * d


# The merger (LayerNorm(d), Linear(4d, 4d), Linear(4d, hidden)) and one DeepStack merger per listed block (the same
# with a LayerNorm over 4d).
def _mergers_3(d, hidden, deepstack):
    mlp = 4 * d * 4 * d + 4 * d + 4 * d * hidden + hidden
    return 2 * d + mlp + deepstack * (2 * 4 * d + mlp)


# The released counts (read from public records of the hub checkpoints, no network here): Qwen/Qwen3-VL-8B-Instruct's
# four safetensors files hold 8,767,123,696 parameters (a tensor-by-tensor listing of the files); the hub API reports
# a safetensors total of 2,127,532,032 for Qwen/Qwen3-VL-2B-Instruct; Qwen/Qwen3-VL-4B-Instruct loaded from the hub
# counts 4,437,815,808.
@pytest.mark.parametrize("option, expected, hidden, d, mlp, depth", [
    ("qwen3_vl_2b", 2_127_532_032, 2048, 1024, 4096, 24),
    ("qwen3_vl_4b", 4_437_815_808, 2560, 1024, 4096, 24),
    ("qwen3_vl_8b", 8_767_123_696, 4096, 1152, 4304, 27),
])
def test_qwen3_vl_parameter_counts_match_the_released_models(option, expected, hidden, d, mlp, depth):
    counts = count_parameters(_typed(f"model={option}", "adapter=full"))
    assert counts.total == expected
    assert counts.by_part["vision"] == _vit_3(d, mlp, depth)
    assert counts.by_part["merger"] == _mergers_3(d, hidden, deepstack=3)


# Qwen3.5: the released totals are keras-hub's (keras_hub/src/models/qwen3_5/qwen3_5_presets.py, each checkpoint's
# "params"), without the multi-token-prediction head that transformers does not load; the 2B's is also its safetensors
# index's total_parameters. The language models against llama.cpp's counts of the released text GGUFs: 1,881,825,088
# for the 2B (n_params, exact), 8.95 B for the 9B (its load log, rounded). The vision towers are Qwen3-VL's ViT
# without DeepStack mergers; the 2B has the 4B's, the 27B the 9B's.
@pytest.mark.parametrize("option, expected, text, d, mlp, depth", [
    ("qwen3_5_0_8b", 852_985_920, None, 768, 3072, 12),
    ("qwen3_5_2b", 2_213_241_664, 1_881_825_088, 1024, 4096, 24),
    ("qwen3_5_4b", 4_539_265_536, None, 1024, 4096, 24),
    ("qwen3_5_9b", 9_409_813_744, 8.95, 1152, 4304, 27),
    ("qwen3_5_27b", 27_356_728_560, None, 1152, 4304, 27),
])
def test_qwen3_5_parameter_counts_match_the_released_models(option, expected, text, d, mlp, depth):
    typed = _typed(f"model={option}", "adapter=full")
    counts = count_parameters(typed)
    assert counts.total == expected
    assert counts.by_part["vision"] == _vit_3(d, mlp, depth)
    assert counts.by_part["merger"] == _mergers_3(d, typed.model.architecture.hidden_size, deepstack=0)
    text_part = counts.total - counts.by_part["vision"] - counts.by_part["merger"]
    if isinstance(text, int):  # an exact count
        assert text_part == text
    elif text is not None:  # billions, as rounded in the source
        assert round(text_part / 1e9, 2) == text


@pytest.mark.parametrize("overrides, total, gpu_gib", [
    (["recipe=lora_qwen3_5_9b_llava"], "9.410B", 24), (["recipe=qlora_qwen3_5_27b_amazon"], "27.357B", 48),
    (["recipe=grpo_lora_qwen3_5_4b"], "4.539B", 40),
    (["recipe=lora_qwen3vl_8b_llava", "model=qwen3_5_2b"], "2.213B", 16),  # the GPU its option's file names
])
def test_qwen3_5_recipes_estimate_offline(overrides, total, gpu_gib, capsys):
    """`qwenvl-ft estimate` on each Qwen3.5 recipe (and the 2B option, which has none) runs without the hub (the
    option's architecture) and prints the parameter total checked above and a peak that fits the GPU named."""
    from qwenvl_ft.commands.estimate import estimate

    result = estimate(compose([*overrides, "data.path=/unused.json"], output_dir="/tmp/unused"))
    out = capsys.readouterr().out
    assert f"{total} parameters" in out and "Gated DeltaNet x" in out
    assert result["predicted_peak_gib"] < gpu_gib * 0.9


def test_meta_model_allocates_nothing():
    model = meta_model(_typed("model=qwen2_vl_7b").model)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("option", TEST_MODELS)
def test_tiny_counts_equal_the_built_model(option):
    from qwenvl_ft.modeling.build import build_model, count_parameters as built_count

    cases = [["adapter=lora"],  # the tiny models train their vision tower and projectors: modules_to_save copies
             ["adapter=lora", "adapter.vision_lora=true"]]
    if option == DEFAULT_MODEL:  # the adapter methods count alike whatever the family
        cases += [["adapter=full", "model.freeze_vision_tower=true"],
                  ["adapter=lora", "model.freeze_vision_tower=true"], ["adapter=dora", "model.freeze_vision_tower=true"]]
    for overrides in cases:
        typed = _typed("recipe=demo", f"model={option}", *overrides)
        model = build_model(typed.model, typed.adapter)
        trainable, total = built_count(model)
        counts = count_parameters(typed)
        assert counts.trainable == trainable, overrides
        assert counts.total + counts.saved_copies + counts.lora == total, overrides


def test_lora_count_on_7b_by_hand():
    # r=8 on q_proj (3584 -> 3584) and v_proj (3584 -> 512) of 28 layers
    counts = count_parameters(_typed("recipe=qlora_7b_amazon"))
    assert counts.lora == 28 * 8 * ((3584 + 3584) + (3584 + 512))
    assert counts.lora_modules == {"q_proj": 28, "v_proj": 28}


def test_full_fine_tune_bytes_and_switches():
    full = estimate_memory(_typed("model=qwen2_vl_2b", "adapter=full", "model.freeze_vision_tower=true",
                                  "data.max_pixels=200704"))
    rows = {name: b for name, b, _ in full.rows}
    c = full.counts
    assert rows["weights (bfloat16)"] == c.total * 2
    assert rows["gradients"] == c.trainable * 2 and rows["optimizer states"] == c.trainable * 4
    eight_bit = estimate_memory(_typed("model=qwen2_vl_2b", "adapter=full", "model.freeze_vision_tower=true",
                                       "data.max_pixels=200704", "optimizer=paged_adamw_8bit"))
    assert dict((n, b) for n, b, _ in eight_bit.rows)["optimizer states"] == 2 * c.trainable
    no_ckpt = estimate_memory(_typed("model=qwen2_vl_2b", "adapter=full", "model.freeze_vision_tower=true",
                                     "data.max_pixels=200704", "model.gradient_checkpointing=false"))
    act = {n: b for n, b, _ in no_ckpt.rows}["activations: LM"]
    assert act > 5 * rows["activations: LM"]  # checkpointing keeps one layer's worth plus the layer inputs


def test_batch_budget_layouts():
    family = families.get(families.DEFAULT)
    data = _typed("recipe=demo", "data.max_length=512", "data.max_pixels=200704").data  # 256 tokens per image
    padded = batch_budget(data, 4, family)
    assert (padded.rows, padded.tokens, padded.visual_tokens) == (4, 2048, 4 * 256)
    assert padded.vision_patches == 4 * padded.visual_tokens
    from dataclasses import replace

    packed = batch_budget(replace(data, packing=True, max_tokens_per_batch=4096), 4, family)
    assert (packed.rows, packed.tokens) == (8, 4096)
    capped = batch_budget(replace(data, max_visual_tokens=64), 4, family)
    assert capped.visual_tokens == 4 * 64
    # the family's own image geometry: 32 x 32 pixels per visual token, its processor's default image size
    qwen3 = families.get("qwen3_vl")
    assert batch_budget(data, 4, qwen3).visual_tokens == 4 * (200704 // 32 ** 2)
    default_size = batch_budget(replace(data, max_pixels=None, max_length=20000), 1, qwen3)
    assert default_size.visual_tokens == qwen3.image_max_pixels // 32 ** 2 == 16384
    # DPO: 4 pairs are 8 sequences, but the vision tower encodes each pair's images once
    pairs = batch_budget(data, 4, family, pairs=True)
    assert (pairs.rows, pairs.tokens, pairs.visual_tokens, pairs.vision_patches) == (8, 8 * 512, 4 * 256, 4 * 1024)


def test_dpo_estimate_counts_pairs_and_the_reference_copy():
    def components(*overrides):
        return {name: value for name, value, _ in estimate_memory(_typed(*overrides)).rows}

    common = ("model=qwen2_vl_2b", "data.max_length=1024", "data.max_pixels=200704")
    dpo = ("trainer=dpo", "data=llava_preference", "data.path=/d.json", "trainer.batch_size=1")
    lora = components(*common, *dpo)
    assert "reference model" not in lora  # the reference is the base with the adapter disabled
    # one pair is two sequences: the language-model activations of an SFT batch of two rows
    sft_two = components(*common, "trainer.batch_size=2")
    assert lora["activations: LM"] == sft_two["activations: LM"]
    assert lora["activations: LM"] > components(*common, "trainer.batch_size=1")["activations: LM"]
    full = components(*common, *dpo, "adapter=full")
    assert full["reference model"] == full["weights (bfloat16)"]
    assert "reference model" not in components(*common, *dpo, "adapter=full",
                                               "trainer.dpo.precompute_ref_log_probs=true")


# ----------------------------------------------------------------------------------------------------------------
# the activation formula against autograd's saved tensors (CPU, fp32: every activation is 4 bytes, and CPU dropout
# keeps a float mask)


def _saved_bytes(model, run) -> int:
    """Bytes of the storages autograd saves while `run` runs (each once). The storages are held until the end, so
    that one freed during the forward (the delta rule's last state update, which nothing uses) cannot hand its
    address to another and hide it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storage.nbytes() for storage in seen.values())


ARCH = ["model.architecture.hidden_size=128", "model.architecture.intermediate_size=352",
        "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=2",
        "model.architecture.mrope_section=[4,6,6]", "model.architecture.vision_embed_dim=64"]
# Qwen2.5-VL: window attention in every block (no full-attention block), windows of 2 x 2 merged patches.
# Qwen3-VL: one DeepStack merger, on block 0, in every model compared (it must cancel out of the difference).
FAMILY_ARCH = {"tiny_qwen2_5_vl": ["model.architecture.vision_fullatt_block_indexes=[]"],
               "tiny_qwen3_vl": ["model.architecture.deepstack_visual_indexes=[0]"],
               "tiny_qwen3_5": ["model.architecture.mrope_section=[2,1,1]"],  # rotary on a quarter of a 32-wide head
               "tiny_qwen3_vl_moe": ["model.architecture.deepstack_visual_indexes=[0]"],
               "tiny_qwen3_5_moe": ["model.architecture.mrope_section=[2,1,1]"]}


def _targets(option, experts=True):
    """q_proj, v_proj and down_proj; on a mixture-of-experts family q_proj and down_proj (the experts' and the
    shared expert's), without dropout, which LoRA on experts lacks (without dropout q_proj and v_proj would share
    one saved input, which the formula counts twice), or no MLP name (`experts` false: dropout stays)."""
    if not family_of_option(option).expert_parameters:
        return ["adapter.target_modules=[q_proj,v_proj,down_proj]"]
    if not experts:
        return ["adapter.target_modules=[q_proj,v_proj]"]
    return ["adapter.target_modules=[q_proj,down_proj]", *lora_settings(option)]


def _skip_qlora(option):
    """adapter=qlora is refused for mixture-of-experts families (tests/test_experts.py checks the message)."""
    if family_of_option(option).expert_parameters:
        pytest.skip(f"{family_of_option(option).title}: adapter=qlora is refused (fused experts stay 16-bit)")


def _model(adapter, layers, depth, vision_lora=False, option="tiny"):
    from qwenvl_ft.estimate.counts import hf_config
    from qwenvl_ft.modeling.build import apply_freezing, build_lora_config, model_class

    typed = _typed("recipe=demo", f"model={option}", f"adapter={adapter}", *_targets(option, not vision_lora),
                   f"adapter.vision_lora={str(vision_lora).lower()}", *ARCH, *FAMILY_ARCH.get(option, []),
                   f"model.architecture.num_hidden_layers={layers}",
                   f"model.architecture.vision_depth={depth}")
    config = hf_config(typed.model)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_class(typed.model)(config).train()
    if adapter == "full":
        apply_freezing(model, typed.model)
        return model
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, build_lora_config(model, typed.model, typed.adapter))


def _cpu_sdpa_saves_the_attention_matrix_with_gqa() -> bool:
    """Whether this torch runs CPU SDPA with grouped-query heads (enable_gqa, which transformers passes when there
    is no mask) on its math kernel, which saves the heads x tokens x tokens attention matrix. torch 2.6 does; 2.15
    uses its fused kernel, as GPU kernels do, and the formula models that."""
    saved = []
    query = torch.randn(1, 4, 64, 16, requires_grad=True)
    key_value = torch.randn(1, 2, 64, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        torch.nn.functional.scaled_dot_product_attention(query, key_value, key_value, is_causal=True, enable_gqa=True)
    return sum(saved) >= 4 * 64 * 64


def _layer_counts(option) -> tuple:
    """The two layer counts whose difference the tests measure: one and three layers, or, where layers alternate in
    kind (Qwen3.5, tiny: Gated DeltaNet, attention), two and four, which differ by one of each and both hold an
    attention layer (the rotary tables, which every attention layer shares, cancel out)."""
    return (2, 4) if family_of_option(option).kind_layer_bytes is not None else (1, 3)


def _per_token_per_layer(option, adapter) -> tuple:
    """Saved bytes per token of the layers that the larger count adds: the difference over the layer counts and
    over two token counts, so that what a layer keeps whatever the length (a norm's weight, the delta rule's chunk
    mask, LoRA-folded expert weights) cancels out too; also the layers' difference at 256 tokens alone (per token
    and per layer together), the model of the last run and the added layers' indices."""
    from qwenvl_ft.modeling.build import model_parts

    few, many = _layer_counts(option)
    measured = {}
    for layers in (few, many):
        model = _model(adapter, layers, 1, option=option)
        lm = model_parts(model).language_model
        for tokens in (128, 256):
            embeds = torch.randn(1, tokens, 128, requires_grad=True)
            measured[layers, tokens] = _saved_bytes(model, lambda: lm(inputs_embeds=embeds, use_cache=False))
    added = (measured[many, 256] - measured[many, 128]) - (measured[few, 256] - measured[few, 128])
    at_256 = (measured[many, 256] - measured[few, 256]) / (many - few)
    return added / 128 / (many - few), at_256, model, range(few, many)


@pytest.mark.parametrize("option", TEST_MODELS)
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_decoder_layer_formula_matches_saved_tensors(adapter, option):
    from qwenvl_ft.families.base import layer_kinds

    if _cpu_sdpa_saves_the_attention_matrix_with_gqa():
        pytest.skip(f"torch {torch.__version__} runs CPU SDPA with grouped-query heads on its math kernel; the "
                    f"formula models the fused kernels of GPUs and of newer torch")
    measured, at_256, model, added = _per_token_per_layer(option, adapter)
    family, text = family_of_option(option), model.config.get_text_config()
    trainable = adapter == "full"
    if family.expert_parameters:  # q_proj, the shared expert's down_proj if any, and the experts' down_proj
        shared = getattr(text, "shared_expert_intermediate_size", None)
        mlp = [shared] if shared else []
        lora_in = {"full_attention": [128] + mlp, "linear_attention": mlp}
        mask, adapted = 0, ["mlp.experts.down_proj"]
    else:  # q_proj and v_proj (attention layers) and down_proj (every layer's MLP)
        lora_in, mask, adapted = {"full_attention": [128, 128, 352], "linear_attention": [352]}, 4, []
    adapted = [] if trainable else adapted
    dense = experts.dense_view(text, family)
    kinds = [layer_kinds(text)[i] for i in added]
    predicted = sum(family.layer_kind_bytes(dense, kind, a=4, trainable=trainable,
                                            lora_in=[] if trainable else lora_in[kind], r=8, mask_bytes=mask)
                    for kind in kinds) / len(kinds) + experts.routed_bytes(text, family, 4, trainable, adapted)
    assert measured == predicted
    if family.kind_layer_bytes is None:  # nothing else a layer keeps whatever the length: the per-layer terms too
        assert at_256 == 256 * predicted + experts.folded_weight_bytes(text, family, 4, adapted)


@pytest.mark.parametrize("option", TEST_MODELS)
@pytest.mark.parametrize("adapter, vision_lora", [("full", False), ("lora", True)])
def test_vision_block_formula_matches_saved_tensors(adapter, vision_lora, option):
    from qwenvl_ft.modeling.build import model_parts

    family = family_of_option(option)
    patches, per_model = 256, []
    grid, pixels = torch.tensor([[1, 16, 16]]), torch.randn(256, 3 * 2 * family.patch_size ** 2)
    for depth in (1, 3):
        model = _model(adapter, 1, depth, vision_lora=vision_lora, option=option)
        visual = model_parts(model).vision
        if adapter == "full":
            for p in visual.parameters():
                p.requires_grad_(True)
        per_model.append(_saved_bytes(model, lambda: visual(pixels, grid_thw=grid)))
    measured = (per_model[1] - per_model[0]) / 2 / patches
    vision = model.config.vision_config
    sizes = family.vision_sizes(vision)  # the tiny ViTs: width 64, MLP width 128
    assert (sizes.width, sizes.mlp) == (64, 128)
    predicted = family.vision_block_bytes(sizes, vision.num_heads, a=4, trainable=adapter == "full",
                                          lora_in=list(sizes.linear_inputs) if vision_lora else [], r=8,
                                          mask_bytes=4)
    assert measured == predicted


def test_estimate_command_prints_a_table(capsys):
    from qwenvl_ft.commands.estimate import estimate

    result = estimate(compose(["recipe=qlora_7b_amazon"], output_dir="/tmp/unused"))
    out = capsys.readouterr().out
    assert "8.291B parameters" in out and "predicted peak" in out
    assert result["predicted_peak_gib"] == pytest.approx(sum(result["components_gib"].values()), abs=0.02)


def test_estimate_sizes_gated_deltanet_layers(capsys):
    """A family with Gated DeltaNet layers: each kind of layer has its own activation row (once refused)."""
    from qwenvl_ft.commands.cli import main

    assert main(["estimate", "recipe=demo", "model=tiny_qwen3_5"]) == 0
    out = capsys.readouterr().out
    assert "1 Gated DeltaNet x" in out and "1 attention x" in out and "predicted peak" in out
    assert "Traceback" not in out
