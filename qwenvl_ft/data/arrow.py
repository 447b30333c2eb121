"""Canonical rows as a datasets.Dataset (Arrow): one type per column, whatever mix of image references the rows
hold.
"""

from __future__ import annotations

from typing import Any, List

from qwenvl_ft.errors import DataError


def to_dataset(rows: List[dict]):
    """A datasets.Dataset of canonical rows (TRL's SFTTrainer detects vision data by the `images` column).

    Arrow needs one type per column: images are strings, or (when any is a PIL image, bytes or a datasets image)
    undecoded datasets images, whose `path` also carries strings; videos are {"path", "frames"} records.
    """
    import datasets

    text = datasets.Value("string")
    features = datasets.Features({
        "messages": datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})}),
        "images": datasets.List(_image_ref_feature(rows)),
        "videos": datasets.List({"path": text, "frames": datasets.List(text)}),
        "source": text,
        "objects": objects_feature(),
    })
    table = [{"messages": r["messages"], "images": r["images"], "source": r.get("source", "?"),
              "videos": [_video_record(v) for v in r.get("videos") or []], "objects": r.get("objects") or []}
             for r in rows]
    return datasets.Dataset.from_list(table, features=features)


def _video_record(ref: Any) -> dict:
    if isinstance(ref, dict):
        return {"path": ref.get("path"), "frames": ref.get("frames")}
    if isinstance(ref, (list, tuple)):
        if not all(isinstance(f, str) for f in ref):
            raise DataError("video frames must be paths, URLs or data URIs to be stored in a dataset")
        return {"path": None, "frames": list(ref)}
    return {"path": ref, "frames": None}


def _image_ref_feature(rows: List[dict]):
    import datasets

    if any(not isinstance(image, str) for r in rows for image in r["images"]):
        return datasets.Image(decode=False)
    return datasets.Value("string")


def objects_feature():
    """A row's objects (data/grounding.py): label, the dataset's numbers (4: a box, 2: a point), image index."""
    import datasets

    return datasets.List({"label": datasets.Value("string"), "values": datasets.List(datasets.Value("float64")),
                          "image": datasets.Value("int32")})
