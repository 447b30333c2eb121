"""Open an image reference (path, file:// URI, data URI, base64, bytes, PIL) with errors that name the row."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from qwenvl_ft.errors import DataError


def _describe(ref: Any) -> str:
    if isinstance(ref, str):
        return ref if len(ref) <= 80 else ref[:40] + "..." + f" ({len(ref)} characters)"
    return type(ref).__name__


def _decode(raw: bytes, where: str, ref: Any) -> Image.Image:
    if not raw:
        raise DataError(f"{where}: image {_describe(ref)} is an empty (0-byte) file")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()  # decode now: a truncated file fails here, not in the middle of a batch
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: image {_describe(ref)} cannot be decoded ({err})") from None
    return image


def open_image(ref: Any, where: str) -> Image.Image:
    """The referenced image, fully decoded, in RGB."""
    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, dict):  # datasets.Image(decode=False)
        if ref.get("bytes"):
            image = _decode(ref["bytes"], where, ref.get("path") or "bytes")
        elif ref.get("path"):
            return open_image(ref["path"], where)
        else:
            raise DataError(f"{where}: image entry has neither bytes nor path")
    elif isinstance(ref, (bytes, bytearray)):
        image = _decode(bytes(ref), where, "bytes")
    elif isinstance(ref, str):
        if ref.startswith(("http://", "https://")):
            raise DataError(f"{where}: image {_describe(ref)} is a URL; remote images are not fetched")
        if ref.startswith("data:"):
            try:
                raw = base64.b64decode(ref.split("base64,", 1)[1], validate=False)
            except (IndexError, binascii.Error) as err:
                raise DataError(f"{where}: image data URI is not valid base64 ({err})") from None
            image = _decode(raw, where, ref)
        else:
            path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raw = _maybe_base64(ref)
                if raw is None:
                    raise DataError(f"{where}: image file {path} not found") from None
            except OSError as err:
                raise DataError(f"{where}: image file {path} cannot be read ({err.strerror})") from None
            image = _decode(raw, where, ref)
    else:
        raise DataError(f"{where}: unsupported image value of type {type(ref).__name__}")
    return to_rgb(image)


def _maybe_base64(text: str):
    if len(text) < 64:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode: transparency is composited on white, 16-bit and CMYK are converted, not rejected."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting PIL clip everything above 255.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype("uint8"), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return image.convert("RGB")
