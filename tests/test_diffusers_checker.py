"""PolicySafetyChecker moderates real diffusers pipelines by a policy's Decisions.

Tiny random-weight pipelines (tests/tiny_diffusion.py) are saved and loaded back through
`from_pretrained`, the checker in place of diffusers' own. Backends whose answers we control
(`static`, the colour-keyed test backend) make flagged vs not flagged deterministic; one test
goes through the in-process transformers backend with the tiny-random model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageFilter

from policy_engine import Decision, Engine, PolicyEngineError, Verdict
from policy_engine.integrations.diffusers import (
    PolicySafetyChecker,
    is_flagged,
    treatment,
)
from tests.colour_backend import colour_host, red_image, redness
from tests.tiny_diffusion import SIZE, call_kwargs, tiny_sd, tiny_sdxl

REPO = Path(__file__).resolve().parent.parent
UNSAFE = {"rating": "Unsafe", "category": "O2"}
N = 3  # images per call

diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def sd(path: Path, checker: PolicySafetyChecker | None) -> Any:
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=checker, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, output_type: str = "pil") -> Any:
    return pipe(**call_kwargs(seed=0, num_images_per_prompt=N, output_type=output_type))


@pytest.fixture(scope="module")
def reference(sd_path: Path) -> list[Image.Image]:
    """What the pipeline makes without any checker (same seed): the untouched images."""
    output = generate(sd(sd_path, None))
    assert output.nsfw_content_detected is None
    return list(output.images)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def is_black(image: Image.Image) -> bool:
    return not pixels(image).any()


def blur_of(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(max(2.0, SIZE / 32)))


def policy_file(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "generator.yaml"
    path.write_text(
        "extends: llavaguard\nid: generator\nversion: '1'\npostprocess:\n"
        "  - name: rules\n    id: moderation\n    params:\n      match: first\n"
        f"      rules:\n{rules}",
        encoding="utf-8",
    )
    return path


# -- StableDiffusionPipeline: the checker hook ---------------------------------------------


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_unsafe_images_are_blacked_out_as_diffusers_does(sd_path: Path, output_type: str) -> None:
    """llavaguard has no moderation rules: an Unsafe image gets the default, block."""
    checker = PolicySafetyChecker(policy="llavaguard", backend="static", backend_options=UNSAFE)
    output = generate(sd(sd_path, checker), output_type)
    assert output.nsfw_content_detected == [True] * N
    assert [d.rating for d in checker.last_decisions] == ["Unsafe"] * N
    assert checker.last_treatments == ["block"] * N
    images = output.images
    if output_type == "pil":
        assert all(is_black(image) for image in images)
    else:
        assert images.shape[0] == N and float(abs(images).max()) == 0.0


def test_safe_images_come_out_exactly_as_without_a_checker(
    sd_path: Path, reference: list[Image.Image]
) -> None:
    checker = PolicySafetyChecker(policy="llavaguard", backend="static")
    output = generate(sd(sd_path, checker))
    assert output.nsfw_content_detected == [False] * N
    assert checker.last_treatments == ["allow"] * N
    for got, want in zip(output.images, reference, strict=True):
        assert np.array_equal(pixels(got), pixels(want))
    assert not any(is_black(image) for image in reference)


def test_a_blur_action_blurs_and_flags(sd_path: Path, reference: list[Image.Image]) -> None:
    """children-platform blurs a Safe verdict the model was unsure of (P(Unsafe) >= 0.3)."""
    options = {"rating": "Safe", "p_unsafe": 0.4}
    checker = PolicySafetyChecker(
        policy="children-platform", backend="static", backend_options=options
    )
    output = generate(sd(sd_path, checker))
    assert output.nsfw_content_detected == [True] * N
    assert [[a.name for a in d.actions] for d in checker.last_decisions] == [["blur"]] * N
    for got, want in zip(output.images, reference, strict=True):
        assert np.array_equal(pixels(got), pixels(blur_of(want)))
        assert not np.array_equal(pixels(got), pixels(want))


def test_an_allow_action_keeps_a_flagged_image(
    sd_path: Path, reference: list[Image.Image], tmp_path: Path
) -> None:
    """Unsafe but allowed by the policy: reported, shown as generated (the checker returns it
    denormalized, since the pipeline skips that step for flagged images)."""
    path = policy_file(tmp_path, "        - {when: {rating: Unsafe}, then: allow}\n")
    checker = PolicySafetyChecker(policy=path, backend="static", backend_options=UNSAFE)
    output = generate(sd(sd_path, checker))
    assert output.nsfw_content_detected == [True] * N
    assert checker.last_treatments == ["allow"] * N
    for got, want in zip(output.images, reference, strict=True):
        assert np.array_equal(pixels(got), pixels(want))


def test_an_error_decision_fails_closed(sd_path: Path) -> None:
    """A reply that is not an answer: rating None, never a silent Safe; blacked out."""
    options = {"raw": "I cannot judge this image."}
    checker = PolicySafetyChecker(policy="llavaguard", backend="static", backend_options=options)
    output = generate(sd(sd_path, checker))
    assert [d.rating for d in checker.last_decisions] == [None] * N
    assert all(d.verdict.error is not None for d in checker.last_decisions)
    assert output.nsfw_content_detected == [True] * N
    assert all(is_black(image) for image in output.images)


def test_the_colour_backend_flags_exactly_the_redder_images(
    sd_path: Path, reference: list[Image.Image]
) -> None:
    """Per-image decisions: the threshold sits between the generated images' rednesses, so
    the redder ones are Unsafe (blacked out) and the others come out untouched."""
    values = sorted(redness(image) for image in reference)
    assert values[0] < values[-1]  # the tinted VAE makes seed-dependent reds
    midpoint = (values[0] + values[1]) / 2
    seen: list[list[Decision]] = []
    with colour_host() as host:
        checker = PolicySafetyChecker(
            policy="llavaguard",
            backend="colour",
            backend_options={"midpoint": midpoint},
            host=host,
            on_decisions=seen.append,
        )
        output = generate(sd(sd_path, checker))
    expected = [redness(image) >= midpoint for image in reference]
    assert expected.count(True) == N - 1
    decisions = checker.last_decisions
    assert seen == [decisions]
    assert output.nsfw_content_detected == [d.rating == "Unsafe" for d in decisions] == expected
    for got, want, flagged in zip(output.images, reference, expected, strict=True):
        assert is_black(got) if flagged else np.array_equal(pixels(got), pixels(want))


def test_the_transformers_backend_with_the_tiny_random_model(
    sd_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path with a model (random weights: any verdict, but the pipeline's report
    and the images follow the Decisions)."""
    monkeypatch.setenv("POLICY_ENGINE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = {"model": "tiny-random", "device": "cpu"}
    checker = PolicySafetyChecker(
        policy="children-platform", backend="transformers", backend_options=options
    )
    with checker:
        output = generate(sd(sd_path, checker))
    decisions = checker.last_decisions
    assert len(decisions) == N
    assert all(d.verdict.model and "tiny-random" in d.verdict.model for d in decisions)
    treated = [treatment(d) for d in decisions]
    assert checker.last_treatments == treated
    assert output.nsfw_content_detected == [
        is_flagged(d, t) for d, t in zip(decisions, treated, strict=True)
    ]
    for image, how in zip(output.images, treated, strict=True):
        assert is_black(image) == (how == "block")


def test_the_checker_is_a_pipeline_component(sd_path: Path, tmp_path: Path) -> None:
    """Assigned after loading, it is registered under its own class; saving the pipeline
    does not try to save it (a reload gets no checker until one is given again)."""
    pipe = sd(sd_path, None)
    checker = PolicySafetyChecker(policy="llavaguard", backend="static", backend_options=UNSAFE)
    pipe.safety_checker = checker
    assert pipe.components["safety_checker"] is checker
    assert generate(pipe).nsfw_content_detected == [True] * N
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]


