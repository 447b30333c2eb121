"""Qwen3-VL, mixture of experts (Qwen/Qwen3-VL-30B-A3B-Instruct, -235B-A22B-Instruct): Qwen3-VL's vision tower
(DeepStack, learned positions, timestamped video frames), processor, tokenizer and chat template, and Qwen3-VL's
language model whose MLPs are routed experts: a linear router (`mlp.gate`) picks num_experts_per_tok of
num_experts per token and mixes their outputs; no shared expert. The experts' weights are fused 3-D parameters
(experts x out x in: `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not Linear layers.

What that means here (docs/moe.md says it for users):
  - LoRA: adapter.target_modules' MLP names (gate_proj, up_proj, down_proj) mean the experts' MLPs, adapted
    through PEFT's target_parameters (one rank-r LoRA per expert; EXPERT_MLP_TARGETS); the attention projections
    are Linear layers as in Qwen3-VL. The router is never adapted. PEFT's parameter LoRA has no dropout and no
    DoRA: config/schema.py refuses both with the experts targeted.
  - 4-bit: bitsandbytes replaces Linear layers only, so the experts (most of the weights) would stay 16-bit and
    PEFT's 4-bit preparation would cast them to fp32: adapter=qlora is refused (config/schema.py).
  - The router's load-balancing loss is part of the trained loss (model.router_aux_loss_coef).
Its processor and tokenizer classes are Qwen3-VL's, so a processor built for it says so (families.PROCESSOR_FAMILY).
"""

from __future__ import annotations

from typing import Any, List

from qwenvl_ft.families.base import EXPERT_MLP_TARGETS, Family, moe_problems, moe_settings, text_config, \
    vision_token_ids
from qwenvl_ft.families.qwen3_vl import CHAT_TEMPLATE, positions, projector_bytes, random_processor, video_tokens, \
    vision_block_bytes, vision_sizes
from qwenvl_ft.families.qwen3_vl import architecture_problems as dense_problems


def random_config(arch: Any, tokenizer):
    from transformers import Qwen3VLMoeConfig

    text = text_config(arch, tokenizer, head_dim=arch.attention_head_dim,
                       rope_parameters={"mrope_interleaved": True}, **moe_settings(arch))
    vision = dict(depth=arch.vision_depth, hidden_size=arch.vision_embed_dim,
                  intermediate_size=arch.vision_intermediate_size, num_heads=arch.vision_num_heads,
                  out_hidden_size=arch.hidden_size, patch_size=arch.patch_size,
                  temporal_patch_size=arch.temporal_patch_size, spatial_merge_size=arch.spatial_merge_size,
                  num_position_embeddings=arch.vision_num_position_embeddings,
                  deepstack_visual_indexes=list(arch.deepstack_visual_indexes))
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=arch.tie_word_embeddings,
                            **vision_token_ids(tokenizer))


def architecture_problems(arch: Any) -> List[str]:
    return dense_problems(arch) + moe_problems(arch, "qwen3_vl_moe")


FAMILY = Family(
    name="qwen3_vl_moe",
    title="Qwen3-VL MoE",
    model_class="Qwen3VLMoeForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    config_class="Qwen3VLMoeConfig",
    vision_block_class="Qwen3VLMoeVisionBlock",
    decoder_layer_class="Qwen3VLMoeTextDecoderLayer",
    moe_block_class="Qwen3VLMoeTextSparseMoeBlock",
    expert_lora_targets=EXPERT_MLP_TARGETS,
    test_model="tiny_qwen3_vl_moe",
    patch_size=16,
    image_max_pixels=16384 * 32 * 32,  # Qwen3-VL's released preprocessor_config (the MoE checkpoints' not seen)
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
