"""Videos for tests, encoded with PyAV: grey frames with red ones at known frame indices, so the
colour backend (tests/colour_backend.py) rates exactly those frames Unsafe.

    data = grey_video(seconds=3, fps=10, red={12})   # H.264 in MP4, frame 12 at t = 1.2 s
"""

from __future__ import annotations

import io
import struct
from collections.abc import Collection

import av
from PIL import Image

from tests.colour_backend import red_image

GREY = red_image(0.0, (64, 48))


def grey_video(
    *,
    seconds: float = 3.0,
    fps: int = 10,
    red: Collection[int] = (),
    redness: float = 1.0,
    size: tuple[int, int] = (64, 48),
    container: str = "mp4",
) -> bytes:
    """An H.264 video (MP4 or Matroska) of grey frames, those at indices `red` of `redness`."""
    frames = round(seconds * fps)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for index in range(frames):
            value = redness if index in red else 0.0
            frame = av.VideoFrame.from_image(red_image(value, size))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def huge_declared_avi(width: int = 12000, height: int = 12000) -> bytes:
    """A small raw-video AVI whose header declares `width` x `height` frames (the pixels
    behind it are 64x48): a decoder that trusted it would allocate gigabytes."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="avi") as out:
        stream = out.add_stream("rawvideo", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr24"
        for _ in range(5):
            out.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (64, 48)))))
        out.mux(stream.encode())
    data = bytearray(buffer.getvalue())
    at = data.find(b"strf")  # BITMAPINFOHEADER: size, width, height (negative: top-down)
    data[at + 12 : at + 20] = struct.pack("<ii", width, -height)
    return bytes(data)
