"""A dataset generated offline: one coloured shape per image, and the question "What is in the image?".

The answer ("a red circle") needs both the colour and the shape, so a model only gets it right by looking at the
image. Everything is a pure function of the seed, so the demo and the tests see the same data on every machine.
"""

from __future__ import annotations

import random
from typing import List

from PIL import Image, ImageDraw

from qwenvl_ft.config.data import ShapesConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is in the image?"


def draw(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    # Large shapes, so that the corners of the image tell a circle from a square from a triangle.
    extent = rng.randint(int(size * 0.7), size - 4)
    x0, y0 = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def make_rows(count: int, size: int, seed: int, split: str) -> List[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for index in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"a {colour} {shape}"}]},
            ],
            "images": [draw(colour, shape, size, rng)],
            "source": f"shapes:{split}:{index}",
        })
    return rows


def generate(cfg: ShapesConfig):
    """(train rows, eval rows) as lists of canonical rows."""
    return (make_rows(cfg.num_train, cfg.image_size, cfg.seed, "train"),
            make_rows(cfg.num_eval, cfg.image_size, cfg.seed, "eval"))
