"""Padding-free packing: several encoded samples concatenated into one row that behaves like separate rows.

A packed row carries, per token, its sample's own positions:

    position_ids[0]    text positions 0..len-1, restarting at every sample
    position_ids[1:4]  the sample's 3-D M-RoPE positions (temporal, height, width), also restarting

that is the `(4, 1, total)` layout Qwen2(.5)-VL's language model reads as "packed": it splits off row 0 and hands
it to the mask builder and the attention kernels, and rotates with rows 1-3. From row 0 transformers already does
the rest, so nothing here patches a library:
  - sdpa / eager (CPU, or GPU without flash-attn): `masking_utils.find_packed_sequence_indices` sees the position
    restarts and builds a block-diagonal causal mask, provided no `attention_mask` is passed;
  - flash_attention_2: `_is_packed_sequence` sees them too and calls the varlen kernel with `cu_seqlens` taken from
    the restarts (it needs exactly one row per forward, which is why a pack is one row).
The mask costs (pack length)^2, so a packed run on `sdpa` switches the language model to `sdpa_varlen`
(qwenvl_ft/modeling/varlen_attention.py: per-sample SDPA, registered through transformers' AttentionInterface).
Images and videos need nothing extra: the vision tower already attends within each image or video (`cu_seqlens`
from the grids), and its features are scattered into the vision tokens in order.

Why the M-RoPE positions are computed here, per sample, and not by the model: the model's `get_rope_index` sees one
row and would number a pack as one long sequence; called per sample inside a forward it would run a Python loop
with a device sync per image on the training step. Here it runs in the DataLoader workers on CPU. `mrope_positions`
mirrors `Qwen2VLModel.get_rope_index` (and Qwen2.5-VL's, which differs only in spacing video frames by time), and
tests/test_packing.py checks it against the model's own method so that a transformers change shows up.

Labels: the model shifts labels by one, so the last token of a sample "predicts" the first token of the next one.
That first label is always set to -100, whatever the sample's own labels say.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch

from qwenvl_ft.data.collate import IGNORE_INDEX, IMAGE, TEXT, VIDEO, concat_vision


def mrope_positions(mm_token_type_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                    spatial_merge_size: int, video_grid_thw: Optional[torch.Tensor] = None,
                    video_time_intervals: Optional[Sequence[float]] = None) -> torch.Tensor:
    """(3, len) M-RoPE positions of one sample, as `get_rope_index` numbers a batch of one.

    Text tokens count up on all three axes. A vision span starting at `start` gets (start + t * interval,
    start + row, start + column) on its merged grid, and the text after it resumes at start + max(rows, columns).
    `interval` is 1, except for Qwen2.5-VL videos: tokens_per_second x seconds per temporal patch.
    """
    grids = {IMAGE: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             VIDEO: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    intervals = iter(video_time_intervals) if video_time_intervals is not None else None
    pieces, current = [], 0
    for token_type, group in itertools.groupby(mm_token_type_ids.tolist()):
        length = len(list(group))
        if token_type == TEXT:
            pieces.append(torch.arange(current, current + length).expand(3, -1))
            current += length
            continue
        t, h, w = next(grids[token_type])
        h, w = h // spatial_merge_size, w // spatial_merge_size
        if t * h * w != length:
            raise ValueError(f"a vision span has {length} tokens but its grid {t}x{h}x{w} needs {t * h * w}")
        interval = next(intervals) if token_type == VIDEO and intervals is not None else 1
        tt, hh, ww = torch.meshgrid((torch.arange(t) * interval).long(), torch.arange(h), torch.arange(w),
                                    indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
        current += max(h, w)
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


class PackingCollator:
    """Rows in, one packed row out; built on `VisionChatCollator.encode`. (The batch planner in
    qwenvl_ft/data/batching.py decides which rows share a pack.)
    `tokens_per_second` is Qwen2.5-VL's `vision_config.tokens_per_second`, needed for its videos only.
    The model must run with `use_cache=False` (the Trainer does): with a cache, transformers skips the
    packed-sequence detection and the samples would attend to each other.
    """

    def __init__(self, collator, tokens_per_second: Optional[float] = None):
        self.collator = collator
        self.spatial_merge_size = collator.merge_size
        self.tokens_per_second = tokens_per_second

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        return self.pack([self.collator.encode(row) for row in rows])

    def _video_intervals(self, sample: Dict[str, torch.Tensor]) -> Optional[List[float]]:
        if "second_per_grid_ts" not in sample:
            return None  # Qwen2-VL: frames one position apart
        if self.tokens_per_second is None:
            raise ValueError("packing Qwen2.5-VL videos needs the model's vision_config.tokens_per_second")
        return [self.tokens_per_second * float(s) for s in sample["second_per_grid_ts"]]

    def pack(self, samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        text_positions, rope_positions, labels = [], [], []
        for sample in samples:
            length = sample["input_ids"].numel()
            text_positions.append(torch.arange(length))
            rope_positions.append(mrope_positions(sample["mm_token_type_ids"], sample.get("image_grid_thw"),
                                                  self.spatial_merge_size, sample.get("video_grid_thw"),
                                                  self._video_intervals(sample)))
            sample_labels = sample["labels"].clone()
            sample_labels[0] = IGNORE_INDEX  # would be predicted from the previous sample's last token
            labels.append(sample_labels)
        position_ids = torch.cat([torch.cat(text_positions)[None], torch.cat(rope_positions, dim=1)])
        batch = {
            "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat(labels)[None],
            "mm_token_type_ids": torch.cat([s["mm_token_type_ids"] for s in samples])[None],
            "position_ids": position_ids[:, None, :],  # (4, 1, total); no attention_mask, on purpose (see above)
        }
        batch.update(concat_vision(samples))  # per-image / per-video tensors, in order, as `pad` does
        return batch


def sample_boundaries(position_ids: torch.Tensor) -> List[int]:
    """Start index of every sample in a packed row, from its text positions (row 0)."""
    text = position_ids[0, 0] if position_ids.dim() == 3 else position_ids[0]
    return (text == 0).nonzero().flatten().tolist()
