"""A row's objects (boxes and points, data.grounding) read from its record, checked, and written into its messages
where a text says <objects>, in the trained family's convention once the run knows the size it shows the model
each image (data/collate.py).

Why at collate time and not when the rows are read: a family that writes pixels of the resized image (its
box_convention frame "resized") needs the size the collator resizes the image to, which depends on max_pixels,
resized_height/width, the processor's bounds and the image itself; writing there means a box follows every resize
the run applies and never drifts when a setting changes. The rows keep the dataset's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, List, Optional, Sequence, Tuple

from qwenvl_ft.config.data import BoxCoords, BoxText, GroundingConfig
from qwenvl_ft.errors import DataError
from qwenvl_ft.grounding import coords
from qwenvl_ft.grounding.convention import BoxConvention
from qwenvl_ft.grounding.text import Mark, parse, write

PLACEHOLDER = "<objects>"  # where a message's text takes the row's objects
Sizes = Sequence[Tuple[Tuple[int, int], Tuple[int, int]]]  # per image: ((width, height) stored, (width, height) shown)


def _at(where: str, path: str) -> str:
    return f"{where}: field '{path}'"


def _numbers(value: Any, count: int, at: str) -> List[float]:
    ok = isinstance(value, (list, tuple)) and len(value) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise DataError(f"{at} must be {count} finite numbers, got {value!r}")
    return [float(v) for v in value]


def _one_object(item: Any, where: str, path: str, cfg: GroundingConfig, images: int) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{_at(where, path)} must be an object with a label and a bbox or point, got "
                        f"{type(item).__name__}")
    label = item.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{_at(where, path + '.label')} must be text, got {type(label).__name__}")
    if ("bbox" in item) == ("point" in item):
        raise DataError(f"{_at(where, path)} needs exactly one of bbox ([x1, y1, x2, y2]) and point ([x, y])")
    key = "bbox" if "bbox" in item else "point"
    at = _at(where, f"{path}.{key}")
    values = _numbers(item[key], 4 if key == "bbox" else 2, at)
    if key == "bbox" and (values[2] <= values[0] or values[3] <= values[1]):
        problem = "inverted" if values[2] < values[0] or values[3] < values[1] else "empty (no area)"
        raise DataError(f"{at} {item[key]} is {problem}: it must be [x1, y1, x2, y2] with x2 > x1, y2 > y1")
    _check_frame(values, cfg.coords, at)
    image = item.get("image", 0)
    if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < max(images, 1):
        raise DataError(f"{_at(where, path + '.image')} must be the index of one of the row's {images} images, "
                        f"got {image!r}")
    return {"label": label, "values": values, "image": image}


def _check_frame(values: List[float], declared: BoxCoords, where: str) -> None:
    """Numbers that cannot be in the declared frame (what is checkable before the image is opened)."""
    if min(values) < 0:
        raise DataError(f"{where} {values} has a negative coordinate")
    if declared == BoxCoords.relative and max(values) > 1:
        raise DataError(f"{where} {values} has values over 1, but data.grounding.coords=relative (fractions of the "
                        f"image); for pixels of the original image set data.grounding.coords=pixels")
    if declared == BoxCoords.pixels and max(values) <= 1 and any(0 < v < 1 for v in values):
        raise DataError(f"{where} {values} looks relative (all values <= 1), but data.grounding.coords=pixels; set "
                        f"data.grounding.coords=relative if they are fractions of the image")


def _as_list(raw: Any, where: str) -> List[Any]:
    if isinstance(raw, str):  # a CSV column or a dataset string holding JSON
        try:
            raw = json.loads(raw)
        except ValueError as err:
            raise DataError(f"{where} is not JSON ({err})") from None
    if isinstance(raw, dict) and "bbox" in raw:  # ms-swift's {"ref": [labels], "bbox": [[x1, y1, x2, y2], ...]}
        labels = raw.get("ref") or [None] * len(raw["bbox"])
        raw = [{"label": label, "bbox": box} for label, box in zip(labels, raw["bbox"])]
    if not isinstance(raw, list):
        raise DataError(f"{where} must be a list of objects, got {type(raw).__name__}")
    return raw


def read_objects(record: Any, where: str, cfg: GroundingConfig, images: int) -> Optional[List[dict]]:
    """The record's objects, checked ({"label", "values", "image"} each), or None when it has none."""
    if not isinstance(record, dict) or record.get(cfg.field) is None:
        return None
    items = _as_list(record[cfg.field], _at(where, cfg.field))
    return [_one_object(item, where, f"{cfg.field}[{i}]", cfg, images) for i, item in enumerate(items)]


