"""What PolicySafetyChecker adds to a diffusers pipeline: measured side by side in one run.

    .venv/bin/python bench/diffusers_checker.py                 # tiny SD pipeline, 32x32
    .venv/bin/python bench/diffusers_checker.py --size 256      # bigger images, same pipeline
    .venv/bin/python bench/diffusers_checker.py --model PATH    # also a real checkpoint

One tiny random-weight StableDiffusionPipeline (tests/tiny_diffusion.py), the same prompt, seed
and batch for every row; only the safety checker changes:

- `none`: diffusers' behaviour without a checker (`safety_checker=None`);
- `static`: our checker with the static backend: the integration's own cost (the pipeline's
  CLIP feature extraction, tensor -> PIL, the Engine, post-processing, blacking out);
- `tiny-random <mode>`: the transformers backend with the tiny random model, in each mode;
- `sglang (loopback)`: the sglang backend (native transport) against the test suite's fake
  SGLang server (tests/sglang_server.py, its own process on 127.0.0.1, answering after
  `--service-time`, default 0): the HTTP client's own cost, without a model's;
- `--model PATH <mode>`: the same with a real checkpoint (default mode: score).

Rows run interleaved, `--repeat` rounds after a warm-up. Prints the median pipeline time per
call and its ratio to `none`, and the milliseconds per image spent in the pipeline's
`run_safety_checker` step (CLIP feature extraction plus the checker), timed inside the pipeline:
the cost that carries over to a real pipeline, whose own time per image is seconds, not the
tiny pipeline's milliseconds (so the ratios here overstate it). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiny_diffusion import call_kwargs, tiny_sd  # noqa: E402

from policy_engine.integrations.diffusers import PolicySafetyChecker  # noqa: E402


def start_server(service_time: float) -> tuple[subprocess.Popen[str], str]:
    """The fake SGLang server in its own process; (process, url) once it listens."""
    command = [sys.executable, str(REPO / "tests" / "sglang_server.py"), "--port", "0"]
    command += ["--service-time", str(service_time)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("listening on "):
        process.kill()
        raise SystemExit(f"the fake SGLang server did not start: {line!r}")
    return process, line.removeprefix("listening on ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (x8)")
    parser.add_argument("--images", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--policy", default="children-platform")
    parser.add_argument("--model", default=None, help="a real checkpoint, judged in --mode")
    parser.add_argument("--mode", default="score", choices=["full", "verdict", "score"])
    parser.add_argument("--budget", type=int, default=200, help="max new tokens (full mode)")
    parser.add_argument(
        "--service-time", type=float, default=0.0, help="fake SGLang server's seconds per request"
    )
    args = parser.parse_args()

    import torch
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers import __version__ as diffusers_version
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    for logs in (diffusers_logging, transformers_logging):
        logs.set_verbosity_error()
        logs.disable_progress_bar()

    unsafe = {"rating": "Unsafe", "category": "O2"}
    unsure = {"rating": "Safe", "p_unsafe": 0.4}  # children-platform blurs these
    tiny = {"model": "tiny-random", "device": "cpu", "max_new_tokens": args.budget}
    checkers: list[tuple[str, dict[str, Any] | None]] = [
        ("none", None),
        ("static (Unsafe: blocked)", {"backend": "static", "backend_options": unsafe}),
        ("static (Safe: untouched)", {"backend": "static"}),
        ("static (unsure: blurred)", {"backend": "static", "backend_options": unsure}),
    ]
    for mode in ("score", "verdict", "full"):
        checkers.append(
            (
                f"tiny-random {mode}",
                {"backend": "transformers", "backend_options": tiny, "mode": mode},
            )
        )
    server, url = start_server(args.service_time)
    sglang = {"url": url, "transport": "native"}
    checkers.append(("sglang (loopback)", {"backend": "sglang", "backend_options": sglang}))
    if args.model:
        real = {"model": args.model, "max_new_tokens": args.budget}
        checkers.append(
            (
                f"{Path(args.model).name} {args.mode}",
                {"backend": "transformers", "backend_options": real, "mode": args.mode},
            )
        )

    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, diffusers {diffusers_version}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"tiny StableDiffusionPipeline, {args.size}x{args.size}, {args.steps} steps, "
        f"{args.images} images per call, policy {args.policy}, median of {args.repeat}, "
        f"{torch.get_num_threads()} torch threads"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tiny-sd-") as tmp:
            path = tiny_sd(Path(tmp))
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
            pipe.set_progress_bar_config(disable=True)
            kwargs = call_kwargs(
                num_images_per_prompt=args.images,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                output_type="np",
            )
            # The step the checker adds, timed inside the pipeline: CLIP feature extraction and the
            # checker call (with none, diffusers skips both).
            inner = pipe.run_safety_checker
            check_seconds: list[float] = []

            def run_safety_checker(*a: Any, **kw: Any) -> Any:
                started = time.perf_counter()
                result = inner(*a, **kw)
                check_seconds.append(time.perf_counter() - started)
                return result

            pipe.run_safety_checker = run_safety_checker

            made = []
            for label, spec in checkers:
                checker = None if spec is None else PolicySafetyChecker(policy=args.policy, **spec)
                if checker is not None:
                    checker.engine.load()
                made.append((label, checker))

            def run(checker: PolicySafetyChecker | None) -> Any:
                pipe.safety_checker = checker
                kwargs["generator"] = torch.Generator("cpu").manual_seed(0)
                return pipe(**kwargs)

            flags = {
                label: run(checker).nsfw_content_detected for label, checker in made
            }  # warm-up
            calls: dict[str, list[float]] = {label: [] for label, _ in made}
            checks: dict[str, list[float]] = {label: [] for label, _ in made}
            for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every row
                for label, checker in made:
                    check_seconds.clear()
                    started = time.perf_counter()
                    run(checker)
                    calls[label].append(time.perf_counter() - started)
                    checks[label].append(sum(check_seconds))
            for _, checker in made:
                if checker is not None:
                    checker.close()
    finally:  # the server is this script's child: stop it by its own handle
        server.terminate()
        server.wait(timeout=30)

    # a ratio per round (same minute, same load), then the median over rounds
    none = calls["none"]
    ratios = {label: [c / n for c, n in zip(calls[label], none, strict=True)] for label in calls}
    print(
        f"{'checker':26} {'s/call':>7} {'ratio':>6} {'check ms/image':>15}  nsfw_content_detected"
    )
    for label, _ in made:
        seconds = statistics.median(calls[label])
        per_image = statistics.median(checks[label]) / args.images * 1000
        ratio = statistics.median(ratios[label])
        print(f"{label:26} {seconds:7.3f} {ratio:6.2f} {per_image:15.1f}  {flags[label]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
