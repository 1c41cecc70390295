"""An item on its way through the engine (engine internals): a decoded image, the parts of a
video or a post, or an early Decision; and the backend calls they are packed into.

A video expands into its sampled frames and a `Post` into its images; the engine judges them in
the same batches as single images and aggregates them into one Verdict (`aggregate.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .aggregate import PartInfo, Post
from .errors import ImageError
from .images import LoadedImage, describe_source, load_image
from .video import VideoLimits, load_video

if TYPE_CHECKING:
    from .backend import Generation
    from .policy import VideoOptions
    from .verdict import Decision


class Prepared:
    """One item on its way through the engine: decoded images (one, or an item's parts) or an
    early Decision. `parts` is None for a single image; for a video or a post it describes
    every part, and `failed` holds the parts that could not be decoded (by index)."""

    __slots__ = (
        "decision",
        "decode_seconds",
        "failed",
        "generations",
        "images",
        "metadata",
        "parts",
        "shadow_generations",
        "source",
    )

    def __init__(
        self,
        metadata: dict[str, Any],
        image: LoadedImage | None = None,
        decision: Decision | None = None,
        decode_seconds: float = 0.0,
        *,
        images: list[LoadedImage] | None = None,
        parts: list[PartInfo] | None = None,
        failed: dict[int, str] | None = None,
        source: str | None = None,
    ) -> None:
        self.metadata = metadata
        self.images: list[LoadedImage] = images if images is not None else [image] if image else []
        self.decision = decision
        self.decode_seconds = decode_seconds
        self.parts = parts
        self.failed = failed or {}
        self.source = source
        self.generations: list[Generation] = []  # answers collected across batches
        self.shadow_generations: list[Generation] | None = None  # a shadow policy's own answers

    @property
    def image(self) -> LoadedImage | None:
        """The decoded image of a single-image item."""
        return self.images[0] if self.parts is None and self.images else None


@dataclass
class Chunk:
    """One backend call's worth of work: images (each with its item) and the items whose last
    image is among them (or that need no call), in input order."""

    members: list[tuple[Prepared, LoadedImage]] = field(default_factory=list)
    done: list[Prepared] = field(default_factory=list)
    early: int = 0  # items without images (errors) counted towards the batch size

    @property
    def size(self) -> int:
        return len(self.members) + self.early


def prepare_video(
    source: Any,
    metadata: dict[str, Any],
    started: float,
    options: VideoOptions,
    limits: VideoLimits,
    max_pixels: int,
) -> Prepared:
    """A video's sampled frames as the parts of one item (ImageError when it cannot be
    decoded within the limits: the whole item is an error)."""
    video = load_video(source, options, limits, max_pixels=max_pixels)
    parts = [PartInfo(f.index, f.timestamp, f.image.source) for f in video.frames]
    return Prepared(
        metadata,
        images=[f.image for f in video.frames],
        parts=parts,
        source=video.source,
        decode_seconds=time.perf_counter() - started,
    )


def prepare_post(
    post: Post, metadata: dict[str, Any], started: float, max_images: int, max_pixels: int
) -> Prepared:
    """A post's images as the parts of one item; an image that cannot be decoded is that
    part's error (the others are still judged). ImageError for an empty or too long post."""
    count = len(post.images)
    if count == 0:
        raise ImageError("cannot judge a post of no images")
    if count > max_images:
        raise ImageError(f"a post of {count} images is over the limit of {max_images}")
    images: list[LoadedImage] = []
    parts: list[PartInfo] = []
    failed: dict[int, str] = {}
    for index, image_source in enumerate(post.images):
        try:
            loaded = load_image(image_source, max_pixels=max_pixels)
        except ImageError as err:
            failed[index] = err.message
            parts.append(PartInfo(index, None, describe_source(image_source)))
            continue
        images.append(loaded)
        parts.append(PartInfo(index, None, loaded.source))
    name = post.source or f"<post of {count}: {', '.join(p.source for p in parts)}>"
    return Prepared(
        metadata,
        images=images,
        parts=parts,
        failed=failed,
        source=name[:200],
        decode_seconds=time.perf_counter() - started,
    )
