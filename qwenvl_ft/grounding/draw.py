"""Boxes and points drawn on an image (infer's annotated copies, chat, the eval gallery). PIL is imported when a
drawing is made, so the rest of qwenvl_ft/grounding stays standard-library only."""

from __future__ import annotations

from typing import Sequence

from qwenvl_ft.grounding.text import Mark

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
REFERENCE = (255, 255, 255)  # reference boxes, drawn dashed-looking (thin, white) under the predicted ones


def draw_marks(image, marks: Sequence[Mark], references: Sequence[Mark] = ()):
    """A copy of the PIL image with `references` (thin, white) then `marks` (coloured, labelled) drawn on it; every
    value in the image's own pixels."""
    from PIL import ImageDraw

    canvas = image.convert("RGB").copy()
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 150))
    for mark in references:
        _draw(pen, mark, REFERENCE, width)
    for index, mark in enumerate(marks):
        _draw(pen, mark, COLOURS[index % len(COLOURS)], width + 1)
    return canvas


def _draw(pen, mark: Mark, colour, width: int) -> None:
    if mark.is_box:
        pen.rectangle(list(mark.values), outline=colour, width=width)
        anchor = (mark.values[0] + width, mark.values[1] + width)
    else:
        x, y = mark.values
        radius = 2 * width + 1
        pen.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=width)
        anchor = (x + radius, y - radius)
    if mark.label:
        pen.text(anchor, mark.label, fill=colour)
