"""Safe video intake: recognise a video by its content, decode it with PyAV within limits, and
sample the frames to judge.

    if is_video(source):
        video = load_video(source, VideoOptions(fps=1, max_frames=32), VideoLimits())
        video.frames[0].image  # a LoadedImage, judged like any image

A source is a video when its first bytes are a known container's (MP4/MOV, Matroska/WebM, AVI,
MPEG-TS, MPEG-PS, FLV), when a path ends in a video extension, or when a data URL says
`video/...`. A path with a video extension whose content is not a known container (a text file
named `.mp4`) is a video that fails to load, with a message that says so.

Safety, the image intake's treatment: the size in bytes is checked before opening, the
duration and the frame dimensions from the header before any frame is decoded (and again on each
decoded frame), the number of decoded frames is bounded; FFmpeg is given the container format we
recognised (never its own probe, so no playlist or concat demuxer that would open other files)
and reads from a Python file object, never a URL. Every problem is an `ImageError` naming the
source: the item's error verdict, never a silent Safe.

PyAV (`av`, the `video` extra; its wheels bundle FFmpeg) is imported only when a video is
decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from PIL import Image, ImageChops, ImageStat

from .errors import ImageError
from .images import LoadedImage, describe_source

if TYPE_CHECKING:
    from .policy import VideoOptions

__all__ = [
    "DecodedVideo",
    "Frame",
    "VideoLimits",
    "frame_at",
    "is_video",
    "load_video",
    "sniff_video",
]

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".ts", ".mts", ".flv", ".mpg", ".mpeg"}
)
_HEAD = 512  # bytes read to recognise a container
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
_THUMB = (32, 32)  # frames are compared at this size for scene changes


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on hostile video input, checked before and while decoding.

    `max_pixels` bounds width * height of a frame (None: the engine's image limit)."""

    max_bytes: int = 1 << 30
    max_seconds: float = 3600.0
    max_pixels: int | None = None
    max_decoded_frames: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_seconds", "max_decoded_frames"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its position among the sampled frames, its time, the image."""

    index: int
    timestamp: float
    image: LoadedImage


@dataclass(frozen=True)
class DecodedVideo:
    """The sampled frames of a video and what decoding them took."""

    source: str
    frames: list[Frame]
    duration: float | None
    decoded: int  # frames decoded (sampled or not)


def sniff_video(head: bytes) -> str | None:
    """The FFmpeg demuxer for a known video container starting with `head`, or None."""
    if len(head) >= 12 and head[4:8] in _MOV_BOXES:
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"FLV\x01"):
        return "flv"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    return None


def is_video(source: object) -> bool:
    """Whether `source` should be decoded as a video (content first, then the path's
    extension or the data URL's media type). Never raises: a source that cannot be read is
    left to the image intake, which says why."""
    if isinstance(source, bytes | bytearray):
        return sniff_video(bytes(source[:_HEAD])) is not None
    if isinstance(source, str) and source[:5].lower() == "data:":
        return source[5:11].lower() == "video/"
    if isinstance(source, str | os.PathLike):
        try:
            path = os.fspath(source)
            if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
                return True
            with open(path, "rb") as handle:
                return sniff_video(handle.read(_HEAD)) is not None
        except (OSError, TypeError, ValueError):
            return False
    return False


def load_video(
    source: object,
    options: VideoOptions,
    limits: VideoLimits,
    *,
    max_pixels: int,
) -> DecodedVideo:
    """Decode `source` (a path, bytes or a `data:video/...;base64,` URL) and sample its frames
    by `options`, within `limits` (`max_pixels`: the engine's image limit, used when the limits
    name none). Raises ImageError (one line naming the source) for every problem."""
    description = describe_source(source)

    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load video {description}: {reason}")

    with _open_container(source, limits, fail) as container:
        pixel_limit = limits.max_pixels or max_pixels
        return _sample(container, options, limits, pixel_limit, description, fail)


def frame_at(
    source: object, timestamp: float, limits: VideoLimits, *, max_pixels: int
) -> Image.Image:
    """The first frame at or after `timestamp` seconds (the report's thumbnail of a flagged
    frame), decoded within `limits`. Raises ImageError like `load_video`."""
    options = _AtTime()
    description = describe_source(source)

    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load video {description}: {reason}")

    with _open_container(source, limits, fail) as container:
        pixel_limit = limits.max_pixels or max_pixels
        video = _sample(container, options, limits, pixel_limit, "", fail, start=timestamp)
    return video.frames[-1].image.image


@dataclass(frozen=True)
class _AtTime:
    """Sampling options that keep one frame (the first at the sampling's start)."""

    fps: float = 1.0
    max_frames: int = 1
    scene_change: float | None = None


@contextmanager
def _open_container(source: object, limits: VideoLimits, fail: Any) -> Iterator[Any]:
    stream = _open_source(source, limits, fail)
    with stream:
        head = stream.read(_HEAD)
        stream.seek(0)
        demuxer = sniff_video(head)
        if demuxer is None:
            raise fail(
                "not a video: the content is no known container (MP4/MOV, WebM/Matroska, "
                "AVI, MPEG-TS, MPEG-PS, FLV)"
            )
        try:
            import av
        except ImportError:
            raise fail("video decoding needs PyAV: pip install 'policy-engine[video]'") from None
        try:
            container = av.open(stream, mode="r", format=demuxer)
        except Exception as err:  # FFmpegError and friends: corrupt, truncated
            raise fail(f"corrupt or truncated video ({_detail(err)})") from err
        with container:
            yield container


