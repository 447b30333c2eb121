"""Variable-length (per-sample) SDPA attention for packed rows, registered through transformers' AttentionInterface.

Why: with `sdpa` or `eager`, transformers keeps packed samples apart with a block-diagonal causal mask over the
whole pack, so attention costs (pack length)^2 instead of the sum of (sample length)^2 and runs SDPA's masked
kernel; on a CPU the masked attention of a 2,048-token pack of 70-token captions was 60% of a training step.
flash-attention's varlen kernel does the per-sample version on CUDA; this is the same idea for SDPA (CPU, or a
GPU without flash-attn): the packed row is cut at its sample boundaries (the restarts of the text positions, the
same signal transformers' packed-sequence detection uses) and each sample gets causal SDPA on its own, which is
what the Qwen2-VL vision tower already does per image.

It is registered under `sdpa_varlen` as an attention function and as a mask function (AttentionInterface and
AttentionMaskInterface are transformers' extension points for this; no library code is replaced). The mask
function builds no mask when there is no padding mask to honour (plain causal, or a packed row, both handled
here), and SDPA's ordinary mask otherwise, so padded batches and generation behave as with `sdpa`.
"""

from __future__ import annotations

from typing import List, Optional

import torch

NAME = "sdpa_varlen"


def keep_cudnn_out_of_sdpa() -> None:
    """Take cuDNN out of PyTorch's SDPA kernel choice (flash and memory-efficient attention stay).

    Why: PyTorch ranks cuDNN attention first on Hopper GPUs, and cuDNN builds an execution plan for every new
    sequence length. Qwen-VL models change length all the time: the vision tower calls attention once per image
    (each its own number of patches), padded batches and packs differ every step, and generation grows one token
    per step. Measured on an H200 (docs/performance.md, GPU section): a Qwen2-VL-2B LoRA step of 8 rows spent
    18 s of host time against 0.74 s of GPU time over 3 steps, 9.4 s of it inside cuDNN attention (3.7 ms of
    host time per call); without cuDNN the step took 0.52 s instead of 2.20 s. torch offers only this
    process-wide switch (no per-model one); nothing here turns it back on. Harmless on a CPU."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def sample_spans(position_ids: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                 attention_mask) -> Optional[List[int]]:
    """Sample lengths of a packed row, or None when this is not one (then plain SDPA applies)."""
    if position_ids is None or attention_mask is not None or query.shape[0] != 1:
        return None
    length = query.shape[2]
    if length == 1 or key.shape[2] != length or position_ids.shape[-1] != length:
        return None
    return restarts(position_ids.reshape(-1))


def restarts(positions: torch.Tensor) -> Optional[List[int]]:
    """Lengths of the samples of a packed row from its 1-D text positions (they restart at every sample), or None
    when they do not restart (one sample)."""
    starts = (torch.diff(positions) != 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = [0] + starts.tolist() + [positions.numel()]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def sdpa_varlen_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = sample_spans(position_ids, query, key, attention_mask)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(spans, dim=2), key.split(spans, dim=2), value.split(spans, dim=2))
    ]
    return torch.cat(outputs, dim=1), None  # (batch, length, heads, head_dim), like sdpa_attention_forward


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask: Optional[torch.Tensor] = None, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None  # causal, or a packed row: the attention function needs no mask for either
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def use_for_language_model(model) -> bool:
    """Switch the language model of a Qwen2(.5)-VL model from `sdpa` to `sdpa_varlen` (the vision tower keeps
    its own per-image attention). Returns whether it switched: flash_attention_2 and eager are left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.get_text_config()._attn_implementation != "sdpa":
        return False
    base.set_attn_implementation({"text_config": register()})
    return True
