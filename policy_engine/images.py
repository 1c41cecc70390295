"""Safe image decoding: one entry point, `load_image`, that turns any accepted source into an
RGB, fully decoded, upright `PIL.Image.Image`, or raises `ImageError` with one line naming the
source.

Sources: a filesystem path (`str` or `os.PathLike`), a `data:image/...;base64,...` URL (`str`),
encoded image bytes, or a `PIL.Image.Image`.

Safety: the pixel count is checked from the header before any pixel is decoded; Pillow's own
decompression-bomb warning is turned into an error (locally, never by changing
`Image.MAX_IMAGE_PIXELS`); truncated images fail instead of loading partially; EPS (which Pillow
decodes by running Ghostscript) is never opened.

Only the standard library and Pillow are imported, so importing this module is cheap.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from policy_engine.errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "LoadedImage",
    "describe_source",
    "load_image",
]

DEFAULT_MAX_PIXELS = 64_000_000
"""Default limit on width * height, a guard against decompression bombs."""

ImageSource = str | os.PathLike[str] | bytes | Image.Image
"""What `load_image` accepts: a path or data URL, a path object, encoded bytes, or a PIL image."""

# Formats Pillow may open but we never will: EPS is rendered by an external Ghostscript process.
_REFUSED_FORMATS = frozenset({"EPS"})
_MAX_DESCRIPTION = 200  # characters of a path kept in a description
_MAX_MEDIA_TYPE = 60  # characters of a data URL's media type kept in a description
_MAX_DETAIL = 200  # characters of an underlying exception's message kept in an error
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image, ready for a model.

    `image` is always mode "RGB", fully loaded (no open file behind it), with EXIF orientation
    applied and transparency composited onto white; it holds a single frame. Treat it as
    read-only: it may be shared. `source` is the short printable description of where it came
    from (see `describe_source`); `format` is the original encoding ("PNG", "JPEG", ...), or
    None when unknown (e.g. a PIL image created in memory).
    """

    image: Image.Image
    source: str
    format: str | None

    def to_bytes(self, fmt: str = "PNG") -> bytes:
        """Re-encode the image in format `fmt` (a Pillow format name, e.g. "PNG", "JPEG",
        "WEBP"; case-insensitive, "JPG" accepted).

        Raises ValueError for a format Pillow cannot write, and ImageError if encoding this
        image fails (e.g. dimensions beyond the format's limits).
        """
        name = _writable_format(fmt)
        buffer = io.BytesIO()
        try:
            self.image.save(buffer, format=name)
        except Exception as exc:  # Pillow encoders raise OSError, ValueError, struct.error...
            raise ImageError(
                f"cannot encode image {self.source} as {name}: {_detail(exc)}"
            ) from exc
        return buffer.getvalue()

    def to_data_url(self, fmt: str = "PNG") -> str:
        """Re-encode as a `data:<mime>;base64,<payload>` URL, e.g. "data:image/png;base64,...".

        Same format rules and errors as `to_bytes`.
        """
        name = _writable_format(fmt)
        mime = Image.MIME.get(name, f"image/{name.lower()}")
        payload = base64.b64encode(self.to_bytes(name)).decode("ascii")
        return f"data:{mime};base64,{payload}"


