"""Padding-free packing: several encoded samples concatenated into one row that behaves like separate rows.

A packed row carries, per token, its sample's own positions:

    position_ids[0]    text positions 0..len-1, restarting at every sample
    position_ids[1:4]  the sample's 3-D M-RoPE positions (temporal, height, width), also restarting

that is the `(4, 1, total)` layout the language models of every declared family read as "packed": they split off
row 0 and hand it to the mask builder and the attention kernels, and rotate with rows 1-3. From row 0 transformers
already does the rest, so nothing here patches a library:
  - sdpa / eager (CPU, or GPU without flash-attn): `masking_utils.find_packed_sequence_indices` sees the position
    restarts and builds a block-diagonal causal mask, provided no `attention_mask` is passed;
  - flash_attention_2: `_is_packed_sequence` sees them too and calls the varlen kernel with `cu_seqlens` taken from
    the restarts (it needs exactly one row per forward, which is why a pack is one row).
The mask costs (pack length)^2, so a packed run on `sdpa` switches the language model to a varlen path
(qwenvl_ft/modeling/varlen_attention.py, registered through transformers' AttentionInterface; `model.varlen_attention`
chooses): torch's `varlen_attn` kernel, one call per layer for the whole pack, or per-sample SDPA. The kernel reads
the sample boundaries from `cu_seq_lens_q/k` and `max_length_q/k` (transformers' varlen keywords, which flash-attn's
path reads too), built here on the CPU (`sequence_boundaries`) so that no step waits on a device sync.
Images and videos need nothing extra: the vision tower already attends within each image or video (`cu_seqlens`
from the grids), and its features are scattered into the vision tokens in order.

Why the M-RoPE positions are computed here, per sample, and not by the model: the model's `get_rope_index` sees one
row and would number a pack as one long sequence; called per sample inside a forward it would run a Python loop
with a device sync per image on the training step. Here it runs in the DataLoader workers on CPU. The position
function is the family's (qwenvl_ft/families/<family>.py: `positions`, with `position_settings` read from the
model's config: how videos are numbered differs between families), and tests/test_packing.py checks it against
the model's own method for every family, so that a transformers change shows up.

Labels: the model shifts labels by one, so the last token of a sample "predicts" the first token of the next one.
That first label is always set to -100, whatever the sample's own labels say.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from qwenvl_ft import families
from qwenvl_ft.data.collate import IGNORE_INDEX, concat_vision
from qwenvl_ft.data.workers import one_thread


def position_function(model_config: Any) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """sample -> (3, len) M-RoPE positions, as the model with this config numbers a batch of one. A partial of a
    module-level function, so that it pickles into DataLoader workers."""
    family = families.of_config(model_config)
    return functools.partial(family.positions, **family.position_settings(model_config))


class PackingCollator:
    """Rows in, one packed row out; built on `VisionChatCollator.encode`. (The batch planner in
    qwenvl_ft/data/batching.py decides which rows share a pack.)
    `positions` is the model's position function (`position_function(model.config)`); without it, the family of
    the collator's processor numbers the samples with its settings' defaults, which suffices unless a family needs
    a value only the model's config holds (video timing, for one: then it says so).
    The model must run with `use_cache=False` (the Trainer does): with a cache, transformers skips the
    packed-sequence detection and the samples would attend to each other.
    """

    def __init__(self, collator, positions: Optional[Callable[[Dict[str, torch.Tensor]], torch.Tensor]] = None,
                 pad_to: Optional[int] = None):
        self.collator = collator
        self.positions = positions or functools.partial(collator.family.positions, merge_size=collator.merge_size)
        self.pad_to = pad_to

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        with one_thread():
            return self.pack(self.collator.encode_rows(rows))

    def filler(self, length: int) -> Dict[str, torch.Tensor]:
        """A sample of `length` pad tokens without labels, that fills a pack to exactly `pad_to` tokens: packed
        as a sample of its own, it attends only to itself and adds nothing to the loss or its token count."""
        return {"input_ids": torch.full((length,), self.collator.tokenizer.pad_token_id, dtype=torch.long),
                "labels": torch.full((length,), IGNORE_INDEX, dtype=torch.long),
                "mm_token_type_ids": torch.zeros(length, dtype=torch.long)}

    def pack(self, samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """One row of the samples; with `pad_to` (model.compile: every step the same shape, so the compiled
        decoder layers are not traced again), exactly `pad_to` tokens long."""
        total = sum(sample["input_ids"].numel() for sample in samples)
        if self.pad_to is not None and total < self.pad_to:
            samples = [*samples, self.filler(self.pad_to - total)]
        text_positions, rope_positions, labels = [], [], []
        for sample in samples:
            length = sample["input_ids"].numel()
            text_positions.append(torch.arange(length))
            rope_positions.append(self.positions(sample))
            sample_labels = sample["labels"].clone()
            sample_labels[0] = IGNORE_INDEX  # would be predicted from the previous sample's last token
            labels.append(sample_labels)
        position_ids = torch.cat([torch.cat(text_positions)[None], torch.cat(rope_positions, dim=1)])
        batch = {
            "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat(labels)[None],
            "mm_token_type_ids": torch.cat([s["mm_token_type_ids"] for s in samples])[None],
            "position_ids": position_ids[:, None, :],  # (4, 1, total); no attention_mask, on purpose (see above)
            **sequence_boundaries([sample["input_ids"].numel() for sample in samples]),
        }
        batch.update(concat_vision(samples))  # per-image / per-video tensors, in order, as `pad` does
        return batch


def sequence_boundaries(lengths: Sequence[int]) -> Dict[str, Any]:
    """transformers' varlen keywords for one packed row of samples of these lengths: `cu_seq_lens_q/k` (int32
    offsets of every sample, and the total) and `max_length_q/k` (the longest sample, a Python int). Built here, on
    the CPU, so that a varlen kernel gets them without a device sync (the Trainer moves the tensors to the
    device with the batch); TRL's padding-free collator passes the same keys."""
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    longest = max(lengths)
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


def sample_boundaries(position_ids: torch.Tensor) -> List[int]:
    """Start index of every sample in a packed row, from its text positions (row 0)."""
    text = position_ids[0, 0] if position_ids.dim() == 3 else position_ids[0]
    return (text == 0).nonzero().flatten().tolist()
