"""Qwen3.5, mixture of experts (Qwen/Qwen3.5-35B-A3B, -122B-A10B; Qwen3.6-35B-A3B has the same architecture):
Qwen3.5's vision tower, tokenizer, thinking chat template and hybrid language model (three of every four decoder
layers Gated DeltaNet, the fourth gated softmax attention; qwen3_5.py says what that means for LoRA, 4-bit and
packing), whose MLPs are routed experts plus one shared expert: a linear router (`mlp.gate`) picks
num_experts_per_tok of num_experts per token, and every token also goes through `mlp.shared_expert` (a gated MLP of
Linear layers) scaled by a sigmoid gate (`mlp.shared_expert_gate`, hidden -> 1).

What that means here (docs/moe.md says it for users):
  - LoRA: adapter.target_modules' MLP names (gate_proj, up_proj, down_proj) mean the experts' MLPs: the routed
    experts' fused weights through PEFT's target_parameters (EXPERT_MLP_TARGETS) and the shared expert's Linear
    layers of those names. The router and the shared expert's gate stay as released. Dropout and DoRA are refused
    with the experts targeted, and adapter=qlora always (qwen3_vl_moe.py says why).
  - The router's load-balancing loss is part of the trained loss (model.router_aux_loss_coef).
"""

from __future__ import annotations

import dataclasses
from typing import Any, List

from qwenvl_ft.families import qwen3_5
from qwenvl_ft.families.base import EXPERT_MLP_TARGETS, moe_config, moe_problems, moe_settings


def random_config(arch: Any, tokenizer):
    """Qwen3.5's random config at these sizes (its layer pattern, DeltaNet and vision settings), every decoder
    layer's MLP a sparse MoE block with a shared expert."""
    return moe_config(qwen3_5.random_config(arch, tokenizer), "Qwen3_5MoeConfig", "Qwen3_5MoeTextConfig",
                      **moe_settings(arch), shared_expert_intermediate_size=arch.shared_expert_intermediate_size)


def architecture_problems(arch: Any) -> List[str]:
    problems = [p.replace("family=qwen3_5 ", "family=qwen3_5_moe ") for p in qwen3_5.architecture_problems(arch)]
    problems += moe_problems(arch, "qwen3_5_moe")
    if arch.shared_expert_intermediate_size is None:
        problems.append("model.architecture.shared_expert_intermediate_size is required for family=qwen3_5_moe "
                        "(the width of the shared expert)")
    return problems


FAMILY = dataclasses.replace(
    qwen3_5.FAMILY,
    name="qwen3_5_moe",
    title="Qwen3.5 MoE",
    model_class="Qwen3_5MoeForConditionalGeneration",
    config_class="Qwen3_5MoeConfig",
    vision_block_class="Qwen3_5MoeVisionBlock",
    decoder_layer_class="Qwen3_5MoeDecoderLayer",
    linear_attention_class="Qwen3_5MoeGatedDeltaNet",
    moe_block_class="Qwen3_5MoeSparseMoeBlock",
    expert_lora_targets=EXPERT_MLP_TARGETS,
    test_model="tiny_qwen3_5_moe",
    random_config=random_config,
    architecture_problems=architecture_problems,
)
