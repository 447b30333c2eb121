"""How a model family writes a box or a point: the frame its numbers live in, the grid they are rounded to, and the
text around them. Each family declares its own (families/*.py: `box_convention`, with the sources of its
convention); coords.py and text.py read it. Nothing here names a family.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAMES = ("relative", "resized")  # a grid over the image, or pixels of the resized image
TEXT_FORMS = ("box_tokens", "json")


@dataclass(frozen=True)
class BoxConvention:
    frame: str  # "relative": value = position / size * grid; "resized": pixels of the image after the resize
    grid: int = 0  # relative frames: the grid's size (positions 0..top)
    top: int = 0  # relative frames: the largest value written (999 for a [0, 1000) grid, 1000 for [0, 1000])
    text: str = "json"  # "box_tokens" (<|box_start|>(x1,y1),(x2,y2)<|box_end|>) or "json" (bbox_2d / point_2d)

    def __post_init__(self) -> None:
        if self.frame not in FRAMES or self.text not in TEXT_FORMS:
            raise ValueError(f"BoxConvention: frame must be one of {FRAMES} and text one of {TEXT_FORMS}")
