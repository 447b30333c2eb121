"""Small datasets, images and videos written on the fly for the data-layer tests (tests/test_data_*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from qwenvl_ft.config.data import DataConfig, DataFormat, Overlength


def write_image(path: Path, size=(64, 48), colour=(200, 30, 30), mode="RGB", **save) -> Path:
    Image.new(mode, size, colour).save(path, **save)
    return path


def write_jsonl(path: Path, records: Iterable) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_video(path: Path, frames: int = 8, fps: int = 4, size=(64, 48)) -> Path:
    """An MPEG-4 clip (.mp4, or .mkv: no frame count in the header) whose frames are flat greys getting brighter,
    so that a sampled frame tells which one it was."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            array = np.full((height, width, 3), frame_level(i, frames), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_level(index: int, frames: int) -> int:
    return round(index * 240 / max(frames - 1, 1))


def llava(image=None, question="What is this?", answer="A red box.", placeholder="<image>\n", **extra) -> dict:
    record = {"conversations": [{"from": "human", "value": (placeholder if image is not None else "") + question},
                                {"from": "gpt", "value": answer}], **extra}
    if image is not None:
        record["image"] = image
    return record


def data_cfg(path=None, format="llava", **overrides) -> DataConfig:
    if "overlength" in overrides:
        overrides["overlength"] = Overlength(overrides["overlength"])
    return DataConfig(format=DataFormat(format), path=str(path) if path is not None else None, **overrides)


def user(text, images=0, videos=0) -> dict:
    return {"role": "user", "content": [{"type": "image", "text": None}] * images
            + [{"type": "video", "text": None}] * videos + [{"type": "text", "text": text}]}


def assistant(text) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}
