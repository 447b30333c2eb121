"""Tier 1: every image source opens, every pixel mode converts to the right RGB, and every broken image is
refused with one message naming the row and the reason."""

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from qwenvl_ft.data.images import ImageLimits, load_image, open_image
from qwenvl_ft.errors import DataError

from data_helpers import write_image

WHERE = "train.jsonl:line 3: images[0]"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _refused(ref, match, limits=ImageLimits()):
    with pytest.raises(DataError, match=match) as info:
        open_image(ref, WHERE, limits)
    assert str(info.value).startswith(WHERE), "the message must name the row and field first"
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# sources


def test_every_local_source_gives_the_same_pixels(tmp_path):
    original = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    original.save(path)
    raw = path.read_bytes()
    encoded = base64.b64encode(raw).decode()
    sources = [str(path), f"file://{path}", encoded, f"data:image/png;base64,{encoded}", raw, original,
               {"bytes": raw, "path": None}, {"bytes": None, "path": str(path)}]
    for ref in sources:
        image = open_image(ref, WHERE)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(original)), type(ref)


def test_missing_zero_byte_non_image_and_empty_references(tmp_path):
    _refused(str(tmp_path / "nope.jpg"), r"image file .*nope\.jpg not found")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _refused(str(tmp_path / "empty.jpg"), r"empty \(0-byte\) file")
    (tmp_path / "notes.jpg").write_text("these are not pixels")
    _refused(str(tmp_path / "notes.jpg"), r"cannot be decoded \(UnidentifiedImageError")
    _refused("", "empty string")
    _refused(3.5, "unsupported image value of type float")
    _refused(str(tmp_path), "is a folder")


def test_truncated_jpeg_and_corrupt_png_fail_at_decode_not_later(tmp_path):
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "full.jpg", quality=90)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    _refused(str(tmp_path / "cut.jpg"), r"cut\.jpg cannot be decoded \(OSError")
    png = bytearray(_png_bytes(noisy))
    png[60:90] = bytes(30)  # inside the image data: a CRC / zlib error
    _refused(bytes(png), "cannot be decoded")


def test_modes_convert_to_the_right_rgb_values():
    grey = Image.new("L", (4, 4), 77)
    assert open_image(grey, WHERE).getpixel((0, 0)) == (77, 77, 77)
    half_transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white background
    assert open_image(half_transparent, WHERE).getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert open_image(opaque, WHERE).getpixel((0, 0)) == (10, 20, 30)
    grey_alpha = Image.new("LA", (4, 4), (0, 128))  # black at half opacity on white -> mid grey
    assert abs(open_image(grey_alpha, WHERE).getpixel((0, 0))[0] - 127) <= 1
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 200, 0] + [0] * 765)
    assert open_image(palette, WHERE).getpixel((0, 0)) == (0, 200, 0)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    assert open_image(transparent_palette, WHERE).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert open_image(cmyk, WHERE).getpixel((0, 0)) == (255, 0, 0)
    assert open_image(Image.new("1", (4, 4), 1), WHERE).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # 16-bit PNG (mode I;16 or I, depending on Pillow)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = open_image(str(tmp_path / "deep.png"), WHERE)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]  # PIL's convert gives 255 for all but 0


def test_cmyk_jpeg_file_converts(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)
    r, g, b = open_image(str(tmp_path / "print.jpg"), WHERE).getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees
    image.save(tmp_path / "phone.jpg", exif=exif)
    opened, size = load_image(str(tmp_path / "phone.jpg"), WHERE)
    assert opened.size == (20, 40) and size == (20, 40)


def test_large_jpeg_decodes_at_reduced_scale_but_reports_its_size(tmp_path):
    Image.new("RGB", (800, 600), (0, 0, 255)).save(tmp_path / "big.jpg")
    image, size = load_image(str(tmp_path / "big.jpg"), WHERE, target=lambda w, h: (196, 140))
    assert size == (800, 600)
    assert image.size == (200, 150)  # 1/4 scale: the smallest not below the target
    image, _ = load_image(str(tmp_path / "big.jpg"), WHERE, target=lambda w, h: (700, 500))
    assert image.size == (800, 600)  # less than 2x smaller: full decode


def test_decompression_bomb_guard(tmp_path):
    write_image(tmp_path / "wide.png", size=(200, 100))
    message = _refused(str(tmp_path / "wide.png"), "decompression-bomb guard",
                       ImageLimits(max_image_pixels=15_000))
    assert "200x100 = 20,000 pixels" in message and "data.max_image_pixels=15,000" in message
    # beyond twice the limit PIL itself refuses while reading the header; the message still names the setting
    _refused(str(tmp_path / "wide.png"), "over data.max_image_pixels=5,000", ImageLimits(max_image_pixels=5_000))
    _refused(Image.new("RGB", (200, 100)), "decompression-bomb guard", ImageLimits(max_image_pixels=15_000))
    assert open_image(str(tmp_path / "wide.png"), WHERE, ImageLimits(max_image_pixels=20_000)).size == (200, 100)


# ----------------------------------------------------------------------------------------------------------------
# remote images: refused unless enabled; then bounded in time and size (served from 127.0.0.1 only)


@pytest.fixture
def local_server(tmp_path):
    write_image(tmp_path / "remote.png", size=(30, 20), colour=(1, 2, 3))
    (tmp_path / "large.bin").write_bytes(bytes(5000))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_images_are_refused_by_default():
    message = _refused("https://example.com/cat.jpg", "remote images are off")
    assert "data.allow_remote_images=true" in message


def test_remote_images_download_when_enabled_with_a_size_cap(local_server):
    limits = ImageLimits(allow_remote=True, remote_timeout_s=5, remote_max_bytes=4000)
    image = open_image(f"{local_server}/remote.png", WHERE, limits)
    assert image.size == (30, 20) and image.getpixel((0, 0)) == (1, 2, 3)
    _refused(f"{local_server}/large.bin", "5,000 bytes, over data.remote_max_bytes=4,000", limits)
    _refused(f"{local_server}/absent.png", "answered HTTP 404", limits)
