"""Not a family (the registry skips modules named with a leading underscore): the layer formulas Qwen3.5's families
share. The estimate's activation bytes of a hybrid Gated DeltaNet / gated attention language model, per token and
per layer kind, from the saved tensors of transformers' torch path (modeling_qwen3_5.py:
Qwen3_5DecoderLayer, Qwen3_5GatedDeltaNet with torch_chunk_gated_delta_rule, Qwen3_5Attention, Qwen3_5RMSNorm).
tests/test_estimate.py measures autograd's saved tensors of the real code on CPU and checks these against them.

Why a formula of our own: no library sizes these layers, and a peak without them would be too low. Two things set
this model apart from the other families' `decoder_layer_bytes`:
  - Qwen3.5's RMSNorms compute in fp32 and multiply by (1 + weight) in fp32, so the normalised input a trainable
    norm weight needs is kept in fp32 (4 bytes), not in the activation dtype.
  - The chunked delta rule runs in fp32 (it casts q, k, v, beta and the decay) on chunks of 64 tokens; it keeps
    chunk x chunk matrices per value head (4 of them, `4 * heads * chunk` bytes per token each at most) and one
    state (key width x value width per head) per chunk. Under autocast (bf16/fp16 mixed precision, `a < 4`)
    every matmul casts its fp32 operands, and those casts are what it keeps (two state casts per chunk, five
    chunk slices); without autocast (fp32) it keeps the fp32 tensors themselves.
flash-linear-attention's kernels (CUDA) keep less: a run that uses them peaks lower than this says. The sequence is
taken as a whole number of chunks (the torch path pads each sample to one).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from qwenvl_ft.families.base import LINEAR_ATTENTION, head_dim, lora_bytes

CHUNK = 64  # torch_chunk_gated_delta_rule's chunk_size


def norms_and_mlp_bytes(text: Any, a: int, trainable: bool, linear: int) -> int:
    """Both RMSNorms (an fp32 copy of the input and its rsqrt each; trainable: the fp32 normalised input and the
    next Linears' input) and the gated MLP (gate and up outputs, SiLU's output; trainable: down_proj's input)."""
    h, inter = text.hidden_size, text.intermediate_size
    total = 2 * (4 * h + 4) + 3 * linear * inter
    if trainable:
        total += 2 * (4 * h + a * h) + a * inter
    return total


def chunked_delta_rule_bytes(heads: int, key_width: int, value_width: int, a: int) -> float:
    """torch_chunk_gated_delta_rule, per token, with `heads` value heads (q and k repeated to them)."""
    k, v, c, state = heads * key_width, heads * value_width, CHUNK, heads * key_width * value_width
    total = 2 * (4 * k + 4 * heads)  # q and k in fp32 and their l2-norm rsqrt
    total += 4 * heads + 4 * v + 4 * k  # beta, the padded v and k (v * beta, k * beta)
    total += 4 * heads * c  # the pairwise decays
    total += 2 * (2 * a * k + a * heads * c)  # k_beta @ k^T and q @ k^T: both operands and the product
    total += 4 * heads + 4 * k + 4 * heads * c + 4 * v + 4 * k  # decay cumsum exp, k_beta, the UT system, solves
    total += 8 * heads + 4 * k + 4 * heads / c  # the decays of q and k, q, each chunk's total decay
    if a < 4:  # autocast: the scan keeps the casts of its matmul operands
        return total + (2 * a + 4) * state / c + a * heads * c + a * (3 * k + 2 * v)
    return total + 4 * state / c + 4 * v + 4 * heads * c + 8 * k  # state, new values, intra-chunk attention, q, k


def deltanet_layer_bytes(text: Any, a: int, trainable: bool, lora_in: Sequence[int], r: int, mask_bytes: int = 1,
                         linear: Optional[int] = None) -> float:
    """Saved tensors of one Gated DeltaNet decoder layer, per token: the norms and the MLP; the causal conv (its
    input, and its output that SiLU keeps); beta and the decay's softplus input (trainable: its output too); the
    chunked delta rule; the gated RMSNorm (its fp32 input, rsqrt, the fp32 gate and its SiLU, the weighted output;
    trainable: the normalised input and out_proj's input). `linear`: bytes of a Linear's output (4 under QLoRA)."""
    m = a if linear is None else linear
    heads, value = text.linear_num_value_heads, text.linear_num_value_heads * text.linear_value_head_dim
    conv = 2 * text.linear_num_key_heads * text.linear_key_head_dim + value
    total = norms_and_mlp_bytes(text, a, trainable, m) + 2 * a * conv + a * heads + 4 * heads
    total += chunked_delta_rule_bytes(heads, text.linear_key_head_dim, text.linear_value_head_dim, a)
    total += 12 * value + 4 * heads + m * value  # the weighted output: the norm weight's dtype (fp32 if upcast)
    if trainable:
        total += 4 * heads + 2 * a * value
    return total + sum(lora_bytes(n, r, a, mask_bytes) for n in lora_in)


def gated_attention_layer_bytes(text: Any, a: int, trainable: bool, lora_in: Sequence[int], r: int,
                                mask_bytes: int = 1, linear: Optional[int] = None) -> int:
    """Saved tensors of one gated attention decoder layer, per token: the norms and the MLP; q_norm's fp32 input
    (a copy of the query half of q_proj's output, or, when that output is already fp32, the whole of it, gate
    included) and k_norm's, their rsqrt; q and k after RoPE, v, the output and log-sum-exp of the fused attention
    kernel; the output gate's sigmoid and the attention output it multiplies (trainable: the normalised q and k,
    and o_proj's input). The rotary tables are shared by every layer."""
    m = a if linear is None else linear
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    q, kv = heads * head_dim(text), kv_heads * head_dim(text)
    total = norms_and_mlp_bytes(text, a, trainable, m)
    total += (8 * q if m == 4 else 4 * q) + 4 * heads + 4 * kv + 4 * kv_heads
    total += a * (q + 2 * kv) + 4 * heads + a * q + m * q + a * q
    if trainable:
        total += 4 * (q + kv) + a * q
    return total + sum(lora_bytes(n, r, a, mask_bytes) for n in lora_in)


def hybrid_layer_bytes(text: Any, kind: str, a: int, trainable: bool, lora_in: Sequence[int], r: int,
                       mask_bytes: int = 1, linear: Optional[int] = None) -> float:
    """Saved tensors per token of a decoder layer of this `kind` (`Family.kind_layer_bytes`)."""
    layer = deltanet_layer_bytes if kind == LINEAR_ATTENTION else gated_attention_layer_bytes
    return layer(text, a, trainable, lora_in, r, mask_bytes, linear)
