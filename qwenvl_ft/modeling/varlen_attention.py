"""Variable-length attention: packed rows attend per sample, and the images of a batch per image, without a mask
over the whole batch. Registered through transformers' AttentionInterface and AttentionMaskInterface (its
extension points for this; no library code is replaced). Two paths, chosen by `model.varlen_attention`
(`choose`; auto = `torch` on CUDA with torch >= 2.10, else `per_sample`):

  - `per_sample` (`sdpa_varlen`, the language model of packed runs only): the packed row is cut at its sample
    boundaries (the restarts of the text positions, the same signal transformers' packed-sequence detection
    uses) and each sample gets causal SDPA on its own. Why: with `sdpa` or `eager`, transformers keeps packed
    samples apart with a block-diagonal causal mask over the whole pack, so attention costs (pack length)^2
    instead of the sum of (sample length)^2; on a CPU the masked attention of a 2,048-token pack of 70-token
    captions was 60% of a training step. Reading the boundaries costs a device sync per forward and one SDPA
    call per sample. The vision tower keeps transformers' own loop: one SDPA call per image and block.
  - `torch` (`torch_varlen` for the language model, `torch_varlen_flash` for the vision tower): torch's
    `varlen_attn` kernel (modeling/varlen_kernel.py) attends within every sequence of the batch in ONE call per
    layer. The language model reads the boundaries from `cu_seq_lens_q/k` and `max_length_q/k`, transformers'
    own varlen keywords, which the packing collator builds on the CPU (data/packing.py), so no step waits on a
    device sync. The vision tower: transformers' vision attention of every declared family hands `cu_seqlens`
    (per image, or per frame of a video) to the attention function only when the vision config's attention
    name contains "flash", and loops per image otherwise; so the kernel is registered for the tower under a
    name that says "flash" and set on the tower's config (`use_for_vision`). It is not set through
    `set_attn_implementation`, which would try to import flash-attn (or a Hub kernel) for any such name.
    tests/test_varlen_attention.py checks that each block then makes one call for all the images.

Every path falls back to plain SDPA where it does not apply: a padded batch (it has an attention mask), several
rows, generation (a cache). The mask functions build no mask when there is no padding to honour (plain causal, or
a packed row, both handled here) and SDPA's ordinary mask otherwise, so padded batches and generation behave as
with `sdpa`. flash_attention_2 (flash-attn installed and named in model.attn_implementation) is left alone: it has
its own varlen path.
"""

from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional

import torch

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.modeling import varlen_kernel

log = logging.getLogger("qwenvl_ft")

NAME = "sdpa_varlen"  # per-sample SDPA, language model
TORCH_NAME = "torch_varlen"  # torch's varlen_attn, language model
# torch's varlen_attn for the vision tower; "flash" in the name is what makes transformers' vision attention pass
# `cu_seqlens` instead of looping per image
VISION_NAME = "torch_varlen_flash"
PER_SAMPLE, TORCH = "per_sample", "torch"  # the paths (model.varlen_attention's values but auto)

# The kernel the torch path calls: (query, key, value, cu_q, cu_k, max_q, max_k, causal, scale) -> output in the
# kernel's layout, or None where it cannot run. Tests swap in varlen_kernel.reference_kernel to run the path on a CPU.
KERNEL = varlen_kernel.torch_kernel
_fallback_logged: List[bool] = []


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


# -- per_sample --------------------------------------------------------------------------------------------------


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


# -- torch -------------------------------------------------------------------------------------------------------


