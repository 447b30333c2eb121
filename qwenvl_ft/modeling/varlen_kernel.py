"""The one-call variable-length attention kernel: torch's `varlen_attn`, a CPU reference of it, and the per-span
SDPA that stands in where the kernel cannot run.

Why torch's kernel and not flash-attn: torch >= 2.10 ships `torch.nn.attention.varlen.varlen_attn`, flash-attention
2's varlen kernels inside torch (a custom op with autograd that compiles), so packed rows and every image of a batch
attend in one call per layer without the flash-attn package, which has no wheel for the GPU machine's torch. It
runs on CUDA only, in bf16 / fp16.

Its signature changed between the releases we meet (the GPU machine has torch 2.11, this venv 2.14), so
`call_varlen_attn` reads the installed signature instead of assuming one:
  - torch 2.10: `(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)`; no scale, and query
    and key/value must have the same number of heads;
  - torch 2.11: keyword-only `return_aux, scale, window_size=(-1, -1)`; causal is `window_size=(-1, 0)` (pytorch
    #172245 removed `is_causal`), still no grouped-query attention;
  - torch 2.12 and later: adds `enable_gqa` (pytorch #179468), `seqused_k`, `block_table`, `num_splits`.
A scale the kernel cannot take is folded into the query (the kernel's own is 1/sqrt(head_dim)), and key/value
heads are repeated for grouped-query attention where `enable_gqa` is missing (as transformers' `repeat_kv` does).
Note that `varlen_attn` compares `window_size == (-1, 0)` to a tuple: a list would silently mean "not causal".
Newer builds (2.14 here) send non-causal calls over 128 tokens in bf16 / fp16 on Hopper and Blackwell to cuDNN when
cuDNN >= 9.18 (whatever `torch.backends.cuda.enable_cudnn_sdp` says): the vision tower's calls. pytorch#187770 (June
2026) reports that routing on nightlies, after 2.11; not checked on 2.11 itself.

Layout (the kernel's): query (total, heads, head_dim), key / value (total, kv heads, head_dim), `cu_seqlens` the
int32 offsets of each sequence (N + 1 values), `max_q` / `max_k` Python ints (a tensor would cost a device sync).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch

HALF = (torch.float16, torch.bfloat16)  # what flash-attention's kernels compute in


def torch_varlen_missing() -> Optional[str]:
    """Why torch's varlen kernel cannot run here, or None when it can (CUDA, and torch >= 2.10). The GPU is asked
    first: without one, torch's varlen module (80 ms of start-up) is not imported."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (varlen_attn runs on CUDA only)"
    if _varlen_function() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)"
    return None


def _varlen_function():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_PARAMETERS: Dict[Any, frozenset] = {}  # per kernel function: its parameter names, read once


def _parameters(function) -> frozenset:
    # a plain dict rather than functools.lru_cache, which torch.compile would not trace through
    if function not in _PARAMETERS:
        _PARAMETERS[function] = frozenset(inspect.signature(function).parameters)
    return _PARAMETERS[function]


def call_varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool, scale: Optional[float],
                     function=None) -> torch.Tensor:
    """`varlen_attn` (or `function`, with its signature) on one batch of sequences, whichever torch release."""
    function = function or _varlen_function()
    parameters = _parameters(function)
    options = {}
    if causal:
        if "window_size" in parameters:
            options["window_size"] = (-1, 0)  # a tuple: the kernel compares against one
        elif "is_causal" in parameters:
            options["is_causal"] = True
        else:
            raise RuntimeError(f"this torch's varlen_attn takes neither window_size nor is_causal: {parameters}")
    if scale is not None:
        if "scale" in parameters:
            options["scale"] = scale
        else:
            query = query * (scale * query.shape[-1] ** 0.5)  # the kernel multiplies by 1/sqrt(head_dim)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return function(query, key, value, cu_q, cu_k, int(max_q), int(max_k), **options)


def torch_kernel(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale) -> Optional[torch.Tensor]:
    """torch's kernel, or None where it cannot run (not CUDA, or not bf16 / fp16 throughout: an fp32 forward
    without autocast); the caller then attends per span."""
    if not query.is_cuda or query.dtype not in HALF or not key.dtype == value.dtype == query.dtype:
        return None
    device = query.device
    return call_varlen_attn(query, key, value, cu_q.to(device, torch.int32), cu_k.to(device, torch.int32), max_q,
                            max_k, causal, scale)


def reference_kernel(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale) -> torch.Tensor:
    """What the kernel computes, as one SDPA call over the whole batch with a block-diagonal (causal) mask built
    from the same `cu_seqlens`: runs anywhere, costs (total length)^2, for tests of the bookkeeping."""
    if not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError("the reference kernel attends within sequences: cu_seq_q must equal cu_seq_k")
    lengths = cu_q.diff().cpu()
    if int(lengths.max()) > max_q or int(lengths.max()) > max_k:
        raise ValueError(f"max_q={max_q} / max_k={max_k} below the longest sequence ({int(lengths.max())})")
    total = query.shape[0]
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(query.device)
    if sequence.numel() != total:
        raise ValueError(f"cu_seqlens covers {sequence.numel()} tokens, the query has {total}")
    allowed = sequence[:, None] == sequence[None, :]
    if causal:
        allowed = allowed.tril()
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], attn_mask=allowed,
        scale=scale, enable_gqa=key.shape[1] != query.shape[1])
    return out[0].transpose(0, 1)


def per_span_sdpa(query, key, value, cu_seqlens: torch.Tensor, causal: bool, scale: Optional[float]) -> torch.Tensor:
    """One SDPA call per sequence (the per-sample path), in the kernel's layout; reading the spans costs a device
    sync when `cu_seqlens` lives on a GPU."""
    spans = cu_seqlens.diff().tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=causal,
            scale=scale, enable_gqa=k.shape[1] != q.shape[1])[0].transpose(0, 1)
        for q, k, v in zip(query.split(spans), key.split(spans), value.split(spans))
    ]
    return torch.cat(outputs)
