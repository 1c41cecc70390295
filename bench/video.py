"""Benchmark videos: frames judged per second, side by side with decoding alone.

    .venv/bin/python bench/video.py                       # static and tiny-random, 3 videos
    .venv/bin/python bench/video.py --fps 4 --seconds 20  # denser sampling, longer videos
    .venv/bin/python bench/video.py --no-tiny             # static only (no transformers)

For H.264 videos made here with PyAV (`--seconds` long, 25 frames/s, 320x240), sampled by a
policy's `video:` block (`--fps` frames per second of video), in one process:

- decoding alone (`load_video`: demux, decode every frame, convert the sampled ones), sampled
  frames per second;
- the whole engine with the `static` backend (no model: decoding, batching, aggregation,
  post-processing), frames judged per second and its ratio to decoding alone;
- the same with the transformers backend's `tiny-random` model (`--mode`, default score: one
  forward pass per frame), frames judged per second and its ratio.

Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av
from PIL import Image


def make_video(path: Path, seconds: float, seed: int) -> Path:
    """An H.264 MP4, 25 frames/s, 320x240, a moving gradient (so frames differ)."""
    fps = 25
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index in range(round(seconds * fps)):
            shade = (index * 3 + seed * 40) % 256
            image = Image.linear_gradient("L").resize((320, 240)).point(lambda v, s=shade: v ^ s)
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    path.write_bytes(buffer.getvalue())
    return path


def timed(run: Callable[[], int], repeat: int) -> tuple[float, int]:
    """(best seconds, frames) of `repeat` runs."""
    best, frames = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        frames = run()
        best = min(best, time.perf_counter() - started)
    return best, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=2.0, help="frames judged per second")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--mode", default="score", choices=["full", "verdict", "score"])
    parser.add_argument("--no-tiny", dest="tiny", action="store_false")
    args = parser.parse_args()

    from policy_engine import Engine
    from policy_engine.loader import load_policy
    from policy_engine.policy import VideoOptions
    from policy_engine.video import VideoLimits, load_video

    options = VideoOptions(fps=args.fps, max_frames=10_000)
    policy = load_policy("llavaguard").model_copy(update={"video": options})
    with tempfile.TemporaryDirectory() as tmp:
        videos = [make_video(Path(tmp) / f"{i}.mp4", args.seconds, i) for i in range(args.videos)]

        def decode() -> int:
            limits = VideoLimits()
            return sum(len(load_video(v, options, limits, max_pixels=10**8).frames) for v in videos)

        def judge(engine: Engine) -> Callable[[], int]:
            def run() -> int:
                decisions = list(engine.assess_many(videos))
                bad = [d.verdict.error.message for d in decisions if d.verdict.error]
                if bad:
                    sys.exit(f"error: {bad[0]}")
                return sum(len(d.verdict.parts or ()) for d in decisions)

            return run

        rows: list[tuple[str, float, int]] = []
        decode()  # warm up: PyAV's and FFmpeg's first-use costs out of the figures
        seconds, frames = timed(decode, args.repeat)
        rows.append(("decoding alone", seconds, frames))
        with Engine(policy, "static") as engine:
            engine.load()
            seconds, frames = timed(judge(engine), args.repeat)
        rows.append(("engine, static backend", seconds, frames))
        if args.tiny:
            options_tiny = {"model": "tiny-random"}
            with Engine(policy, "transformers", mode=args.mode, backend_options=options_tiny) as e:
                e.load()
                seconds, frames = timed(judge(e), 1)
            rows.append((f"engine, tiny-random ({args.mode})", seconds, frames))

    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, PyAV {av.__version__}")
    print(
        f"# {args.videos} videos of {args.seconds:g} s (25 frames/s, 320x240), "
        f"sampled at {args.fps:g} frames/s"
    )
    base = rows[0][2] / rows[0][1]
    print(f"{'':<34}{'frames':>8}{'seconds':>10}{'frames/s':>10}{'vs decoding':>13}")
    for name, seconds, frames in rows:
        rate = frames / seconds
        print(f"{name:<34}{frames:>8}{seconds:>10.3f}{rate:>10.1f}{rate / base:>12.2f}x")


if __name__ == "__main__":
    main()