def torch_varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
                           max_length_q=None, max_length_k=None, **kwargs):
    """All sequences of a one-row batch in one kernel call, their boundaries from `cu_seq_lens_q/k` (the packing
    collator's for the language model; the vision model's per-image `cu_seqlens`). Anything else (a padded
    batch, generation, a packed row without the keywords) goes to `sdpa_varlen_attention`."""
    applies = (cu_seq_lens_q is not None and attention_mask is None and query.shape[0] == 1
               and key.shape[2] == query.shape[2] and not kwargs.get("dropout"))
    if not applies:
        return sdpa_varlen_attention(module, query, key, value, attention_mask, **kwargs)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    max_q = max_length_q if max_length_q is not None else int(cu_seq_lens_q.diff().max())
    max_k = max_length_k if max_length_k is not None else max_q
    scale = kwargs.get("scaling")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, head_dim)
    out = KERNEL(q, k, v, cu_seq_lens_q, cu_k, max_q, max_k, causal, scale)
    if out is None:  # not CUDA, or fp32 without autocast: the same attention, one SDPA call per sequence
        if not _fallback_logged:
            _fallback_logged.append(True)
            log.warning("varlen attention: torch's varlen_attn needs bf16/fp16 on CUDA and got %s on %s; "
                        "attending with one SDPA call per sequence instead", q.dtype, q.device.type)
        out = varlen_kernel.per_span_sdpa(q, k, v, cu_seq_lens_q, causal, scale)
    return out.unsqueeze(0), None  # (batch, length, heads, head_dim), like sdpa_attention_forward


def register() -> str:
    """Registers every name of this module with transformers (idempotent); returns the per-sample one."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    for name in (TORCH_NAME, VISION_NAME):
        AttentionInterface.register(name, torch_varlen_attention)
        AttentionMaskInterface.register(name, varlen_mask)
    return NAME


# -- which path --------------------------------------------------------------------------------------------------


class Choice(NamedTuple):
    path: str  # PER_SAMPLE or TORCH
    reason: str


def choose(setting: str, dtype: str = "bfloat16") -> Choice:
    """The path `model.varlen_attention` (auto | torch | per_sample) takes on this machine for a model in `dtype`.
    An explicit `torch` that cannot run is a config error, not a silent fallback."""
    if setting == PER_SAMPLE:
        return Choice(PER_SAMPLE, "model.varlen_attention=per_sample")
    missing = varlen_kernel.torch_varlen_missing()
    if missing is None and dtype == "float32":
        missing = "model.dtype=float32 (the kernel computes in bf16 / fp16)"
    if setting == TORCH:
        if missing is not None:
            raise ConfigError(f"model.varlen_attention=torch cannot run here: {missing}; use "
                              f"model.varlen_attention=auto (the per-sample path where torch's cannot run) or "
                              f"per_sample")
        return Choice(TORCH, f"model.varlen_attention=torch, torch {torch.__version__}")
    if missing is not None:
        return Choice(PER_SAMPLE, f"model.varlen_attention=auto: {missing}")
    return Choice(TORCH, f"model.varlen_attention=auto: CUDA and torch {torch.__version__}")


def use_for_language_model(model, name: str = NAME) -> bool:
    """Switch the language model of `model` (PEFT-wrapped or not) from `sdpa` to `name` (`sdpa_varlen` or
    `torch_varlen`). Returns whether it switched: flash_attention_2 and eager are left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.get_text_config()._attn_implementation not in ("sdpa", NAME, TORCH_NAME):
        return False
    register()
    tower = _vision_config(model)
    if tower._attn_implementation == VISION_NAME:  # set_attn_implementation would re-check it and try flash-attn
        base.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})
        tower._attn_implementation = VISION_NAME
    else:
        base.set_attn_implementation({"text_config": name})
    return True


def use_for_vision(model) -> bool:
    """Make the vision tower of `model` attend to all images of a batch in one kernel call per block (see the
    module's docstring for why its config is set directly). Returns whether it switched: a tower on flash-attn or
    eager is left alone."""
    tower = _vision_config(model)
    if tower._attn_implementation not in ("sdpa", VISION_NAME):
        return False
    register()
    tower._attn_implementation = VISION_NAME
    return True


def _vision_config(model):
    """The config the vision tower's attention modules read (the model's `vision_config` object)."""
    from qwenvl_ft import families

    return families.of_model(model).parts(model).vision.config
