"""What the collator learns about one row: its decoded images and videos (`Visuals`), and what the data check
measures (`SampleStats`: `VisionChatCollator.measure` and the other methods' measurers, one per row, written to
the cache entry's result table, data/store.py, and read back by the reports, `estimate` and the batch planner)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Tuple

if TYPE_CHECKING:
    import torch


@dataclass
class Visuals:
    """A row's images and videos, decoded and (unless measuring) resized, in the order the text uses them."""

    images: List[torch.Tensor] = field(default_factory=list)  # uint8 (3, H, W)
    image_grids: List[Tuple[int, int, int]] = field(default_factory=list)  # (t, h, w) in patches
    image_sizes: List[Tuple[int, int]] = field(default_factory=list)  # (width, height) as stored
    videos: List[torch.Tensor] = field(default_factory=list)  # uint8 (T, 3, H, W)
    video_grids: List[Tuple[int, int, int]] = field(default_factory=list)
    video_sizes: List[Tuple[int, int, int]] = field(default_factory=list)  # (frames, width, height) as stored
    video_fps: List[float] = field(default_factory=list)  # sampled frames per second
    video_frame_times: List[List[float]] = field(default_factory=list)  # seconds of each frame in the video


@dataclass
class SampleStats:
    """What `measure(row)` reports; `length` is after the data.overlength policy."""

    source: str
    length: int
    full_length: int  # before truncation
    text_tokens: int
    label_tokens: int
    image_sizes: List[Tuple[int, int]]
    image_tokens: List[int]
    video_sizes: List[Tuple[int, int, int]]
    video_tokens: List[int]
    box_patches: List[float] = field(default_factory=list)  # each box's smaller side, in patches once resized
    # The rendered and tokenised text (before the vision placeholders expand) and which of its tokens are trained
    # on: stored with the row in the data check's split files (data/store.py `carried_fields`), so that `encode`
    # reads them instead of rendering the chat template and tokenising again in the training loop.
    text_ids: Optional[List[int]] = field(default=None, compare=False, repr=False,
                                          metadata={"stored_with_row": True})
    label_mask: Optional[List[bool]] = field(default=None, compare=False, repr=False,
                                             metadata={"stored_with_row": True})

    @property
    def truncated(self) -> bool:
        return self.length < self.full_length
