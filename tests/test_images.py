"""Tests for policy_engine.images: every fixture is generated here with Pillow (or by hand, for
crafted PNG headers), nothing is mocked."""

from __future__ import annotations

import base64
import io
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, features

from policy_engine.errors import ImageError
from policy_engine.images import (
    DEFAULT_MAX_PIXELS,
    LoadedImage,
    describe_source,
    load_image,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# --- helpers ---------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Incompressible RGB content, so that cutting the encoded bytes loses pixel data."""
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def crafted_png(width: int, height: int, *, complete: bool = True) -> bytes:
    """A 1-bit greyscale PNG, all black, built without ever holding its pixels in memory.

    With `complete`, the IDAT is a valid stream for every row (tiny: zeros compress ~1000:1);
    otherwise it is cut short, so decoding the pixels fails.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then packed bits
    compressor = zlib.compressobj(9)
    rows = height if complete else 2
    idat = b"".join(compressor.compress(row) for _ in range(rows))
    idat += compressor.flush() if complete else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_image_error(source: object, *fragments: str, **kwargs: int) -> ImageError:
    """load_image(source) raises ImageError, one line, naming the source and each fragment."""
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert describe_source(source) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return info.value


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    return write(tmp_path / "red.png", encode(Image.new("RGB", (4, 3), RED), "PNG"))


# --- input kinds -----------------------------------------------------------------------------


def test_str_path(png_file: Path) -> None:
    loaded = load_image(str(png_file))
    assert isinstance(loaded, LoadedImage)
    assert loaded.source == str(png_file)
    assert loaded.format == "PNG"
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (4, 3)
    assert loaded.image.getpixel((0, 0)) == RED


def test_pathlike_path(png_file: Path) -> None:
    loaded = load_image(png_file)
    assert loaded.source == str(png_file)
    assert loaded.image.getpixel((3, 2)) == RED


def test_bytes() -> None:
    data = encode(Image.new("RGB", (5, 5), BLUE), "JPEG", quality=95)
    loaded = load_image(data)
    assert loaded.source == f"<bytes {len(data)}>"
    assert loaded.format == "JPEG"
    red, green, blue = loaded.image.getpixel((2, 2))  # type: ignore[misc]
    assert blue > 240 and red < 15 and green < 15


def test_data_url() -> None:
    data = encode(Image.new("RGB", (3, 3), RED), "PNG")
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    loaded = load_image(url)
    assert loaded.source == f"<data URL image/png {len(data)} bytes>"
    assert loaded.format == "PNG"
    assert loaded.image.getpixel((1, 1)) == RED


def test_data_url_is_lenient_about_case_whitespace_and_padding() -> None:
    data = encode(Image.new("RGB", (3, 3), RED), "PNG")
    text = base64.b64encode(data).decode("ascii").rstrip("=")
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))
    loaded = load_image("DATA:Image/PNG;BASE64," + wrapped)
    assert loaded.image.getpixel((0, 0)) == RED
    assert loaded.source == f"<data URL image/png {len(data)} bytes>"


def test_pil_image_is_copied_not_modified() -> None:
    original = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    loaded = load_image(original)
    assert loaded.source == "<PIL image>"
    assert loaded.format is None
    assert loaded.image is not original
    assert loaded.image.getpixel((0, 0)) == WHITE
    assert original.mode == "RGBA"
    assert original.getpixel((0, 0)) == (0, 0, 0, 0)


def test_pil_rgb_image_is_copied() -> None:
    original = Image.new("RGB", (2, 2), RED)
    loaded = load_image(original)
    assert loaded.image is not original
    loaded.image.putpixel((0, 0), BLUE)
    assert original.getpixel((0, 0)) == RED


def test_lazily_opened_pil_image_keeps_its_format(png_file: Path) -> None:
    with Image.open(png_file) as opened:
        loaded = load_image(opened)
    assert loaded.format == "PNG"
    assert loaded.image.getpixel((0, 0)) == RED  # usable after the original is closed


def test_unsupported_source_type() -> None:
    assert_image_error(12345, "unsupported source type int")
    assert_image_error(None, "unsupported source type NoneType")


def test_max_pixels_must_be_positive(png_file: Path) -> None:
    with pytest.raises(ValueError):
        load_image(png_file, max_pixels=0)


# --- describe_source -------------------------------------------------------------------------


def test_describe_source() -> None:
    assert describe_source(b"abcd") == "<bytes 4>"
    assert describe_source(Image.new("RGB", (1, 1))) == "<PIL image>"
    assert describe_source("/some/where.png") == "/some/where.png"
    assert describe_source(Path("rel/x.jpg")) == str(Path("rel/x.jpg"))
    assert describe_source("data:image/jpeg;base64,AAAA") == "<data URL image/jpeg 3 bytes>"
    assert describe_source("data:image/png;base64") == "<data URL (malformed)>"
    assert describe_source(3.5) == "<float>"


def test_describe_source_is_short_and_printable() -> None:
    assert describe_source("bad\nname\x00.png") == "bad\\nname\\x00.png"
    long = describe_source("x" * 10_000)
    assert len(long) <= 200 and long.endswith("...")
    big_url = "data:image/png;base64," + "A" * 4_000_000
    assert describe_source(big_url) == "<data URL image/png 3000000 bytes>"


# --- mode conversion -------------------------------------------------------------------------


def test_rgb_stays() -> None:
    image = Image.new("RGB", (2, 2), (12, 34, 56))
    assert load_image(image).image.getpixel((1, 1)) == (12, 34, 56)


def test_rgba_composited_on_white() -> None:
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    rgb = load_image(encode(image, "PNG")).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE  # fully transparent black becomes white
    assert rgb.getpixel((1, 0)) == RED  # opaque stays
    assert all(126 <= c <= 128 for c in rgb.getpixel((2, 0)))  # type: ignore[union-attr]


def test_la_composited_on_white() -> None:
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (40, 255))
    rgb = load_image(encode(image, "PNG")).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 0)) == (40, 40, 40)


def test_palette_with_transparency_composited_on_white() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, *BLUE] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = load_image(data).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 0)) == BLUE


def test_palette_without_transparency() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    rgb = load_image(encode(image, "GIF")).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == RED
    assert rgb.getpixel((1, 0)) == BLUE


def test_rgb_colour_key_transparency_becomes_white() -> None:
    image = Image.new("RGB", (2, 1), (10, 20, 30))
    image.putpixel((1, 0), RED)
    rgb = load_image(encode(image, "PNG", transparency=(10, 20, 30))).image
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 0)) == RED


def test_cmyk() -> None:
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))  # pure cyan
    rgb = load_image(encode(image, "TIFF")).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 0)) == (0, 255, 255)


def test_greyscale_and_bilevel() -> None:
    grey = load_image(Image.new("L", (1, 1), 77)).image
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    rgb = load_image(encode(bilevel, "PNG")).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((1, 0)) == WHITE


def test_16bit_png_scaled_by_range() -> None:
    image = Image.new("I;16", (3, 1), 1000)
    image.putpixel((1, 0), 3000)
    image.putpixel((2, 0), 2000)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    rgb = load_image(data).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)  # minimum becomes 0
    assert rgb.getpixel((1, 0)) == WHITE  # 16-bit maximum becomes 255
    assert rgb.getpixel((2, 0)) == (128, 128, 128)  # halfway, rounded


def test_16bit_full_range_max_is_255() -> None:
    image = Image.new("I;16", (2, 1), 0)
    image.putpixel((1, 0), 65535)
    rgb = load_image(image).image
    assert rgb.getpixel((1, 0)) == WHITE
    assert rgb.getpixel((0, 0)) == (0, 0, 0)


def test_constant_16bit_uses_nominal_range() -> None:
    assert load_image(Image.new("I;16", (2, 2), 65535)).image.getpixel((0, 0)) == WHITE
    assert load_image(Image.new("I;16", (2, 2), 0)).image.getpixel((0, 0)) == (0, 0, 0)


def test_32bit_integer_with_negative_values() -> None:
    image = Image.new("I", (3, 1), -100_000)
    image.putpixel((1, 0), 100_000)
    image.putpixel((2, 0), 0)
    rgb = load_image(image).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((1, 0)) == WHITE
    assert rgb.getpixel((2, 0)) == (128, 128, 128)


def test_float_scaled_by_range() -> None:
    image = Image.new("F", (3, 1), 0.25)
    image.putpixel((1, 0), 0.75)
    image.putpixel((2, 0), 0.5)
    rgb = load_image(encode(image, "TIFF")).image
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((1, 0)) == WHITE
    assert rgb.getpixel((2, 0)) == (128, 128, 128)


# --- orientation and frames ------------------------------------------------------------------


def test_exif_orientation_applied() -> None:
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    rgb = load_image(data).image
    assert rgb.size == (20, 40)
    top = rgb.getpixel((10, 5))
    bottom = rgb.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # type: ignore[index]  # the left (red) half is on top
    assert bottom[2] > 200 and bottom[0] < 50  # type: ignore[index]


def test_exif_orientation_applied_to_pil_input() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (40, 20), RED), "JPEG", exif=exif)
    with Image.open(io.BytesIO(data)) as opened:
        assert load_image(opened).image.size == (20, 40)


def two_frames() -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]


def assert_first_frame(data: bytes, fmt: str) -> None:
    with Image.open(io.BytesIO(data)) as check:  # the file really has a blue second frame
        assert check.format == fmt
        assert getattr(check, "n_frames", 1) == 2
        check.seek(1)
        assert check.convert("RGB").getpixel((4, 4)) == BLUE
    loaded = load_image(data)
    assert loaded.format == fmt
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((4, 4)) == RED
    assert loaded.image.getpixel((4, 4)) != BLUE


def test_animated_gif_first_frame() -> None:
    first, second = two_frames()
    assert_first_frame(encode(first, "GIF", save_all=True, append_images=[second]), "GIF")


def test_animated_png_first_frame() -> None:
    first, second = two_frames()
    assert_first_frame(encode(first, "PNG", save_all=True, append_images=[second]), "PNG")


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_first_frame() -> None:
    first, second = two_frames()
    data = encode(first, "WEBP", save_all=True, append_images=[second], lossless=True)
    assert_first_frame(data, "WEBP")


# --- pixel limit -----------------------------------------------------------------------------


def test_pixel_limit_small_image() -> None:
    data = encode(Image.new("RGB", (10, 10), RED), "PNG")
    assert load_image(data, max_pixels=100).image.size == (10, 10)
    assert_image_error(data, "too many pixels", "10x10", "limit 99", max_pixels=99)


def test_pixel_limit_pil_image() -> None:
    image = Image.new("1", (100, 100))
    assert_image_error(image, "too many pixels", max_pixels=9_999)


def test_pixel_limit_checked_before_decoding() -> None:
    # Header says 1000x1000 but the pixel data is cut short: decoding it would fail as
    # "truncated", so "too many pixels" proves the header was checked first.
    data = crafted_png(1000, 1000, complete=False)
    assert_image_error(data, "too many pixels", max_pixels=999_999)
    assert_image_error(data, "truncated", max_pixels=1_000_000)


def test_default_limit_refuses_bomb_png(tmp_path: Path) -> None:
    # 9000x8000 = 72 Mpx: above DEFAULT_MAX_PIXELS, below Pillow's own warning threshold.
    assert DEFAULT_MAX_PIXELS < 9000 * 8000
    assert Image.MAX_IMAGE_PIXELS > 9000 * 8000  # type: ignore[operator]
    path = write(tmp_path / "bomb.png", crafted_png(9000, 8000))
    assert path.stat().st_size < 50_000
    assert_image_error(path, "too many pixels", "9000x8000")


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_pillow_bomb_guard_becomes_image_error(tmp_path: Path, side: int) -> None:
    # max_pixels far above: only Pillow's guard can refuse. 10000^2 is over MAX_IMAGE_PIXELS
    # (Pillow warns; we turn it into an error), 20000^2 over twice that (Pillow raises).
    limit_before = Image.MAX_IMAGE_PIXELS
    path = write(tmp_path / "bomb.png", crafted_png(side, side))
    assert path.stat().st_size < 100_000
    assert_image_error(path, "too many pixels", max_pixels=10**12)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # never changed globally


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bytes(fmt: str) -> None:
    data = encode(noise(), fmt)
    assert load_image(data).image.size == (64, 64)  # the whole file is fine
    assert_image_error(data[: len(data) // 2], "truncated")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(), fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    assert_image_error(path, "truncated")
    assert_image_error(str(path), "truncated")


def test_corrupt_header() -> None:
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: the CRC no longer matches
    assert_image_error(bytes(data), "cannot load image")


def test_empty_file(tmp_path: Path) -> None:
    assert_image_error(write(tmp_path / "empty.png", b""), "empty file")


def test_empty_bytes() -> None:
    assert_image_error(b"", "empty")


def test_text_file(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.png", b"just some text, not an image\n" * 10)
    assert_image_error(path, "not a recognised image")
    assert_image_error(path.read_bytes(), "not a recognised image")


def test_eps_is_refused(tmp_path: Path) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    path = write(tmp_path / "x.eps", eps)
    with Image.open(path) as opened:  # Pillow alone would accept it (and run Ghostscript)
        assert opened.format == "EPS"
    assert_image_error(path, "not a recognised image")


def test_directory(tmp_path: Path) -> None:
    assert_image_error(tmp_path, "directory")
    assert_image_error(str(tmp_path), "directory")


def test_missing_path(tmp_path: Path) -> None:
    assert_image_error(tmp_path / "nope.png", "not found")
    assert_image_error(str(tmp_path / "nope.png"), "not found")
    assert_image_error(str(tmp_path / "nope" / "deeper.png"), "not found")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_image_error(fifo, "not a regular file")  # and does not block


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions, non-root"
)
def test_permission_denied(png_file: Path) -> None:
    png_file.chmod(0)
    try:
        assert_image_error(png_file, "permission denied")
    finally:
        png_file.chmod(0o644)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64", "malformed data URL"),
        ("data:text/plain;base64,aGVsbG8=", "'text/plain', not image/*"),
        ("data:;base64,aGVsbG8=", "missing, not image/*"),
        ("data:image/svg+xml,<svg></svg>", "not base64"),
        ("data:image/png;base64,not*base64!", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not a recognised image"),
    ],
)
def test_bad_data_url(url: str, fragment: str) -> None:
    assert_image_error(url, fragment)


# --- re-encoding -----------------------------------------------------------------------------


def test_to_bytes_round_trip() -> None:
    image = noise((16, 8))
    loaded = load_image(image)
    png = loaded.to_bytes()
    assert png.startswith(b"\x89PNG")
    again = load_image(png)
    assert again.format == "PNG"
    assert again.image.tobytes() == image.tobytes()
    jpeg = loaded.to_bytes("jpg")
    assert load_image(jpeg).format == "JPEG"


def test_to_data_url_round_trip() -> None:
    image = noise((8, 8))
    loaded = load_image(image)
    url = loaded.to_data_url()
    assert url.startswith("data:image/png;base64,")
    again = load_image(url)
    assert again.source == f"<data URL image/png {len(loaded.to_bytes())} bytes>"
    assert again.image.tobytes() == image.tobytes()
    assert loaded.to_data_url("JPEG").startswith("data:image/jpeg;base64,")


def test_to_bytes_unknown_format() -> None:
    loaded = load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(ValueError):
        loaded.to_bytes("NOT-A-FORMAT")