def _open_source(source: object, limits: VideoLimits, fail: Any) -> IO[bytes]:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    elif isinstance(source, str) and source[:5].lower() == "data:":
        data = _data_url_bytes(source, fail)
    elif isinstance(source, str | os.PathLike):
        return _open_path(source, limits, fail)
    else:
        raise fail(f"unsupported source type {type(source).__name__}")
    if not data:
        raise fail("empty video data")
    if len(data) > limits.max_bytes:
        raise fail(f"too large ({len(data)} bytes, limit {limits.max_bytes})")
    return io.BytesIO(data)


def _open_path(source: str | os.PathLike[str], limits: VideoLimits, fail: Any) -> IO[bytes]:
    try:
        st = os.stat(source)
    except FileNotFoundError as err:
        raise fail("file not found") from err
    except (OSError, ValueError) as err:
        raise fail(f"cannot access file ({_detail(err)})") from err
    if not stat.S_ISREG(st.st_mode):
        raise fail("not a regular file")
    if st.st_size == 0:
        raise fail("empty file")
    if st.st_size > limits.max_bytes:
        raise fail(f"too large ({st.st_size} bytes, limit {limits.max_bytes})")
    try:
        return open(source, "rb")
    except OSError as err:
        raise fail(f"cannot open file ({_detail(err)})") from err


def _data_url_bytes(url: str, fail: Any) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise fail("malformed data URL (expected data:video/<type>;base64,<payload>)")
    text = "".join(payload.split()).rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise fail(f"data URL payload is not valid base64 ({_detail(err)})") from err


def _sample(
    container: Any,
    options: VideoOptions | _AtTime,
    limits: VideoLimits,
    pixel_limit: int,
    description: str,
    fail: Any,
    *,
    start: float = 0.0,
) -> DecodedVideo:
    if not container.streams.video:
        raise fail("no video stream (a truncated file, or audio only)")
    stream = container.streams.video[0]
    duration = _duration(container, stream)
    if duration is not None and duration > limits.max_seconds:
        raise fail(f"too long ({duration:.1f} s, limit {limits.max_seconds:g} s)")
    _check_size(stream.codec_context.width, stream.codec_context.height, pixel_limit, fail)
    step = 1.0 / options.fps
    if duration is not None and duration * options.fps > options.max_frames:
        step = duration / options.max_frames  # spread the frames over the whole video
    rate = float(stream.average_rate) if stream.average_rate else None
    frames: list[Frame] = []
    decoded = 0
    due = start  # the next sampling time
    last_thumb: Image.Image | None = None
    for frame in _decode(container, stream, fail):
        decoded += 1
        if decoded > limits.max_decoded_frames:
            raise fail(f"too many frames (more than {limits.max_decoded_frames} decoded)")
        _check_size(frame.width, frame.height, pixel_limit, fail)
        time = frame.time if frame.time is not None else (decoded - 1) / (rate or 1.0)
        if time > limits.max_seconds:
            raise fail(f"too long (a frame at {time:.1f} s, limit {limits.max_seconds:g} s)")
        take = time >= due - 1e-6
        image: Image.Image | None = None
        if not take and options.scene_change is not None and last_thumb is not None:
            image = frame.to_image()
            take = _difference(last_thumb, image) > options.scene_change
        if not take:
            continue
        image = image or frame.to_image()
        while due <= time + 1e-6:
            due += step
        if options.scene_change is not None:
            last_thumb = _thumb(image)
        source = f"{description}#t={time:.3f}"
        loaded = LoadedImage(image=image.convert("RGB"), source=source, format="video")
        frames.append(Frame(index=len(frames), timestamp=round(time, 6), image=loaded))
        if len(frames) >= options.max_frames:
            break
    if not frames:
        raise fail("no frame could be decoded (corrupt or truncated video)")
    return DecodedVideo(description, frames, duration, decoded)


def _decode(container: Any, stream: Any, fail: Any) -> Iterator[Any]:
    try:
        yield from container.decode(stream)
    except ImageError:
        raise
    except Exception as err:  # FFmpegError, a damaged packet, an unsupported codec
        raise fail(f"corrupt or truncated video ({_detail(err)})") from err


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def _check_size(width: int, height: int, limit: int, fail: Any) -> None:
    if width * height > limit:
        raise fail(f"frames too large ({width}x{height} = {width * height} pixels, limit {limit})")


def _thumb(image: Image.Image) -> Image.Image:
    return image.convert("L").resize(_THUMB)


def _difference(thumb: Image.Image, image: Image.Image) -> float:
    """Mean absolute difference (0..1) between a thumbnail and an image's thumbnail."""
    diff = ImageChops.difference(thumb, _thumb(image))
    return float(ImageStat.Stat(diff).mean[0]) / 255


def _detail(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
