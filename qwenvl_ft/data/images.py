"""Open an image reference (path, file:// URI, data URI, base64, bytes, PIL, opt-in http(s)) with errors that name
the row.

Why our own and not `qwen_vl_utils.fetch_image` or transformers' `load_image`: both raise bare library errors
(no row, no field), download any URL with no size cap, leave the decompression-bomb limit at PIL's global default,
and do not check PNG checksums (corrupt data loads as noise); `fetch_image` composites only RGBA (16-bit greyscale
comes out clipped to white) and ignores EXIF orientation; and both decode a large JPEG at full size even when the
model will see a quarter of it. How big an image becomes is the collator's business (qwenvl_ft/data/collate.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

from qwenvl_ft.errors import DataError

# (width, height) as stored -> (width, height) the model will see; lets a JPEG decode at a reduced scale.
TargetSize = Callable[[int, int], Tuple[int, int]]


@dataclass(frozen=True)
class ImageLimits:
    """What opening an image may cost: pixels (decompression bombs) and, for URLs, network and bytes."""

    max_image_pixels: int = 100_000_000
    allow_remote: bool = False
    remote_timeout_s: float = 10.0
    remote_max_bytes: int = 20_000_000

    @classmethod
    def from_config(cls, cfg) -> "ImageLimits":
        return cls(cfg.max_image_pixels, cfg.allow_remote_images, cfg.remote_timeout_s, cfg.remote_max_bytes)


def describe(ref: Any) -> str:
    """An image reference as an error names it: a path or URL whole (its file name is what the user looks for),
    inline data (base64, a data: URI) by its first characters and length."""
    if isinstance(ref, str):
        inline = ref.startswith("data:") or len(ref) > 300
        return ref[:40] + "..." + f" ({len(ref)} characters)" if inline else ref
    if isinstance(ref, dict):
        return str(ref.get("path") or "bytes")
    return type(ref).__name__


# ----------------------------------------------------------------------------------------------------------------
# bytes from a reference


def fetch_url(url: str, where: str, limits: ImageLimits, kind: str = "image") -> bytes:
    """The body of an http(s) URL, refused unless enabled, bounded in time and size."""
    if not limits.allow_remote:
        raise DataError(f"{where}: {kind} {describe(url)} is a URL and remote images are off; set "
                        f"data.allow_remote_images=true to download them (data.remote_timeout_s, "
                        f"data.remote_max_bytes bound each download)")
    import urllib.error
    import urllib.request

    cap = limits.remote_max_bytes
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise DataError(f"{where}: {kind} URL {describe(url)} is {int(declared):,} bytes, over "
                                f"data.remote_max_bytes={cap:,}")
            raw = response.read(cap + 1)  # a server may not declare its length: read one byte past the cap
    except DataError:
        raise
    except urllib.error.HTTPError as err:
        raise DataError(f"{where}: {kind} URL {describe(url)} answered HTTP {err.code} ({err.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"{where}: {kind} URL {describe(url)} cannot be downloaded ({reason}; timeout "
                        f"{limits.remote_timeout_s:g} s)") from None
    if len(raw) > cap:
        raise DataError(f"{where}: {kind} URL {describe(url)} is over data.remote_max_bytes={cap:,} bytes")
    return raw


def _maybe_base64(text: str) -> Optional[bytes]:
    if len(text) < 64:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def read_source(ref: Any, where: str, limits: ImageLimits) -> Any:
    """Encoded bytes for every kind of reference, or the PIL image itself when the row holds one."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if ref.get("bytes"):
            return bytes(ref["bytes"])
        if ref.get("path"):
            return read_source(ref["path"], where, limits)
        raise DataError(f"{where}: image entry has neither bytes nor path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, str):
        raise DataError(f"{where}: unsupported image value of type {type(ref).__name__} (expected a path, URL, "
                        f"data URI, base64 string, bytes or PIL image)")
    if not ref.strip():
        raise DataError(f"{where}: image reference is an empty string")
    if ref.startswith(("http://", "https://")):
        return fetch_url(ref, where, limits)
    if ref.startswith("data:"):
        if "base64," not in ref:
            raise DataError(f"{where}: image data URI {describe(ref)} is not base64-encoded")
        try:
            return base64.b64decode(ref.split("base64,", 1)[1], validate=False)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"{where}: image data URI is not valid base64 ({err})") from None
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raw = _maybe_base64(ref)
        if raw is None:
            raise DataError(f"{where}: image file {path} not found") from None
        return raw
    except IsADirectoryError:
        raise DataError(f"{where}: image path {path} is a folder, not a file") from None
    except OSError as err:
        if len(ref) > 255:  # a long base64 string is "File name too long" as a path
            raw = _maybe_base64(ref)
            if raw is not None:
                return raw
        raise DataError(f"{where}: image file {describe(ref)} cannot be read ({err.strerror})") from None


