"""Model FLOPs of a training step (MFU: qwenvl_ft/training/telemetry.py divides them by the device's peak), from
the model's architecture on the meta device and the same builders the memory estimate uses (`TrainingFlops` says
the convention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict

from qwenvl_ft import families, methods
from qwenvl_ft.config.adapter import AdapterMethod
from qwenvl_ft.config.schema import TrainConfig
from qwenvl_ft.estimate.budget import BatchBudget
from qwenvl_ft.estimate.counts import meta_model


@dataclass
class StepWork:
    """What a training step processed, by what model FLOPs scale with: counted from the real batches by the run's
    telemetry (`batch_work`), or the worst-case batch for the estimate (`worst_case_work`)."""

    tokens: float = 0  # real (non-padding) language-model tokens
    token_pairs: float = 0  # sum over sequences of length^2: causal attention stays within each sequence
    patches: float = 0  # ViT patches the vision tower encodes
    frame_pairs: float = 0  # sum over frames of (patches per frame)^2: full-attention ViT blocks
    window_pairs: float = 0  # sum over windows of (patches per window)^2: window-attention blocks (Qwen2.5-VL)

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple:
        return self.tokens, self.token_pairs, self.patches, self.frame_pairs, self.window_pairs


@dataclass
class TrainingFlops:
    """Model FLOPs of one training step, per unit of `StepWork` (forward + backward, and DPO's reference forward).

    Convention (PaLM's and torchtitan's model FLOPs): 2 per multiply-add of every Linear (and the patch embedding);
    the backward costs 2 for the input gradient wherever gradients pass and 2 more for the weight gradient where
    weights train, so 6N for trained, 4N for frozen layers gradients pass through, 2N for a frozen vision tower
    they never reach (4-bit weights count as the matmuls they stand for; LoRA factors add 6 r (in + out)).
    Attention adds 4 x width per (query, key) pair per layer forward, twice that backward; causal attention is
    counted over the whole square, as in those formulas and torch.utils.flop_counter. Not counted: elementwise
    work (norms, activations, RoPE, softmax), gradient-checkpointing recomputation (hardware FLOPs would be about
    a third higher with it), DoRA's per-step weight norms, and input gradients skipped before the first trained
    layer (the first decoder layer's projections under LoRA). tests/test_telemetry.py checks the formulas against
    torch.utils.flop_counter.FlopCounterMode on the real model code.
    """

    per_token: float
    per_token_pair: float
    per_patch: float
    per_frame_pair: float
    per_window_pair: float

    def step(self, work: StepWork) -> float:
        return (self.per_token * work.tokens + self.per_token_pair * work.token_pairs + self.per_patch * work.patches
                + self.per_frame_pair * work.frame_pairs + self.per_window_pair * work.window_pairs)

    def __add__(self, other: "TrainingFlops") -> "TrainingFlops":
        return TrainingFlops(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple:
        return self.per_token, self.per_token_pair, self.per_patch, self.per_frame_pair, self.per_window_pair


@dataclass
class _PartMatmuls:
    """Multiply-adds per item of one part of the model (what each of its Linears / the patch embedding holds)."""

    base: int = 0  # weights of the base model's Linears
    trained: int = 0  # of which train (full fine-tuning, or PEFT's modules_to_save copies)
    lora: int = 0  # LoRA factors r x (in + out) on this part's Linears


def _part_matmuls(cfg: TrainConfig, model) -> Dict[str, _PartMatmuls]:
    """Linear weights of the patch embedding, ViT blocks, merger, decoder and LM head, and which of them train,
    decided by the run's own builders (`apply_freezing`, `build_lora_config`) as in `count_parameters`."""
    from torch import nn

    from qwenvl_ft.families.base import attribute
    from qwenvl_ft.modeling.build import apply_freezing, build_lora_config, model_parts

    model_cfg, adapter_cfg = cfg.model, cfg.adapter
    found, family = model_parts(model), families.of_model(model)
    stem = [attribute(model, path) for path in family.vision_stem]  # patch embedding (+ learned positions)
    owner = {}
    for part, modules in (("decoder", [found.language_model]), ("vision", [found.vision]),
                          ("merger", found.projectors), ("patch_embed", stem)):  # the last match wins: nested
        for module in modules:                                                  # parts override
            owner.update({id(m): part for m in module.modules()})
    lora_pattern, saved, adapted = None, [], []
    if adapter_cfg.method == AdapterMethod.full:
        apply_freezing(model, model_cfg)
    else:
        lora_cfg = build_lora_config(model, model_cfg, adapter_cfg)
        lora_pattern, saved = re.compile(lora_cfg.target_modules), list(lora_cfg.modules_to_save or [])
        adapted = list(lora_cfg.target_parameters or [])
    parts = {name: _PartMatmuls() for name in ("patch_embed", "vision", "merger", "decoder", "lm_head")}
    _add_routed_experts(parts["decoder"], model, family, adapted)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv3d)):
            continue
        part = parts[owner.get(id(module), "lm_head")]
        weights = module.weight.numel()
        part.base += weights
        if lora_pattern is None:
            part.trained += weights if module.weight.requires_grad else 0
            continue
        if lora_pattern.fullmatch(name):
            part.lora += adapter_cfg.r * (module.in_features + module.out_features)
        if any(name == key or name.startswith(key + ".") for key in saved):  # full paths (build_lora_config)
            part.trained += weights
    return parts