def describe_source(source: object) -> str:
    """A short printable description of an image source, computed without decoding the image.

    A path gives the path itself (non-printable characters escaped, long paths shortened);
    bytes give "<bytes N>"; a PIL image gives "<PIL image>"; a data URL gives
    "<data URL image/png N bytes>" where N is the size of the encoded image it carries (for a
    malformed data URL, "<data URL (malformed)>"); anything else gives "<TypeName>". This is the
    `source` of the `LoadedImage` and the name used in every `ImageError` message.
    """
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<bytes {memoryview(source).nbytes}>"
    if isinstance(source, str):
        if _is_data_url(source):
            return _describe_data_url(source)
        return _printable(source)
    if isinstance(source, os.PathLike):
        try:
            return _printable(os.fsdecode(source))
        except TypeError:  # a PathLike whose __fspath__ returns neither str nor bytes
            pass
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode `source` into a `LoadedImage` (RGB, fully loaded, upright, first frame).

    - `str`: a `data:image/<type>;base64,<payload>` URL (the "data:" prefix is matched
      case-insensitively), otherwise a filesystem path. `os.PathLike`: a path.
    - `bytes`: an encoded image (PNG, JPEG, GIF, WebP, ...).
    - `PIL.Image.Image`: copied, never modified (it is loaded if it was opened lazily); its
      current frame is used.

    Mode conversion: RGBA/LA/PA and images with transparency (palette or colour key) are
    composited onto white; CMYK, L, 1, palette and other colour modes are converted to RGB;
    16-bit integer (I;16*), 32-bit integer (I) and float (F) images are scaled linearly from
    their actual min..max to 0..255 (a constant image uses 0..65535 for I;16*, and is clipped to
    0..255 for I and F) and then made RGB.

    `max_pixels` bounds width * height, checked from the header before pixels are decoded.
    Pillow's own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, left unchanged) also
    applies, so a `max_pixels` above it does not raise the ceiling.

    Raises ImageError (one line, containing `describe_source(source)`) for every problem with
    the source: unsupported source type, missing file, directory or other non-regular file,
    permission denied, empty data, not an image, corrupt or truncated data, too many pixels,
    malformed or non-image data URL. Raises ValueError if `max_pixels` is not positive.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    description = describe_source(source)

    if isinstance(source, Image.Image):
        return LoadedImage(
            image=_finish(source, description, max_pixels),
            source=description,
            format=source.format,
        )
    if isinstance(source, bytes):
        return _load_bytes(source, description, max_pixels)
    if isinstance(source, str):
        if _is_data_url(source):
            return _load_bytes(_decode_data_url(source, description), description, max_pixels)
        return _load_path(source, description, max_pixels)
    if isinstance(source, os.PathLike):
        try:
            path = os.fspath(source)
        except TypeError as exc:
            raise ImageError(f"cannot load image {description}: invalid path ({exc})") from exc
        return _load_path(path, description, max_pixels)
    raise ImageError(
        f"cannot load image {description}: unsupported source type {type(source).__name__}"
        " (expected a path, a data URL, bytes or a PIL image)"
    )


# --- sources ---------------------------------------------------------------------------------


