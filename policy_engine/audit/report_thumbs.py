"""Thumbnails for the HTML report: JPEG data URLs made from the rows' sources, or the reason
there is none. Pillow is imported (through `policy_engine.images`) only when one is made."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from ..errors import ImageError
from .summary import clip

__all__ = ["Thumbnailer"]

_VIDEO_TIME = re.compile(r"\A(.+)#t=([0-9]+(?:\.[0-9]+)?)\Z", re.DOTALL)


class Thumbnailer:
    """Thumbnails as JPEG data URLs, or the reason there is none; cached per source."""

    def __init__(self, size: int, base_dir: Path | None) -> None:
        self.size = size
        self.base_dir = base_dir
        self.cache: dict[str, tuple[str | None, str]] = {}

    def get(self, source: str) -> tuple[str | None, str]:
        if source not in self.cache:
            self.cache[source] = self._make(source)
        return self.cache[source]

    def _make(self, source: str) -> tuple[str | None, str]:
        lowered = source.lower()
        at = _VIDEO_TIME.match(source)
        if at is not None and not lowered.startswith("data:"):
            return self._frame(at.group(1), float(at.group(2)))
        if lowered.startswith("data:") or source.startswith("<"):
            return None, "not a file: an in-memory image or data URL"
        if "://" in source:
            return None, "not a local file (a URL; the report never downloads)"
        path = self._find(source)
        if path is None:
            return None, "file not found (moved, deleted, or not a file path)"
        from ..images import describe_source, load_image

        try:
            image = load_image(str(path)).image
            image.thumbnail((self.size, self.size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
        except ImageError as err:
            prefix = f"cannot load image {describe_source(str(path))}: "
            message = str(err)
            return None, message[len(prefix) :] if message.startswith(prefix) else message
        except (OSError, ValueError) as err:
            return None, f"cannot make a thumbnail: {clip(str(err), 120)}"
        payload = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/jpeg;base64,{payload}", ""

    def _frame(self, source: str, timestamp: float) -> tuple[str | None, str]:
        """A thumbnail of a video's frame at `timestamp` (a flagged frame's source is
        'clip.mp4#t=1.200')."""
        path = self._find(source)
        if path is None:
            return None, "video not found (moved, deleted, or not a file path)"
        from ..images import DEFAULT_MAX_PIXELS
        from ..video import VideoLimits, frame_at

        try:
            image = frame_at(str(path), timestamp, VideoLimits(), max_pixels=DEFAULT_MAX_PIXELS)
            image.thumbnail((self.size, self.size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
        except ImageError as err:
            return None, clip(str(err), 160)
        payload = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/jpeg;base64,{payload}", ""

    def _find(self, source: str) -> Path | None:
        try:
            candidate = Path(source).expanduser()
            if candidate.is_file():
                return candidate
            if self.base_dir is not None and not candidate.is_absolute():
                relative = self.base_dir / candidate
                if relative.is_file():
                    return relative
        except (OSError, ValueError):  # ValueError: a NUL character in the "path"
            return None
        return None