# ----------------------------------------------------------------------------------------------------------------
# decoding


def _check_pixels(size: Tuple[int, int], where: str, ref: Any, limits: ImageLimits) -> None:
    pixels = size[0] * size[1]
    if pixels > limits.max_image_pixels:
        raise DataError(f"{where}: image {describe(ref)} is {size[0]}x{size[1]} = {pixels:,} pixels, over "
                        f"data.max_image_pixels={limits.max_image_pixels:,} (decompression-bomb guard; raise it if "
                        f"the image is genuine)")


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make a good image unusable
        return 1


def decode(raw: bytes, where: str, ref: Any, limits: ImageLimits,
           target: Optional[TargetSize] = None) -> Tuple[Image.Image, Tuple[int, int]]:
    """The fully decoded image (a truncated file fails here, not in the middle of a batch), EXIF orientation
    applied, and its (width, height) before any reduced-scale decoding.

    With `target`, a JPEG at least twice the size the model will see decodes at 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling, what `Image.thumbnail` uses): several times faster and never smaller than the target, so the final
    resize still only shrinks.
    """
    if not raw:
        raise DataError(f"{where}: image {describe(ref)} is an empty (0-byte) file")
    # PIL's own guard (checked in Image.open) at our limit, for this open only: other code keeps PIL's default.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limits.max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours below says it better
            image = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError as err:  # PIL refuses at twice its limit, before we see the size
        raise DataError(f"{where}: image {describe(ref)} is over data.max_image_pixels="
                        f"{limits.max_image_pixels:,} ({err}); raise it if the image is genuine") from None
    except Exception as err:  # PIL plugins raise many types (UnidentifiedImageError, SyntaxError, struct.error...)
        raise DataError(f"{where}: image {describe(ref)} cannot be decoded ({_reason(err)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    _check_pixels(image.size, where, ref, limits)
    try:
        if image.format == "PNG":  # decoding does not check chunk checksums; corrupt data would load as noise
            with Image.open(io.BytesIO(raw)) as checked:
                checked.verify()
        orientation = _exif_orientation(image)
        rotated = orientation in (5, 6, 7, 8)  # these swap width and height
        size = image.size[::-1] if rotated else image.size
        if target is not None and image.format == "JPEG":
            want_w, want_h = target(*size)
            image.draft(None, (want_h, want_w) if rotated else (want_w, want_h))
        image.load()
        if orientation != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image)
    except Exception as err:
        raise DataError(f"{where}: image {describe(ref)} cannot be decoded ({_reason(err)})") from None
    return image, size


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):  # its own text names a BytesIO object, not the file
        return "UnidentifiedImageError: not an image format Pillow can read"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_image(ref: Any, where: str, limits: ImageLimits = ImageLimits(),
               target: Optional[TargetSize] = None) -> Tuple[Image.Image, Tuple[int, int]]:
    """The referenced image, fully decoded, EXIF-oriented, in RGB, and its original (width, height)."""
    source = read_source(ref, where, limits)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, where, ref, limits)
        image, size = source, source.size
    else:
        image, size = decode(source, where, ref, limits, target)
    try:
        return to_rgb(image), size
    except (ValueError, OSError) as err:
        raise DataError(f"{where}: image {describe(ref)} of mode {image.mode} cannot be converted to RGB "
                        f"({_reason(err)})") from None


def open_image(ref: Any, where: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The referenced image, fully decoded, EXIF-oriented, in RGB."""
    return load_image(ref, where, limits)[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode: transparency is composited on white; 16-bit greyscale is scaled (65535 -> 255) rather
    than clipped, as PIL's convert would; CMYK, palette, greyscale and 1-bit are converted, not rejected."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N (16-bit) and I (32-bit, what 16-bit PNGs may open as)
        import numpy as np

        array = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype("uint8"), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.mode == "P" and "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