# -- SDXL: no hook, moderate what the pipeline returns -------------------------------------


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_sdxl_output_is_moderated_after_the_call(sdxl_path: Path, output_type: str) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    assert not hasattr(pipe, "safety_checker")
    raw = pipe(**call_kwargs(seed=0, num_images_per_prompt=N, output_type="pil")).images
    values = sorted(redness(image) for image in raw)
    midpoint = (values[0] + values[1]) / 2
    with colour_host() as host:
        checker = PolicySafetyChecker(
            policy="llavaguard",
            backend="colour",
            backend_options={"midpoint": midpoint},
            host=host,
        )
        generated = pipe(**call_kwargs(seed=0, num_images_per_prompt=N, output_type=output_type))
        output = checker.moderate_output(generated)
    expected = [redness(image) >= midpoint for image in raw]
    assert expected.count(True) == N - 1
    assert output.nsfw_content_detected == expected
    assert [d.rating == "Unsafe" for d in checker.last_decisions] == expected
    images = output.images
    if output_type == "pil":
        pictures = images
    else:
        array = images if output_type == "np" else images.permute(0, 2, 3, 1).numpy()
        pictures = [Image.fromarray((a * 255).round().astype("uint8")) for a in array]
    for got, want, flagged in zip(pictures, raw, expected, strict=True):
        assert is_black(got) if flagged else np.array_equal(pixels(got), pixels(want))


