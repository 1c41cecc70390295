"""docs/diffusers.md's example, runnable offline: a policy as the safety checker of a tiny
Stable Diffusion pipeline.

    .venv/bin/python scripts/diffusers_example.py                     # static backend: Unsafe
    .venv/bin/python scripts/diffusers_example.py --rating Safe --p-unsafe 0.4   # blurred
    .venv/bin/python scripts/diffusers_example.py --model tiny-random # a (random) model judges

It builds the tiny random-weight pipeline of the tests (tests/tiny_diffusion.py) in a temporary
folder, loads it with `StableDiffusionPipeline.from_pretrained(path, safety_checker=...)`,
generates two images, saves them next to `--out`, and prints one JSON line per image: what the
pipeline reported (`nsfw_content_detected`) beside the Decision behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiny_diffusion import call_kwargs, tiny_sd  # noqa: E402

from policy_engine.integrations.diffusers import PolicySafetyChecker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="children-platform")
    parser.add_argument("--rating", default="Unsafe", choices=["Safe", "Unsafe"])
    parser.add_argument("--category", default="O2", help="static backend: the Unsafe category")
    parser.add_argument("--p-unsafe", type=float, default=None, help="static backend's P(Unsafe)")
    parser.add_argument("--model", default=None, help="judge with the transformers backend")
    parser.add_argument("--out", type=Path, default=None, help="save the images as OUT-<i>.png")
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logs in (diffusers_logging, transformers_logging):
        logs.set_verbosity_error()
        logs.disable_progress_bar()
    if args.model:
        backend, options = "transformers", {"model": args.model, "device": "cpu"}
    else:
        backend = "static"
        options = {"rating": args.rating, "p_unsafe": args.p_unsafe}
        if args.rating == "Unsafe":
            options["category"] = args.category

    with tempfile.TemporaryDirectory(prefix="tiny-sd-") as tmp:
        checker = PolicySafetyChecker(policy=args.policy, backend=backend, backend_options=options)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd(Path(tmp)), safety_checker=checker)
        pipe.set_progress_bar_config(disable=True)
        with checker:
            output = pipe(**call_kwargs(seed=0, num_images_per_prompt=2))
        decisions = checker.last_decisions
        for index, (image, nsfw) in enumerate(
            zip(output.images, output.nsfw_content_detected, strict=True)
        ):
            if args.out:
                image.save(f"{args.out}-{index}.png")
            decision = decisions[index]
            line = {
                "image": index,
                "nsfw_content_detected": nsfw,
                "treatment": checker.last_treatments[index],
                "rating": decision.rating,
                "category": decision.category_id,
                "actions": [action.name for action in decision.actions],
                "policy": decision.verdict.policy_id,
                "policy_hash": decision.verdict.policy_hash,
                "model": decision.verdict.model,
            }
            print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
