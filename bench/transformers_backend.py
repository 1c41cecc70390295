"""Benchmark the transformers backend: ratios measured side by side in one run.

    .venv/bin/python bench/transformers_backend.py                   # tiny-random, a few seconds
    .venv/bin/python bench/transformers_backend.py --preset medium   # Qwen2-0.5B text dimensions
    .venv/bin/python bench/transformers_backend.py --model PATH      # a real checkpoint

Prints, for one model on this machine:
- constrained vs unconstrained decoding, time per generated token (goal: <= 1.05);
- `score` mode vs `full` generation, time per image (goal: >= 10x faster);
- `verdict` mode vs `full` (goal: >= 3x faster);
- a batch of 8 vs one at a time, images per second;
- grammar compile time, first and cached.

Every figure comes from the same process and images; nothing here is asserted. Random-weight
models ramble until the token budget, so `full` always spends the whole budget (`--budget`);
a trained model writes shorter rationales, which narrows the score/full gap.

`--preset medium` builds (once, into the cache) a random Llava-OneVision whose language model has
Qwen2-0.5B's dimensions (896 hidden, 24 layers, a 151,936-row LM head) on the tiny model's
tokenizer and vision tower: the per-token cost of LlavaGuard-0.5B on CPU without a download. Its
tokenizer has only ~1,100 real tokens, so llguidance's mask is cheaper than with Qwen's 151k.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image
from policy_engine.backends.transformers import TransformersBackend

from policy_engine import Engine


def images(count: int) -> list[Image.Image]:
    sizes = [(640, 480), (480, 640), (64, 64), (1024, 300), (300, 1024), (800, 800)]
    return [
        Image.effect_noise(sizes[i % len(sizes)], 30 + 5 * i).convert("RGB") for i in range(count)
    ]


def medium_model() -> Path:
    """A random Llava-OneVision with Qwen2-0.5B text dimensions, built once into the cache."""
    import torch
    from policy_engine.backends.tiny import cache_root, tiny_model_path
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    tiny = tiny_model_path("tiny-random")
    target = cache_root() / "models" / f"bench-medium-{tiny.name}"
    if (target / "config.json").is_file():
        return target
    config = AutoConfig.from_pretrained(tiny)
    text = config.text_config
    text.hidden_size, text.intermediate_size = 896, 4864
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = 24, 14, 2
    text.head_dim = 64
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.vocab_size = 151936
    text.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(target)
    AutoProcessor.from_pretrained(tiny).save_pretrained(target)
    (target / "README.md").write_text("Benchmark model: RANDOM weights.\n", encoding="utf-8")
    return target


def timed(run: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `repeat` runs, after one warm-up run."""
    run()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Checkpoint (default: per --preset).")
    parser.add_argument("--preset", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--images", type=int, default=8, help="images for the batching figure")
    parser.add_argument("--budget", type=int, default=None, help="full-mode token budget")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.model:
        model = args.model
    elif args.preset == "medium":
        model = str(medium_model())
    else:
        model = "tiny-random"
    budget = args.budget or (500 if args.preset == "tiny" else 120)
    repeat = args.repeat if args.preset == "tiny" else 1
    pics = images(args.images)

    def backend(**options: Any) -> TransformersBackend:
        instance = TransformersBackend(model=model, greedy=True, **options)
        instance.load()
        instance.loaded = True
        return instance

    constrained, free = backend(), backend(constrained=False)

    def run(b: TransformersBackend, mode: str, batch: int, subset: list[Image.Image]) -> float:
        engine = Engine("llavaguard", b, mode=mode, batch_size=batch, max_new_tokens=budget)  # type: ignore[arg-type]
        return timed(lambda: list(engine.assess_many(subset)), repeat)

    print(f"# transformers backend benchmark: {model}")
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, python {sys.version.split()[0]}"
    )
    print(f"# {len(pics)} images, full-mode budget {budget} tokens, median of {repeat} run(s)")

    # 1. time per generated token, constrained vs not (same prompts, greedy, one at a time).
    # The prompt's forward pass (what `score` mode without category scores runs) is subtracted.
    one = pics[:2]
    no_categories = backend(category_scores=False)
    prefill = run(no_categories, "score", 1, one) / len(one)

    def decode(b: TransformersBackend) -> tuple[float, float]:
        before = b.tokens_generated
        per_image = run(b, "full", 1, one) / len(one)
        steps = (b.tokens_generated - before) / ((repeat + 1) * len(one))
        return per_image, (per_image - prefill) / steps

    full, per_c = decode(constrained)
    _, per_f = decode(free)
    print(f"prompt forward pass (prefill): {prefill:.3f} s/image")
    print(
        f"decode time per token, constrained vs unconstrained: {per_c * 1e3:.2f} ms vs "
        f"{per_f * 1e3:.2f} ms  ratio {per_c / per_f:.3f}  (goal <= 1.05)"
    )

    # 2./3. modes, time per image (one at a time)
    verdict = run(constrained, "verdict", 1, one) / len(one)
    score = run(constrained, "score", 1, one) / len(one)
    print(
        f"s/image: full {full:.3f}, verdict {verdict:.3f}, score {score:.3f}, "
        f"score without category scores {prefill:.3f}"
    )
    print(f"score vs full: {full / score:.1f}x faster  (goal >= 10)")
    print(f"score (no category scores) vs full: {full / prefill:.1f}x faster")
    print(f"verdict vs full: {full / verdict:.1f}x faster  (goal >= 3)")

    # 4. batching, images per second in full mode
    batched = len(pics) / run(constrained, "full", 8, pics)
    single = len(pics) / run(constrained, "full", 1, pics)
    print(
        f"batch of {min(8, len(pics))} vs one at a time: {batched:.2f} vs {single:.2f} images/s"
        f"  ratio {batched / single:.2f}"
    )

    # 5. grammar compile, first and cached
    from policy_engine.backends import guidance

    from policy_engine import compile_policy, load_policy

    compiled = compile_policy(load_policy("llavaguard"))
    guidance.clear_grammar_cache()
    started = time.perf_counter()
    guidance.matcher_for(compiled, "full", constrained.guided)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        guidance.matcher_for(compiled, "full", constrained.guided)
    cached = (time.perf_counter() - started) / 100
    print(
        f"grammar compile: first {first * 1e3:.2f} ms, cached {cached * 1e3:.3f} ms"
        f"  ratio {first / cached:.0f}x"
    )


if __name__ == "__main__":
    main()