def test_sdxl_tuple_output_and_latents(sdxl_path: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    checker = PolicySafetyChecker(policy="llavaguard", backend="static", backend_options=UNSAFE)
    images, flags = checker.moderate_output(pipe(**call_kwargs(return_dict=False)))
    assert flags == [True] and is_black(images[0])
    latents = pipe(**call_kwargs(output_type="latent"))
    with pytest.raises(PolicyEngineError, match="latents cannot be judged"):
        checker.moderate_output(latents)


# -- the checker alone ---------------------------------------------------------------------


def test_numpy_images_in_0_1_as_older_pipelines_pass_them() -> None:
    """Pipelines that decode with `decode_latents` pass N x H x W x C floats in [0, 1]."""
    images = np.stack([np.asarray(red_image(v), dtype=np.float32) / 255 for v in (0.9, 0.1)])
    with colour_host() as host:
        checker = PolicySafetyChecker(policy="llavaguard", backend="colour", host=host)
        out, flags = checker(images=images, clip_input=None)
    assert flags == [True, False]
    assert not out[0].any()
    assert np.array_equal(out[1], images[1])
    assert images[0].any()  # the caller's array is not changed in place


def test_a_tensor_in_minus_1_1_is_judged_denormalized() -> None:
    """The VAE's output is in [-1, 1]: a red image must be judged red, not clipped."""
    unit = torch.from_numpy(np.asarray(red_image(0.9), dtype=np.float32) / 255)
    signed = (unit.permute(2, 0, 1) * 2 - 1)[None]
    with colour_host() as host:
        checker = PolicySafetyChecker(
            policy="llavaguard", backend="colour", host=host, unsafe_default="allow"
        )
        out, flags = checker(images=signed, clip_input=None)
    assert flags == [True]
    assert checker.last_treatments == ["allow"]
    assert torch.allclose(out[0], unit.permute(2, 0, 1), atol=1e-6)  # now in [0, 1]


def decision(rating: str | None, *actions: str) -> Decision:
    verdict = Verdict(rating=rating, policy_id="p", policy_version="1", policy_hash="h")  # type: ignore[arg-type]
    made = Decision(verdict=verdict)
    for name in actions:
        made.add_action(name, by="test")
    return made


@pytest.mark.parametrize(
    ("rating", "actions", "treated", "flagged"),
    [
        (None, ("allow",), "block", True),  # an error is never shown
        ("Unsafe", (), "block", True),
        ("Unsafe", ("escalate", "block"), "block", True),
        ("Unsafe", ("blur", "block"), "block", True),  # block wins
        ("Unsafe", ("blur",), "blur", True),
        ("Unsafe", ("allow",), "allow", True),
        ("Safe", ("blur",), "blur", True),
        ("Safe", ("human_review",), "allow", False),
        ("Safe", (), "allow", False),
    ],
)
def test_treatment_follows_the_actions(
    rating: str | None, actions: tuple[str, ...], treated: str, flagged: bool
) -> None:
    made = decision(rating, *actions)
    assert treatment(made) == treated
    assert is_flagged(made, treatment(made)) is flagged


def test_a_shared_engine_is_not_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine("llavaguard", "static") as engine:
        closed: list[bool] = []
        monkeypatch.setattr(engine, "close", lambda: closed.append(True))
        with PolicySafetyChecker(engine) as checker:
            assert checker.engine is engine
        assert closed == []
    with pytest.raises(PolicyEngineError, match="not both"):
        PolicySafetyChecker(engine, policy="llavaguard")
    with pytest.raises(PolicyEngineError, match="a policy and a backend"):
        PolicySafetyChecker(policy="llavaguard")


# -- the documented example ----------------------------------------------------------------


@pytest.fixture
def example() -> Iterator[Any]:
    def run(*args: str) -> list[dict[str, Any]]:
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "diffusers_example.py"), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    yield run


def test_the_documented_example_runs(example: Any) -> None:
    blocked = example()
    assert [(r["nsfw_content_detected"], r["treatment"], r["actions"]) for r in blocked] == [
        (True, "block", ["block"])
    ] * 2
    blurred = example("--rating", "Safe", "--p-unsafe", "0.4")
    assert [(r["rating"], r["treatment"]) for r in blurred] == [("Safe", "blur")] * 2
    shown = example("--rating", "Safe", "--p-unsafe", "0.05")
    assert [(r["nsfw_content_detected"], r["actions"]) for r in shown] == [(False, [])] * 2
