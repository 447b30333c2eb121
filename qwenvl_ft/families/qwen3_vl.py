"""Qwen3-VL, dense (Qwen/Qwen3-VL-2B/4B/8B-Instruct): a ViT of LayerNorm blocks with a tanh-GELU MLP and learned
position embeddings, 16-pixel patches merged 2 x 2, a Qwen3 language model (RMSNorm on each head of q and k,
interleaved M-RoPE) and two things earlier families lack:

  - DeepStack: the vision tower also returns `deepstack_features` (one merged feature map per listed ViT block,
    each through its own merger), which the language model adds to the hidden states of the visual tokens after
    its first decoder layers; it finds those tokens through the `visual_pos_masks` input.
  - Timestamps for video: every temporal patch of a video is its own `<t seconds><|vision_start|> pads
    <|vision_end|>` span inside the chat template's `<|vision_start|><|video_pad|><|vision_end|>` (what
    transformers' Qwen3VLProcessor makes), and M-RoPE numbers each such span as a one-frame image.

The MoE models (Qwen3-VL-30B-A3B, -235B-A22B) are qwen3_vl_moe.py, which reuses this module's functions.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

from qwenvl_ft.families.base import Family, VisionSizes, grids, layernorm_vision_block_bytes, merger_bytes, \
    mrope_positions, qwen_processor, text_config, vision_token_ids
from qwenvl_ft.grounding.convention import BoxConvention

# Qwen3-VL-*-Instruct's chat template for conversations without tools: no default system message (Qwen2-VL's
# template adds one), one `<|im_start|>role\n ... <|im_end|>\n` block per turn.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if 'image' in content or 'image_url' in content or content['type'] == 'image' %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'video' in content or content['type'] == 'video' %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def positions(sample: Dict[str, Any], merge_size: int):
    """A video's temporal patches are separate spans (timestamps between them), each numbered as one frame."""
    frames = [[1, h, w] for t, h, w in grids(sample, "video_grid_thw") for _ in range(t)]
    return mrope_positions(sample["mm_token_type_ids"].tolist(), grids(sample, "image_grid_thw"), frames,
                           merge_size)


def video_tokens(grid: Sequence[int], frame_times: Sequence[float], temporal_patch_size: int, merge_size: int,
                 ids: Dict[str, int], encode: Callable[[str], List[int]]) -> List[int]:
    """`<t seconds><|vision_start|> pads <|vision_end|>` per temporal patch, t the mean time of its first and last
    frame, as Qwen3VLProcessor writes it (frame times padded like the frames, by repeating the last)."""
    t, h, w = grid
    times = list(frame_times) + [frame_times[-1]] * (-len(frame_times) % temporal_patch_size)
    if len(times) != t * temporal_patch_size:
        raise ValueError(f"a video of {len(frame_times)} frame times for a grid of {t} temporal patches")
    pads = [ids["video_pad"]] * (h * w // merge_size ** 2)
    tokens: List[int] = []
    for index in range(t):
        first, last = times[index * temporal_patch_size], times[index * temporal_patch_size + temporal_patch_size - 1]
        tokens += encode(f"<{(first + last) / 2:.1f} seconds>") + [ids["vision_start"]] + pads + [ids["vision_end"]]
    return tokens


def random_config(arch: Any, tokenizer):
    from transformers import Qwen3VLConfig

    text = text_config(arch, tokenizer, head_dim=arch.head_dim or arch.hidden_size // arch.num_attention_heads,
                       rope_parameters={"mrope_interleaved": True})
    vision = dict(depth=arch.vision_depth, hidden_size=arch.vision_embed_dim,
                  intermediate_size=arch.vision_intermediate_size, num_heads=arch.vision_num_heads,
                  out_hidden_size=arch.hidden_size, patch_size=arch.patch_size,
                  temporal_patch_size=arch.temporal_patch_size, spatial_merge_size=arch.spatial_merge_size,
                  num_position_embeddings=arch.vision_num_position_embeddings,
                  deepstack_visual_indexes=list(arch.deepstack_visual_indexes))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=arch.tie_word_embeddings,
                         **vision_token_ids(tokenizer))