def _add_routed_experts(decoder: _PartMatmuls, model, family: families.Family, adapted) -> None:
    """A mixture-of-experts model's fused expert weights (not Linear layers): each token runs exactly
    num_experts_per_tok of num_experts experts, so that share of them counts (estimate/experts.py). A fused weight
    with LoRA counts as trained: PEFT folds the LoRA into a copy of the weight, whose gradient the backward computes
    in full before it reaches the factors (the fold itself, once per layer and step, is not per token and is left
    out, as is the router: num_experts outputs per token)."""
    if not family.expert_parameters:
        return
    text = model.config.get_text_config()
    share = text.num_experts_per_tok / text.num_experts
    for name, parameter in model.named_parameters():
        suffix = next((s for s in family.expert_parameters if name.endswith(s)), None)
        if suffix is not None:
            decoder.base += parameter.numel() * share
            decoder.trained += parameter.numel() * share if parameter.requires_grad or suffix in adapted else 0


def training_flops(cfg: TrainConfig, model=None) -> TrainingFlops:
    """Model FLOPs per unit of work of one training step of this config (see `TrainingFlops`), from the model's
    architecture on the meta device: the same config objects and builders the memory estimate uses."""
    model = model if model is not None else meta_model(cfg.model)
    config = model.config
    text, vision = config.get_text_config(), config.vision_config
    parts = _part_matmuls(cfg, model)
    merge_unit = vision.spatial_merge_size ** 2  # the projectors run once per merge_unit patches
    trains = {name: bool(p.trained or p.lora) for name, p in parts.items()}
    vision_reached = trains["patch_embed"] or trains["vision"]

    def matmuls(part: _PartMatmuls, reached: bool) -> float:
        return 2 * part.base + (2 * part.base if reached else 0) + 2 * part.trained + 6 * part.lora

    # the patch embedding's input is the pixels: it never needs an input gradient
    per_patch = (matmuls(parts["patch_embed"], False) + matmuls(parts["vision"], vision_reached)
                 + matmuls(parts["merger"], vision_reached or trains["merger"]) / merge_unit)
    per_token = matmuls(parts["decoder"], True) + matmuls(parts["lm_head"], True)
    heads = text.num_attention_heads
    lm_width = heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
    per_token_pair = 3 * 4 * lm_width * attention_layers(text)
    vision_width, full_blocks, window_blocks = vision_attention_blocks(config)
    vision_attention = (3 if vision_reached else 1) * 4 * vision_width
    flops = TrainingFlops(per_token, per_token_pair, per_patch, vision_attention * full_blocks,
                          vision_attention * window_blocks)
    for _ in range(methods.get(cfg.trainer.kind).reference_forwards(cfg)):
        flops = flops + _base_forward(parts, config)
    return flops