def _load_path(path: str | bytes, description: str, max_pixels: int) -> LoadedImage:
    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load image {description}: {reason}")

    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise fail("file not found") from exc
    except NotADirectoryError as exc:
        raise fail("file not found (a parent is not a directory)") from exc
    except PermissionError as exc:
        raise fail("permission denied") from exc
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL character
        raise fail(f"cannot access file ({_detail(exc)})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise fail("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise fail("not a regular file")
    if st.st_size == 0:
        raise fail("empty file")
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed by the with-statement just below
    except PermissionError as exc:
        raise fail("permission denied") from exc
    except OSError as exc:
        raise fail(f"cannot open file ({_detail(exc)})") from exc
    with handle:
        return _decode(handle, description, max_pixels)


def _load_bytes(data: bytes, description: str, max_pixels: int) -> LoadedImage:
    if not data:
        raise ImageError(f"cannot load image {description}: empty image data")
    return _decode(io.BytesIO(data), description, max_pixels)


def _is_data_url(text: str) -> bool:
    return text[:5].lower() == "data:"


def _split_data_url(url: str) -> tuple[str, bool, str] | None:
    """(media type, is base64, payload) of a data URL, or None if it has no comma."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        return None
    media_type, *params = header.split(";")
    is_base64 = bool(params) and params[-1].strip().lower() == "base64"
    return media_type.strip().lower(), is_base64, payload


def _base64_payload(payload: str) -> str:
    """The payload with percent-escapes undone, whitespace and padding removed."""
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    return "".join(payload.split()).rstrip("=")


def _describe_data_url(url: str) -> str:
    parts = _split_data_url(url)
    if parts is None:
        return "<data URL (malformed)>"
    media_type, is_base64, payload = parts
    shown = _printable(media_type[:_MAX_MEDIA_TYPE]) if media_type else "(no media type)"
    size = len(_base64_payload(payload)) * 3 // 4 if is_base64 else len(payload)
    return f"<data URL {shown} {size} bytes>"


def _decode_data_url(url: str, description: str) -> bytes:
    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load image {description}: {reason}")

    parts = _split_data_url(url)
    if parts is None:
        raise fail("malformed data URL (expected data:image/<type>;base64,<payload>)")
    media_type, is_base64, payload = parts
    if not media_type.startswith("image/"):
        shown = repr(_printable(media_type[:_MAX_MEDIA_TYPE])) if media_type else "missing"
        raise fail(f"data URL media type is {shown}, not image/*")
    if not is_base64:
        raise fail("data URL is not base64-encoded (expected ';base64,')")
    text = _base64_payload(payload)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise fail(f"data URL payload is not valid base64 ({_detail(exc)})") from exc


# --- decoding --------------------------------------------------------------------------------


def _decode(stream: IO[bytes], description: str, max_pixels: int) -> LoadedImage:
    """Open, check and fully decode the first frame of an encoded image."""
    with warnings.catch_warnings():
        # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(stream, formats=_allowed_formats())
        except UnidentifiedImageError as exc:
            raise ImageError(
                f"cannot load image {description}: not a recognised image format"
            ) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"cannot load image {description}: too many pixels ({_detail(exc)})"
            ) from exc
        except Exception as exc:  # plugins raise OSError, SyntaxError, struct.error, ...
            raise ImageError(
                f"cannot load image {description}: corrupt or truncated image ({_detail(exc)})"
            ) from exc
        with opened:
            image = _finish(opened, description, max_pixels)
            return LoadedImage(image=image, source=description, format=opened.format)


def _finish(image: Image.Image, description: str, max_pixels: int) -> Image.Image:
    """Check the size, load the pixels, apply EXIF orientation and convert to RGB.

    Never modifies `image` beyond loading it, and always returns a new image: the caller may
    close `image` (closing an opened image also invalidates its pixels).
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"cannot load image {description}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"cannot load image {description}: too many pixels ({width}x{height} ="
            f" {width * height} pixels, limit {max_pixels})"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"cannot load image {description}: too many pixels ({_detail(exc)})"
            ) from exc
        except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ...
            raise ImageError(
                f"cannot load image {description}: corrupt or truncated image ({_detail(exc)})"
            ) from exc
    try:
        rgb = _to_rgb(upright)
    except Exception as exc:
        raise ImageError(
            f"cannot load image {description}: cannot convert mode {upright.mode} to RGB"
            f" ({_detail(exc)})"
        ) from exc
    return image.copy() if rgb is image else rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as mode RGB: transparency onto white, high bit depths scaled by their range."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_to_8bit(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """A mode "L" image: `image` (I;16*, I or F) mapped linearly from min..max to 0..255."""
    as_float = image.convert("F")
    low, high = as_float.getextrema()
    if not (isinstance(low, float | int) and isinstance(high, float | int)):
        raise ValueError(f"unexpected extrema {low!r}, {high!r}")  # one band: cannot happen
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("pixel values are not finite (NaN or infinity)")
    if high > low:
        scale = 255.0 / (high - low)
        offset = -low * scale
    elif image.mode.startswith("I;16"):  # constant image: use the nominal 16-bit range
        scale, offset = 255.0 / 65535.0, 0.0
    else:  # constant I or F image: keep the value, clipped to 0..255 by the conversion below
        scale, offset = 1.0, 0.0
    # F -> L truncates and clips; the +0.5 makes it round to nearest.
    return as_float.point(lambda v: v * scale + offset + 0.5).convert("L")


# --- helpers ---------------------------------------------------------------------------------

_allowed: list[str] | None = None


def _allowed_formats() -> list[str]:
    """Every format Pillow can open, except the refused ones (computed once, lazily)."""
    global _allowed
    if _allowed is None:
        Image.init()
        _allowed = [name for name in Image.OPEN if name not in _REFUSED_FORMATS]
    return _allowed


def _writable_format(fmt: str) -> str:
    name = fmt.strip().upper()
    if name == "JPG":
        name = "JPEG"
    Image.init()
    if name not in Image.SAVE:
        raise ValueError(f"Pillow cannot write image format {fmt!r}")
    return name


def _printable(text: str) -> str:
    """`text` on one printable line: control characters escaped, long text shortened."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > _MAX_DESCRIPTION:
        text = text[: _MAX_DESCRIPTION - 3] + "..."
    return text


def _detail(exc: BaseException) -> str:
    """An exception's message, on one short line, for inclusion in an ImageError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3] + "..."
    return text
