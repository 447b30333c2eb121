"""A dataset generated offline: one coloured shape per image, and the question "What is in the image?".

The answer ("a red circle") needs both the colour and the shape, so a model only gets it right by looking at the
image. Everything is a pure function of the seed, so the demo and the tests see the same data on every machine.

With data.shapes.task=grounding the shape sits in one cell of a data.shapes.grid x grid layout and the question is
"Where is the red circle?": the answer is its box, held as the row's objects (pixels of the image) and written by
the collator in the trained family's convention (data/grounding.py), so the same rows train every family.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

from PIL import Image, ImageDraw

from qwenvl_ft.config.data import ShapesConfig, ShapesTask

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is in the image?"


def draw(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    return draw_shape(colour, shape, size, rng)[0]


def draw_shape(colour: str, shape: str, size: int, rng: random.Random, cell: Optional[Tuple[int, int]] = None,
               grid: int = 3):
    """The image, and the shape's box (x1, y1, x2, y2) in its pixels. Without `cell`, one large shape anywhere;
    with it, a shape filling most of that cell (column, row) of a grid x grid layout."""
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background) if cell is None else _position_ramp(size)
    pen = ImageDraw.Draw(image)
    if cell is None:  # large shapes, so that the corners of the image tell a circle from a square from a triangle
        extent = rng.randint(int(size * 0.7), size - 4)
        x0, y0 = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    else:
        step = size / grid
        # Most of the cell: the ramp the shape covers is what tells the tiny model where it is (measured in
        # docs/grounding.md: with half the cell it never learnt the position, with 0.85 it did within a few hundred
        # steps); a thin border of ramp still shows around it.
        extent = int(step * 0.85)
        x0, y0 = int(cell[0] * step + (step - extent) / 2), int(cell[1] * step + (step - extent) / 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image, box


def _position_ramp(size: int) -> Image.Image:
    """A background whose red part grows left to right and blue part top to bottom. A real model knows where
    each of its patches is; a tiny one trained from scratch for minutes does not (rotary positions move attention
    scores, not the features it reads out), so the grounding demo lets every patch show its place."""
    ramp = Image.new("RGB", (size, size))
    ramp.putdata([(255 * x // size, 255, 255 * y // size) for y in range(size) for x in range(size)])
    return ramp


def make_rows(count: int, size: int, seed: int, split: str, task: ShapesTask = ShapesTask.caption,
              grid: int = 3) -> List[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for index in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        cell = (rng.randrange(grid), rng.randrange(grid)) if task == ShapesTask.grounding else None
        image, box = draw_shape(colour, shape, size, rng, cell, grid)
        question, answer = QUESTION, f"a {colour} {shape}"
        if cell is not None:  # the answer is the box, written by the collator in the family's convention
            question, answer = f"Where is the {colour} {shape}?", "<objects>"
        row = {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                         {"type": "text", "text": question}]},
                            {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
               "images": [image], "source": f"shapes:{split}:{index}"}
        if cell is not None:
            # no label: the question names the shape, the answer is where it is
            row["objects"] = [{"label": None, "values": [float(v) for v in box], "image": 0}]
        rows.append(row)
    return rows


def generate(cfg: ShapesConfig):
    """(train rows, eval rows) as lists of canonical rows."""
    return (make_rows(cfg.num_train, cfg.image_size, cfg.seed, "train", cfg.task, cfg.grid),
            make_rows(cfg.num_eval, cfg.image_size, cfg.seed, "eval", cfg.task, cfg.grid))
