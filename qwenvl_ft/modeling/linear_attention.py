"""Packed rows through recurrent (linear-attention) layers: each sample on its own.

Why: a Gated DeltaNet layer carries a state from one token to the next, through its causal conv and its
delta rule. Samples packed into one row would see each other through that state, where attention keeps them apart
(a block-diagonal mask, per-sample SDPA or flash-attention's varlen kernel); ms-swift and LLaMA-Factory users hit
exactly this. transformers' torch path of the layer takes no sample boundaries (flash-linear-attention's kernels
take `cu_seqlens`, on CUDA only, and the causal conv needs its own), so a packed row would train on a leak.

What: the decoder layers that hold a recurrent layer (`Family.linear_attention_class`) run once per sample slice of
a packed row, each from a zero state with the conv's own zero padding at the start, exactly as that sample would
unpacked; the outputs are concatenated. The samples are read from the text positions the language model hands every
decoder layer (a packed row restarts them at every sample: the signal transformers' packed-sequence detection and
`sdpa_varlen` use; SFT packs and padding-free DPO both produce it), once per forward. A padded batch (it has an
attention mask), a batch of several rows and generation (a cache) run the
layer as it is. transformers offers no extension point for this (AttentionInterface covers softmax attention only),
so the `forward` of the decoder layers that hold a recurrent layer is wrapped per instance, and each such decoder
layer runs per sample (its norms, residuals and MLP are per token, so this changes nothing else). Not the recurrent
layer's own `forward`: transformers kernelizes that class (`use_kernel_forward_from_hub`) and resets its forward
whenever the model switches between train() and eval(). The classes and transformers' code are left alone;
tests/test_packing.py checks packed = unpacked losses and gradients on the family's tiny model.

Which kernels run the recurrent layer (`linear_attention_backend`, in the run log and run_info.json): transformers
5.25 resolves the delta rule to flash-linear-attention's `chunk_gated_delta_rule` when the `fla` package imports
(fla-core, `pip install ".[fla]"`) and the inputs are on CUDA (or XPU, MLU), and to its fp32 torch loop otherwise
(transformers#48718 measured 1.22 s/step against 0.70 with the kernel on the 9B). Its causal conv goes to the
separate `causal_conv1d` package, whose function takes no sample boundaries (transformers passes `cu_seq_lens_q`,
which it filters out), so transformers' own varlen path would still leak through the conv: packed rows keep the
per-sample loop on every backend, and on CUDA each sample's slice runs fla's kernel.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch

from qwenvl_ft import families
from qwenvl_ft.families.base import attribute
from qwenvl_ft.modeling.varlen_attention import restarts

_WRAPPED = "_qwenvl_ft_per_sample"
FLA, TORCH = "flash-linear-attention", "torch"
FLA_DEVICES = ("cuda", "xpu", "mlu")  # where transformers hands the delta rule to fla (hub_kernels.py)


class SampleLengths:
    """The sample lengths of a packed row's text positions, worked out once per forward (every decoder layer gets
    the same positions tensor)."""

    def __init__(self) -> None:
        self.positions: Optional[torch.Tensor] = None
        self.lengths: Optional[List[int]] = None

    def of(self, position_ids: Optional[torch.Tensor]) -> Optional[List[int]]:
        if position_ids is not self.positions:
            self.positions, self.lengths = position_ids, packed_lengths(position_ids)
        return self.lengths


def packed_lengths(text_positions: Optional[torch.Tensor]) -> Optional[List[int]]:
    """Lengths of the samples of one packed row from its text positions ((1, L)), or None when it is not one."""
    if text_positions is None or text_positions.dim() != 2 or text_positions.shape[0] != 1:
        return None
    return restarts(text_positions[0])


# A decoder layer's per-token keyword inputs (the sequence is their second-to-last dimension for the rotary cos and
# sin, their last for the text positions); every other input is per batch.
PER_TOKEN_INPUTS = {"position_embeddings": -2, "position_ids": -1}
# The packed row's sample boundaries (transformers' varlen keywords, data/packing.py: `sequence_boundaries`): they
# describe the whole row, so a sample's slice runs without them (fla's kernels would read the row's offsets
# against the slice's tokens).
PACK_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def per_sample_forward(original, lengths: SampleLengths, hidden_states: torch.Tensor, *args, **kwargs):
    """A decoder layer's forward on each sample's slice of a packed row, its per-token inputs cut the same way;
    the forward as it is otherwise."""
    cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    spans = None if cached or args or kwargs.get("attention_mask") is not None else lengths.of(
        kwargs.get("position_ids"))
    if spans is None and not (cached or args) and hidden_states.shape[0] == 1:
        # one sequence (a pack of one sample): nothing to keep apart, and transformers' torch path refuses any
        # sequence boundaries
        return original(hidden_states, **{key: value for key, value in kwargs.items() if key not in PACK_INPUTS})
    if spans is None or hidden_states.shape[0] != 1 or sum(spans) != hidden_states.shape[1]:
        return original(hidden_states, *args, **kwargs)
    kwargs.pop("attention_mask", None)
    for key in PACK_INPUTS:
        kwargs.pop(key, None)
    pieces, start = [], 0
    for length in spans:
        piece_kwargs = {key: _cut(value, PER_TOKEN_INPUTS[key], start, length) if key in PER_TOKEN_INPUTS else value
                        for key, value in kwargs.items()}
        pieces.append(original(hidden_states[:, start:start + length], **piece_kwargs))
        start += length
    return torch.cat(pieces, dim=1)


def _cut(value, dim: int, start: int, length: int):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_cut(item, dim, start, length) for item in value)
    return value.narrow(dim, start, length)


def run_linear_attention_per_sample(model) -> int:
    """Make every decoder layer of `model` (PEFT-wrapped or not) that holds a recurrent layer keep packed samples
    apart. Returns how many layers it wrapped (0 for a family without recurrent layers); calling it again changes
    nothing."""
    family = families.of_model(model)
    layer_class = family.load_linear_attention_class()
    if layer_class is None:
        return 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [layer for layer in attribute(base, family.decoder_layers)
              if any(isinstance(module, layer_class) for module in layer.modules())
              and not getattr(layer, _WRAPPED, False)]
    lengths = SampleLengths()
    for layer in layers:
        layer.forward = functools.partial(per_sample_forward, layer.forward, lengths)
        setattr(layer, _WRAPPED, True)
    return len(layers)


def linear_attention_backend(model) -> Optional[str]:
    """What runs the delta rule of `model`'s recurrent layers: "flash-linear-attention" (fla-core's Triton
    kernels: the `fla` package imports and the model sits on a device fla runs on) or "torch" (transformers' fp32
    chunked loop); None for a family without recurrent layers."""
    family = families.of_model(model)
    if family.linear_attention_class is None:
        return None
    device = next(model.parameters()).device.type
    return FLA if device in FLA_DEVICES and fla_installed() else TORCH


def fla_installed() -> bool:
    """Whether transformers would take flash-linear-attention's kernels: the `fla` package at 0.2.2 or newer
    (transformers' floor; the `fla` extra asks for fla-core 0.4.1, the version packing users pin)."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    if find_spec("fla") is None:
        return False
    from packaging.version import Version

    for distribution in ("fla-core", "flash-linear-attention"):
        try:
            return Version(version(distribution)) >= Version("0.2.2")
        except PackageNotFoundError:
            continue
    return False