def forward_flops(cfg: TrainConfig, model=None) -> TrainingFlops:
    """One forward of the base model, without adapters: what DPO's reference policy costs per step (the adapter
    disabled, or the frozen copy), in the units of `TrainingFlops`."""
    model = model if model is not None else meta_model(cfg.model)
    return _base_forward(_part_matmuls(cfg, model), model.config)


def _base_forward(parts: Dict[str, _PartMatmuls], config) -> TrainingFlops:
    text, vision = config.get_text_config(), config.vision_config
    heads = text.num_attention_heads
    lm_width = heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
    vision_width, full_blocks, window_blocks = vision_attention_blocks(config)
    merge_unit = vision.spatial_merge_size ** 2
    return TrainingFlops(2 * (parts["decoder"].base + parts["lm_head"].base),
                         4 * lm_width * attention_layers(text),
                         2 * (parts["patch_embed"].base + parts["vision"].base + parts["merger"].base / merge_unit),
                         4 * vision_width * full_blocks, 4 * vision_width * window_blocks)


def attention_layers(text) -> int:
    """Decoder layers with softmax attention (the token-pair terms): all of them, unless the config lists layer
    types (a hybrid model's linear-attention layers cost matmuls per token, counted with the projections; their
    recurrence itself, heads x key x value width per token, is left out of the model FLOPs)."""
    types = getattr(text, "layer_types", None)
    return sum(kind == "full_attention" for kind in types) if types else text.num_hidden_layers


def vision_attention_blocks(config) -> tuple:
    """(attention width, blocks attending over a whole frame, blocks attending within windows) of the model config's
    ViT: a ViT config that names full-attention blocks and a window size attends within windows in the other
    blocks; one without them attends over each frame in every block."""
    vision = config.vision_config
    width = families.of_config(config).vision_sizes(vision).width
    if getattr(vision, "window_size", None) and getattr(vision, "fullatt_block_indexes", None) is not None:
        full = len(vision.fullatt_block_indexes)
        return width, full, vision.depth - full
    return width, vision.depth, 0


def vision_attention_pairs(grid_thw, vision) -> tuple:
    """(frame pairs, window pairs) of `StepWork` for images/videos of these (t, h, w) patch grids, as tensors on
    the grids' device (no host synchronisation): every frame attends within itself; a window-attention block
    within windows of `window_size` pixels, i.e. `window_size // merge // patch` merged units a side, the last
    window of a row or column holding the remainder (transformers' `get_vision_window_index`)."""
    grid = grid_thw.long()
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    frame_pairs = (t * (h * w) ** 2).sum()
    window_size = getattr(vision, "window_size", None)
    if not window_size or getattr(vision, "fullatt_block_indexes", None) is None:
        return frame_pairs, frame_pairs * 0
    merge = vision.spatial_merge_size
    side = window_size // merge // vision.patch_size

    def squares(units):  # sum of squared window extents along one axis, in merged units
        return (units // side) * side * side + (units % side) ** 2

    window_pairs = (t * merge ** 4 * squares(h // merge) * squares(w // merge)).sum()
    return frame_pairs, window_pairs


def worst_case_work(budget: BatchBudget, vision) -> StepWork:
    """The estimate's batch as work: every row at its full length, each row's image budget in one image."""
    per_row_tokens = budget.tokens / budget.rows
    images = budget.vision_patches / budget.row_patches if budget.row_patches else 0
    window = getattr(vision, "window_size", None)
    side = window // vision.patch_size if window else 0
    return StepWork(budget.tokens, budget.rows * per_row_tokens ** 2, budget.vision_patches,
                    images * budget.row_patches ** 2, budget.vision_patches * min(side * side, budget.row_patches))
