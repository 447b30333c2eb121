"""Maps between three coordinate frames of one image: a dataset's (declared once, `data.grounding.coords`), the
original image's pixels, and the family's (its BoxConvention, on the image the run actually shows the model).

A box is (x1, y1, x2, y2) and a point (x, y): even positions are x (scaled by widths), odd ones y (by heights).
Sizes are (width, height). The resized size is the one the collator computes for this image and these data
settings (data/collate.py: `image_hw`), so a box is recomputed for every resize the run applies and never drifts
when max_pixels, resized_height/width or the processor's bounds change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

from qwenvl_ft.grounding.convention import BoxConvention

Size = Tuple[int, int]  # (width, height)
DATASET_COORDS = ("pixels", "relative", "qwen")  # data.grounding.coords


def _half_up(value: float) -> int:
    """Rounding half up, the same on every platform (Python's round() rounds half to even)."""
    return int(math.floor(value + 0.5))


def _scales(values: Sequence[float], size: Size) -> Tuple[int, ...]:
    if len(values) not in (2, 4):
        raise ValueError(f"a box has 4 numbers and a point 2, got {len(values)}")
    return tuple(size[i % 2] for i in range(len(values)))


def to_family(values: Sequence[float], original: Size, resized: Size, convention: BoxConvention) -> Tuple[int, ...]:
    """Original-image pixels -> the numbers the family writes, as integers on its grid."""
    sizes, news = _scales(values, original), _scales(values, resized)
    if convention.frame == "relative":
        return tuple(min(max(_half_up(v / s * convention.grid), 0), convention.top) for v, s in zip(values, sizes))
    return tuple(min(max(_half_up(v * n / s), 0), n - 1) for v, s, n in zip(values, sizes, news))


def to_original(values: Sequence[float], original: Size, resized: Size,
                convention: BoxConvention) -> Tuple[float, ...]:
    """The family's numbers -> original-image pixels (the inverse of to_family, up to its rounding)."""
    sizes, news = _scales(values, original), _scales(values, resized)
    if convention.frame == "relative":
        return tuple(v / convention.grid * s for v, s in zip(values, sizes))
    return tuple(v * s / n for v, s, n in zip(values, sizes, news))


def dataset_to_original(values: Sequence[float], coords: str, original: Size, resized: Size,
                        convention: BoxConvention) -> Tuple[float, ...]:
    """A dataset's numbers, in its declared frame, -> original-image pixels."""
    if coords == "pixels":
        return tuple(float(v) for v in values)
    if coords == "relative":
        return tuple(v * s for v, s in zip(values, _scales(values, original)))
    if coords == "qwen":
        return to_original(values, original, resized, convention)
    raise ValueError(f"coordinates must be one of {DATASET_COORDS}, got {coords!r}")


def rounding_error(original: Size, resized: Size, convention: BoxConvention) -> Tuple[float, float]:
    """How far (x, y), in original pixels, a round trip through the family's integers can move a coordinate: half a
    grid step, plus the clip at the top of the grid (a value between top and the grid's edge)."""
    if convention.frame == "relative":
        step = [s / convention.grid for s in original]
        return tuple(s * (0.5 + convention.grid - convention.top) for s in step)
    return tuple(s / n * 1.5 for s, n in zip(original, resized))  # half a pixel, plus the clip at n - 1


def marks_to_original(marks: Sequence, original: Size, shown: Size, convention: BoxConvention) -> List:
    """Parsed marks (grounding/text.py), in the family's numbers, as marks in the original image's pixels."""
    return [dataclasses.replace(mark, values=to_original(mark.values, original, shown, convention)) for mark in marks]