def _marks(objects: List[dict], sizes: Sizes, cfg: GroundingConfig, convention: BoxConvention,
           where: str) -> List[Mark]:
    marks = []
    for index, obj in enumerate(objects):
        original, shown = sizes[obj["image"]]
        pixels = coords.dataset_to_original(obj["values"], cfg.coords.value, original, shown, convention)
        if any(v > original[i % 2] * 1.001 for i, v in enumerate(pixels)):
            raise DataError(f"{_at(where, f'{cfg.field}[{index}]')} {obj['values']} lies outside its image of "
                            f"{original[0]}x{original[1]} (data.grounding.coords={cfg.coords.value})")
        marks.append(Mark(obj["label"], coords.to_family(pixels, original, shown, convention)))
    return marks


def objects_text(objects: List[dict], sizes: Sizes, convention: BoxConvention, cfg: GroundingConfig,
                 where: str) -> str:
    """The objects as the answer text the trained family writes (or data.grounding.text's form)."""
    if cfg.text != BoxText.family:
        convention = dataclasses.replace(convention, text=cfg.text.value)
    return write(_marks(objects, sizes, convention=convention, cfg=cfg, where=where), convention)


def write_objects(row: dict, sizes: Sizes, convention: BoxConvention, cfg: GroundingConfig) -> List[dict]:
    """The row's messages with its objects written where a text says <objects>; the messages unchanged when the row
    has no objects. Objects that no text asks for are an error, not silently left out of training."""
    objects, where = row.get("objects"), row.get("source", "?")
    if not objects:
        return row["messages"]
    text = objects_text(objects, sizes, convention, cfg, where)
    messages = [dict(m, content=[dict(i, text=i["text"].replace(PLACEHOLDER, text))
                                 if i["type"] == "text" and i["text"] and PLACEHOLDER in i["text"] else i
                                 for i in m["content"]]) for m in row["messages"]]
    if messages == row["messages"]:
        raise DataError(f"{where}: field '{cfg.field}' holds {len(objects)} objects, but no message says "
                        f"{PLACEHOLDER} where to write them (e.g. the answer \"{PLACEHOLDER}\")")
    return messages


def box_patches(row: dict, sizes: Sizes, convention: BoxConvention, cfg: GroundingConfig,
                patch_size: int) -> List[float]:
    """The smaller side of each of the row's boxes in patches of the image as shown (data-check's box sizes: a box
    under one patch is one the model cannot tell from its neighbours)."""
    sides = []
    for obj in row.get("objects") or []:
        if len(obj["values"]) != 4:
            continue
        original, shown = sizes[obj["image"]]
        x1, y1, x2, y2 = coords.dataset_to_original(obj["values"], cfg.coords.value, original, shown, convention)
        sides.append(min((x2 - x1) * shown[0] / original[0], (y2 - y1) * shown[1] / original[1]) / patch_size)
    return sides


def marks_in_image(text: str, image: Any, collator) -> List[Mark]:
    """The boxes and points of an answer about `image` (a row's image reference), in that image's own pixels: parsed
    in either text form and mapped from the family's convention for the size `collator` shows the image at (infer,
    chat and the galleries draw them)."""
    marks = parse(text)
    if not marks:
        return []
    (original, shown), = collator.shown_sizes(collator.load_visuals({"images": [image], "videos": [],
                                                                      "source": "answer"}, resize=False))
    return coords.marks_to_original(marks, original, shown, collator.family.box_convention)