def random_processor(tokenizer, arch: Any, chat_template: str):
    """The released processors' settings (mean and std 0.5, video bounds), except that an image may be as small as
    4 visual tokens, as with Qwen2-VL's processor (the released one enlarges images to at least 64), so that the
    tiny test model sees small images as small."""
    factor = arch.patch_size * arch.spatial_merge_size
    half = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image = dict(half, size={"shortest_edge": 4 * factor ** 2, "longest_edge": 16384 * factor ** 2})
    video = dict(half, size={"shortest_edge": 4096, "longest_edge": 25165824})
    return qwen_processor("Qwen3VLProcessor", tokenizer, arch, chat_template, image, "Qwen3VLVideoProcessor", video)


def architecture_problems(arch: Any) -> List[str]:
    problems = []
    if arch.vision_intermediate_size is None:
        problems.append("model.random_init with family=qwen3_vl needs model.architecture.vision_intermediate_size "
                        "(the width of the vision MLP)")
    if not all(0 <= i < arch.vision_depth for i in arch.deepstack_visual_indexes):
        problems.append("model.architecture.deepstack_visual_indexes must be block numbers below vision_depth")
    side = math.isqrt(arch.vision_num_position_embeddings)
    if side * side != arch.vision_num_position_embeddings:
        problems.append("model.architecture.vision_num_position_embeddings must be a square (a grid of learned "
                        "positions)")
    return problems


def vision_sizes(vision: Any) -> VisionSizes:
    d, mlp = vision.hidden_size, vision.intermediate_size
    return VisionSizes(d, mlp, mlp_tensors=1, linear_inputs=(d, d, d, mlp))  # qkv, proj, linear_fc1, linear_fc2


def vision_block_bytes(sizes: VisionSizes, heads: int, a: int, trainable: bool, lora_in, r: int,
                       mask_bytes: int = 1) -> int:
    # tanh-GELU keeps its input only
    return layernorm_vision_block_bytes(sizes, heads, a, trainable, lora_in, r, mask_bytes, activation_tensors=1)


def projector_bytes(vision: Any, a: int, patches: int, tokens: int) -> int:
    """The merger, plus each DeepStack merger: a LayerNorm over the merged 4d-wide tokens, then fc1, GELU, fc2,
    each keeping a 4d-wide input per token."""
    width = 4 * vision.hidden_size
    return merger_bytes(vision, a, patches, tokens) + len(vision.deepstack_visual_indexes) * a * tokens * 4 * width


# Boxes: relative again, on a grid whose top is 1000, not 999 (the Qwen3-VL cookbook cookbooks/2d_grounding.ipynb
# maps a value back as value / 1000 * width, and the Qwen team answers QwenLM/Qwen3-VL#1486 and #1871 the same way),
# as JSON like Qwen2.5-VL's.
BOX_CONVENTION = BoxConvention(frame="relative", grid=1000, top=1000, text="json")

FAMILY = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    box_convention=BOX_CONVENTION,
    model_class="Qwen3VLForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    config_class="Qwen3VLConfig",
    vision_block_class="Qwen3VLVisionBlock",
    decoder_layer_class="Qwen3VLTextDecoderLayer",
    test_model="tiny_qwen3_vl",
    # decoder, final and q/k RMSNorms, the decoder's SwiGLU MLPs, the ViT blocks' and the mergers' LayerNorms (the
    # ViT's tanh-GELU MLP has no Liger module)
    liger_modules=(("Qwen3VLTextRMSNorm", "rms_norm"), ("Qwen3VLTextMLP", "swiglu"),
                   ("torch.nn:LayerNorm", "layer_norm")),
    patch_size=16,
    image_max_pixels=16384 * 32 * 32,  # the released preprocessor_config's size["longest_edge"]
    vision_stem=("model.visual.patch_embed", "model.visual.pos_embed"),
    projectors=("model.visual.merger", "model.visual.deepstack_merger_list"),
    vision_output_fields=("pooler_output", "last_hidden_state", "deepstack_features"),
    language_model_token_inputs=("visual_pos_masks",),
    qk_norm=True,
    positions=positions,
    video_tokens=video_tokens,
    chat_template=CHAT_TEMPLATE,
    random_config=random_config,
    random_processor=random_processor,
    architecture_problems=architecture_problems,
    vision_sizes=vision_sizes,
    vision_block_bytes=vision_block_bytes,
    projector_bytes=projector_bytes,
)
