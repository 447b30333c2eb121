"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B/7B-Instruct): Qwen2-VL's layout with a ViT of RMSNorm blocks, a gated SiLU MLP
and window attention (full attention in a few blocks), and M-RoPE that spaces video frames by time: a temporal
patch lasting s seconds advances the temporal position by tokens_per_second x s (the `second_per_grid_ts` input)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from qwenvl_ft.families.base import Family, VisionSizes, grids, lora_bytes, merge_setting, mrope_positions, \
    qwen_processor, text_config, vision_token_ids
from qwenvl_ft.families.qwen2_vl import CHAT_TEMPLATE
from qwenvl_ft.grounding.convention import BoxConvention

SECONDS = "second_per_grid_ts"


def positions(sample: Dict[str, Any], merge_size: int, tokens_per_second: Optional[float] = None):
    intervals = None
    if SECONDS in sample:
        if tokens_per_second is None:
            raise ValueError("packing Qwen2.5-VL videos needs the model's vision_config.tokens_per_second")
        intervals = [tokens_per_second * float(s) for s in sample[SECONDS]]
    return mrope_positions(sample["mm_token_type_ids"].tolist(), grids(sample, "image_grid_thw"),
                           grids(sample, "video_grid_thw"), merge_size, intervals)


def position_settings(config: Any) -> Dict[str, Any]:
    return {**merge_setting(config), "tokens_per_second": config.vision_config.tokens_per_second}


def random_config(arch: Any, tokenizer):
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=arch.vision_depth, hidden_size=arch.vision_embed_dim, out_hidden_size=arch.hidden_size,
                  intermediate_size=arch.vision_intermediate_size, num_heads=arch.vision_num_heads,
                  patch_size=arch.patch_size, temporal_patch_size=arch.temporal_patch_size,
                  spatial_merge_size=arch.spatial_merge_size, window_size=arch.vision_window_size,
                  fullatt_block_indexes=list(arch.vision_fullatt_block_indexes),
                  tokens_per_second=arch.tokens_per_second)
    return Qwen2_5_VLConfig(text_config=text_config(arch, tokenizer, max_window_layers=arch.num_hidden_layers),
                            vision_config=vision, tie_word_embeddings=arch.tie_word_embeddings,
                            **vision_token_ids(tokenizer))


def random_processor(tokenizer, arch: Any, chat_template: str):
    # Qwen2-VL's image and video processors, plus the video timing input second_per_grid_ts
    return qwen_processor("Qwen2_5_VLProcessor", tokenizer, arch, chat_template, {}, "Qwen2VLVideoProcessor", {})


def architecture_problems(arch: Any) -> List[str]:
    problems = []
    if arch.vision_intermediate_size is None:
        problems.append("model.random_init with family=qwen2_5_vl needs model.architecture.vision_intermediate_size "
                        "(the width of Qwen2.5-VL's gated vision MLP)")
    if arch.vision_window_size % (arch.patch_size * arch.spatial_merge_size):
        problems.append("model.architecture.vision_window_size must be a multiple of patch_size x "
                        "spatial_merge_size")
    if not all(0 <= i < arch.vision_depth for i in arch.vision_fullatt_block_indexes):
        problems.append("model.architecture.vision_fullatt_block_indexes must be block numbers below vision_depth")
    return problems


def vision_sizes(vision: Any) -> VisionSizes:
    d, mlp = vision.hidden_size, vision.intermediate_size
    return VisionSizes(d, mlp, mlp_tensors=2, linear_inputs=(d, d, d, d, mlp))  # qkv, proj, gate, up, down


def vision_block_bytes(sizes: VisionSizes, heads: int, a: int, trainable: bool, lora_in, r: int,
                       mask_bytes: int = 1) -> int:
    """Saved tensors of one ViT block, per patch (window or full attention alike).

    Always: both RMSNorms keep an fp32 copy of their input and its rsqrt (4d + 4 each), q and k after RoPE, v (a
    view that keeps the whole fused qkv output alive: 3d), the attention output and log-sum-exp, and the gated
    MLP's SiLU input and both factors of its product (3 x mlp). Trainable weights add the normalised inputs the
    two RMSNorm weights multiply (2d), the qkv, proj and gate/up inputs (3d) and the down_proj input (mlp).
    """
    d, mlp = sizes.width, sizes.mlp
    total = 2 * (4 * d + 4) + a * (2 * d + 3 * d + d) + 4 * heads + 3 * a * mlp
    if trainable:
        total += a * (2 * d + 3 * d + mlp)
    return total + sum(lora_bytes(n, r, a, mask_bytes) for n in lora_in)


# Boxes: absolute pixels of the image the model sees, i.e. after smart_resize (the Qwen2.5-VL cookbook's
# spatial_understanding notebook; qwen-vl-finetune/tools/process_bbox.ipynb `convert_to_qwen25vl_format`: round(x *
# new_width / old_width), clipped to [0, new_width - 1]), as JSON {"bbox_2d": [x1, y1, x2, y2], "label": ...}.
BOX_CONVENTION = BoxConvention(frame="resized", text="json")

FAMILY = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    box_convention=BOX_CONVENTION,
    model_class="Qwen2_5_VLForConditionalGeneration",
    processor_class="Qwen2_5_VLProcessor",
    config_class="Qwen2_5_VLConfig",
    vision_block_class="Qwen2_5_VLVisionBlock",
    decoder_layer_class="Qwen2_5_VLDecoderLayer",
    test_model="tiny_qwen2_5_vl",
    # RMSNorms everywhere (decoder, final, ViT blocks, merger), the decoder's and the ViT's SwiGLU MLPs
    liger_modules=(("Qwen2_5_VLRMSNorm", "rms_norm"), ("Qwen2MLP", "swiglu"), ("Qwen2_5_VLMLP", "swiglu")),
    patch_size=14,
    image_max_pixels=16384 * 28 * 28,
    video_seconds_input=SECONDS,
    positions=positions,
    position_settings=position_settings,
    chat_template=CHAT_TEMPLATE,
    random_config=random_config,
    random_processor=random_processor,
    architecture_problems=architecture_problems,
    vision_sizes=vision_sizes,
    vision_block_bytes=vision_block_bytes,
)
