"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct): a ViT of LayerNorm blocks with a QuickGELU MLP, 14-pixel
patches merged 2 x 2, M-RoPE with videos one temporal position per temporal patch."""

from __future__ import annotations

from typing import Any

from qwenvl_ft.families.base import Family, VisionSizes, layernorm_vision_block_bytes, qwen_processor, \
    text_config, vision_token_ids
from qwenvl_ft.grounding.convention import BoxConvention

# Qwen2-VL-*-Instruct's chat_template (processor and tokenizer share it); Qwen2.5-VL-*-Instruct ships the same.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_config(arch: Any, tokenizer):
    from transformers import Qwen2VLConfig

    vision = dict(depth=arch.vision_depth, embed_dim=arch.vision_embed_dim, hidden_size=arch.hidden_size,
                  num_heads=arch.vision_num_heads, mlp_ratio=arch.vision_mlp_ratio, patch_size=arch.patch_size,
                  temporal_patch_size=arch.temporal_patch_size, spatial_merge_size=arch.spatial_merge_size)
    return Qwen2VLConfig(text_config=text_config(arch, tokenizer, max_window_layers=arch.num_hidden_layers),
                         vision_config=vision, tie_word_embeddings=arch.tie_word_embeddings,
                         **vision_token_ids(tokenizer))


def random_processor(tokenizer, arch: Any, chat_template: str):
    # The image processor's defaults bound an image to 4..16384 visual tokens, as the released processor does.
    return qwen_processor("Qwen2VLProcessor", tokenizer, arch, chat_template, {}, "Qwen2VLVideoProcessor", {})


def vision_sizes(vision: Any) -> VisionSizes:
    d = vision.embed_dim
    mlp = int(d * vision.mlp_ratio)
    return VisionSizes(d, mlp, mlp_tensors=1, linear_inputs=(d, d, d, mlp))  # qkv, proj, fc1, fc2


def vision_block_bytes(sizes: VisionSizes, heads: int, a: int, trainable: bool, lora_in, r: int,
                       mask_bytes: int = 1) -> int:
    # QuickGELU (x * sigmoid(1.702 x)) keeps its input and the sigmoid
    return layernorm_vision_block_bytes(sizes, heads, a, trainable, lora_in, r, mask_bytes, activation_tensors=2)


# Boxes: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, coordinates "normalised
# to [0, 1000)" (the Qwen-VL and Qwen2-VL model cards), so the largest value written is 999.
BOX_CONVENTION = BoxConvention(frame="relative", grid=1000, top=999, text="box_tokens")

FAMILY = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    box_convention=BOX_CONVENTION,
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    config_class="Qwen2VLConfig",
    vision_block_class="Qwen2VLVisionBlock",
    decoder_layer_class="Qwen2VLDecoderLayer",
    test_model="tiny",
    # decoder and final RMSNorms, the decoder's SwiGLU MLPs, the ViT blocks' and the merger's LayerNorms (the
    # ViT's QuickGELU MLP has no Liger module)
    liger_modules=(("Qwen2VLRMSNorm", "rms_norm"), ("Qwen2MLP", "swiglu"), ("torch.nn:LayerNorm", "layer_norm")),
    patch_size=14,
    image_max_pixels=16384 * 28 * 28,  # Qwen2VLImageProcessor's size["longest_edge"]: 16384 visual tokens
    chat_template=CHAT_TEMPLATE,
    random_config=random_config,
    random_processor=random_processor,
    vision_sizes=vision_sizes,
    vision_block_bytes=vision_block_bytes,
)
