"""The transformers backend on tiny-random-qwen: QwenGuard's class (Qwen2.5-VL) end to end.

Qwen2.5-VL differs from the Llava models where the backend could go wrong: the processor expands
one <|image_pad|> per merged 28x28 block and rejects aspect ratios above 200, and the model places
tokens with 3-D multimodal RoPE, so text after an image sits at positions shifted by a per-prompt
"rope delta". Scoring continues from the KV cache, so it must reproduce those positions exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("llguidance")

from PIL import Image
from policy_engine.backends.transformers import TransformersBackend
from test_transformers_backend import (
    assert_batched_equals_sequential,
    branch_product,
    check_answer,
    label_sequences,
    varied_images,
)

from policy_engine import Engine, get_host
from policy_engine.loader import load_policy

MODEL = "tiny-random-qwen"
MAX_ASPECT = 200  # Qwen2VLImageProcessor's smart_resize raises ValueError above this


def extreme(image: Image.Image) -> bool:
    return max(image.size) / min(image.size) > MAX_ASPECT


def usable_images(count: int) -> list[Image.Image]:
    """The first `count` of `varied_images` except the 1x500 and 500x1 strips (too elongated)."""
    return [image for image in varied_images(2 * count) if not extreme(image)][:count]


@pytest.fixture(scope="module")
def sampler(loaded_backend: Callable[..., TransformersBackend]) -> TransformersBackend:
    return loaded_backend(model=MODEL, seed=0)


@pytest.fixture(scope="module")
def greedy(loaded_backend: Callable[..., TransformersBackend]) -> TransformersBackend:
    return loaded_backend(model=MODEL, greedy=True)


def test_loads_the_qwen_classes(greedy: TransformersBackend) -> None:
    assert type(greedy.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(greedy.processor).__name__ == "Qwen2_5_VLProcessor"
    assert greedy.model_name == f"{MODEL} (random weights)"
    assert "<|vision_start|><|image_pad|><|vision_end|>" in greedy.prompt_text(
        get_host().compile(load_policy("llavaguard"))
    )


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_every_answer_is_a_valid_verdict(sampler: TransformersBackend, mode: str) -> None:
    images = usable_images(16)
    engine = Engine("llavaguard", sampler, mode=mode, batch_size=8, max_new_tokens=64)  # type: ignore[arg-type]
    decisions = list(engine.assess_many(images))
    assert len(decisions) == len(images)
    for decision in decisions:
        check_answer(decision, engine, mode)
    assert {d.rating for d in decisions} <= {"Safe", "Unsafe"}


def test_scores_are_probabilities_and_agree_with_generation(greedy: TransformersBackend) -> None:
    images = usable_images(8)
    scorer = Engine("llavaguard", greedy, mode="score")
    judge = Engine("llavaguard", greedy, mode="verdict", batch_size=4)
    labels = {c.id for c in scorer.compiled.policy.categories}  # after Unsafe: a violated one
    for score, verdict in zip(scorer.assess_many(images), judge.assess_many(images), strict=True):
        p = score.verdict.p_unsafe
        assert p is not None and 0.0 <= p <= 1.0
        category_scores = score.verdict.category_scores
        assert category_scores is not None and set(category_scores) == labels
        assert all(0.0 <= v <= 1.0 for v in category_scores.values())
        assert math.isclose(sum(category_scores.values()), 1.0, abs_tol=1e-5)
        # generate() reads P(Unsafe) at its rating step: same positions, same probability
        assert verdict.verdict.p_unsafe == pytest.approx(p, abs=1e-4)
        assert verdict.verdict.rating == ("Unsafe" if p >= 0.5 else "Safe")


def _recomputed(
    backend: TransformersBackend, inputs: Any, compiled: Any, *, drop_delta: bool = False
) -> dict[str, float]:
    """Each label's score from one uncached forward pass over prompt + its whole continuation.

    Same method as test_transformers_backend.test_category_scores_equal_a_full_recomputation:
    at each token where the labels' tokenizations branch, the softmax over the branches' tokens.
    The 3-D RoPE positions of the whole sequence come from the model's own `get_rope_index`;
    with `drop_delta` the continuation gets the positions a cache walk that forgot the rope
    delta would give (its token indexes), to show that this test would notice.
    """
    import torch

    start = inputs["input_ids"].shape[1]
    sequences = label_sequences(backend, compiled)
    expected = {}
    with torch.inference_mode():
        for category_id, ids in sequences.items():
            added = torch.tensor([ids])
            full = torch.cat([inputs["input_ids"], added], dim=1)
            types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(added)], dim=1)
            positions, deltas = backend.model.model.get_rope_index(
                full, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"]
            )
            if drop_delta:
                positions[:, :, start:] -= deltas[0, 0]
            batch = {
                **inputs,
                "input_ids": full,
                "attention_mask": torch.ones_like(full),
                "mm_token_type_ids": types,
                "position_ids": positions,
            }
            logits = backend.model(**batch).logits[0].float()
            expected[category_id] = branch_product(sequences, ids, logits, start)
    return expected


@pytest.mark.parametrize("size", [(1, 1), (640, 480), (99, 100)], ids=["1x1", "640x480", "99x100"])
def test_category_scores_equal_a_full_recomputation(
    greedy: TransformersBackend, size: tuple[int, int]
) -> None:
    """The KV-cache walk continues at the right 3-D RoPE positions (prompt length + rope delta)."""
    image = Image.effect_noise(size, 40).convert("RGB")
    compiled = get_host().compile(load_policy("llavaguard"))
    engine = Engine(compiled.policy, greedy, mode="score")
    walked = engine.assess(image).verdict.category_scores
    assert walked is not None
    batch = engine._batch([engine._prepare(image, None)])
    assert batch is not None
    inputs = greedy._inputs(batch, "score")
    # these images make the rope delta non-zero: text after the image is not at its index
    _, deltas = greedy.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    assert int(deltas[0, 0]) < 0
    expected = _recomputed(greedy, inputs, compiled)
    assert math.isclose(sum(expected.values()), 1.0, abs_tol=1e-5)
    for category_id, value in expected.items():
        assert walked[category_id] == pytest.approx(value, abs=1e-4)
    # a walk at positions without the rope delta would be far outside that tolerance
    forgetful = _recomputed(greedy, inputs, compiled, drop_delta=True)
    assert max(abs(forgetful[c] - expected[c]) for c in expected) > 1e-3


def test_batched_greedy_equals_one_at_a_time(greedy: TransformersBackend) -> None:
    """Left padding in a batch shifts the 3-D positions; the answers must not change."""
    assert_batched_equals_sequential(greedy, usable_images(8), batch_size=4)


def test_extreme_aspect_ratio_is_an_error_verdict(greedy: TransformersBackend) -> None:
    """A 1x500 strip cannot go through the Qwen processor: an error for that image, no crash."""
    strip = Image.new("RGB", (1, 500), (10, 200, 30))
    for mode in ("verdict", "score"):
        decision = Engine("llavaguard", greedy, mode=mode).assess(strip)  # type: ignore[arg-type]
        assert not decision.verdict.ok
        assert decision.verdict.error is not None
        assert "aspect ratio must be smaller than 200" in decision.verdict.error.message


def test_extreme_aspect_ratio_does_not_fail_its_batch(greedy: TransformersBackend) -> None:
    """The processor runs per batch; an image it refuses is retried alone, neighbours answer."""
    images = [*usable_images(3), Image.new("RGB", (500, 1))]
    engine = Engine("llavaguard", greedy, mode="verdict", batch_size=4)
    decisions = list(engine.assess_many(images))
    assert [d.verdict.ok for d in decisions] == [True, True, True, False]
