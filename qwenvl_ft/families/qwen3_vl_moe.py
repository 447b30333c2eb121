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

import dataclasses
from typing import Any, List

from qwenvl_ft.families import qwen3_vl
from qwenvl_ft.families.base import EXPERT_MLP_TARGETS, moe_config, moe_problems, moe_settings


def random_config(arch: Any, tokenizer):
    """Qwen3-VL's random config at these sizes, every decoder layer's MLP a sparse MoE block."""
    return moe_config(qwen3_vl.random_config(arch, tokenizer), "Qwen3VLMoeConfig", "Qwen3VLMoeTextConfig",
                      **moe_settings(arch))


def architecture_problems(arch: Any) -> List[str]:
    return qwen3_vl.architecture_problems(arch) + moe_problems(arch, "qwen3_vl_moe")


FAMILY = dataclasses.replace(
    qwen3_vl.FAMILY,
    name="qwen3_vl_moe",
    title="Qwen3-VL MoE",
    model_class="Qwen3VLMoeForConditionalGeneration",
    config_class="Qwen3VLMoeConfig",
    vision_block_class="Qwen3VLMoeVisionBlock",
    decoder_layer_class="Qwen3VLMoeTextDecoderLayer",
    moe_block_class="Qwen3VLMoeTextSparseMoeBlock",
    expert_lora_targets=EXPERT_MLP_TARGETS,
    test_model="tiny_qwen3_vl_moe",
    liger_modules=(),  # Liger's own patch works for this family (the Trainer applies it)
    random_config=random_config,
    architecture_problems=architecture_problems,
)
