"""The transformers backend on the tiny random-weight checkpoints, through the hub code path.

Random weights give meaningless verdicts; what is tested is that constrained decoding makes
every one of them a valid verdict in the trained layout, that scores are probabilities that
agree with greedy ratings, and that batching changes nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytest.importorskip("transformers")
pytest.importorskip("llguidance")

from PIL import Image
from policy_engine.backends.tiny import tiny_model_path
from policy_engine.backends.transformers import TransformersBackend
from support import run_cli

from policy_engine import Engine, get_host
from policy_engine.errors import BackendUnavailableError, PolicyEngineError
from policy_engine.loader import load_policy
from policy_engine.verdict import Decision

CUSTOM = """\
extends: llavaguard
id: custom-categories
version: "1"
prompt_format: generic
output:
  extra_fields: [severity, categories]
categories:
  - id: C1
    name: 'Spoilers "and" quotes, é 漢字'
    severity: low
    should_not: [Reveal the plot of a film.]
    can: [Show a film poster.]
"""


@pytest.fixture(scope="module")
def backend(loaded_backend: Callable[..., TransformersBackend]) -> TransformersBackend:
    return loaded_backend(model="tiny-random", greedy=False)  # sampling: the hard case


@pytest.fixture(scope="module")
def greedy(loaded_backend: Callable[..., TransformersBackend]) -> TransformersBackend:
    return loaded_backend(model="tiny-random", greedy=True)


def varied_images(count: int = 50) -> list[Image.Image]:
    """Sizes from 1x1 to very wide and very tall, several PIL modes, noise and flat colour."""
    sizes = [
        (1, 1), (2, 2), (1, 500), (500, 1), (3000, 20), (20, 3000), (64, 64), (640, 480),
        (480, 640), (333, 77), (13, 1024), (1024, 13), (99, 100), (1600, 900), (5, 7),
    ]  # fmt: skip
    modes = ["RGB", "L", "RGBA", "P", "1", "CMYK", "I;16", "LA"]
    images = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        noise = Image.effect_noise((width, height), 20 + 7 * i).convert("RGB")
        flat = Image.new("RGB", (width, height), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        image = noise if i % 3 else flat
        mode = modes[i % len(modes)]
        images.append(image.convert(mode) if mode != "I;16" else image.convert("L").convert(mode))
    return images


def policies(tmp: Path) -> dict[str, Any]:
    path = tmp / "custom.yaml"
    path.write_text(CUSTOM, encoding="utf-8")
    return {
        "default": load_policy("llavaguard"),
        "with-exceptions": load_policy("children-platform"),
        "custom-categories": load_policy(str(path)),
    }


def check_answer(decision: Decision, engine: Engine, mode: str) -> None:
    verdict = decision.verdict
    assert verdict.ok, (verdict.error, verdict.raw)
    raw = verdict.raw
    assert raw is not None
    answer = json.loads(raw)
    jsonschema.validate(answer, engine.compiled.schema_for(mode))  # type: ignore[arg-type]
    assert engine.compiled.layout_for(mode).dumps(answer) == raw  # type: ignore[arg-type]
    assert verdict.p_unsafe is not None and 0.0 <= verdict.p_unsafe <= 1.0


@pytest.mark.parametrize("name", ["default", "with-exceptions", "custom-categories"])
@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_every_answer_is_a_valid_verdict_in_the_trained_layout(
    backend: TransformersBackend, tmp_path: Path, name: str, mode: str
) -> None:
    policy = policies(tmp_path)[name]
    # a short budget keeps the suite fast and exercises closing the answer in time
    engine = Engine(policy, backend, mode=mode, batch_size=8, max_new_tokens=96)  # type: ignore[arg-type]
    decisions = list(engine.assess_many(varied_images(50)))
    assert len(decisions) == 50
    for decision in decisions:
        check_answer(decision, engine, mode)
    ratings = {d.rating for d in decisions}
    assert ratings <= {"Safe", "Unsafe"}


def test_full_budget_answers_are_valid(backend: TransformersBackend) -> None:
    """With the policy's own budget (500 tokens) a rambling model still closes its answer."""
    engine = Engine("llavaguard", backend, mode="full", batch_size=4)
    for decision in engine.assess_many(varied_images(4)):
        check_answer(decision, engine, "full")


def test_scores_are_probabilities_and_agree_with_greedy_ratings(
    greedy: TransformersBackend,
) -> None:
    images = varied_images(12)
    scorer = Engine("llavaguard", greedy, mode="score")
    judge = Engine("llavaguard", greedy, mode="verdict", batch_size=4)
    scored = list(scorer.assess_many(images))
    judged = list(judge.assess_many(images))
    labels = {c.id for c in scorer.compiled.policy.categories}  # after Unsafe: a violated one
    for score, verdict in zip(scored, judged, strict=True):
        p = score.verdict.p_unsafe
        assert p is not None and 0.0 <= p <= 1.0
        category_scores = score.verdict.category_scores
        assert category_scores is not None and set(category_scores) == labels
        assert all(0.0 <= v <= 1.0 for v in category_scores.values())
        assert math.isclose(sum(category_scores.values()), 1.0, abs_tol=1e-5)
        assert score.verdict.rating == ("Unsafe" if p >= 0.5 else "Safe")
        # the verdict mode reads the same probability at its rating step, and greedy follows it
        assert verdict.verdict.p_unsafe == pytest.approx(p, abs=1e-4)
        assert verdict.verdict.rating == ("Unsafe" if p >= 0.5 else "Safe")


def label_sequences(backend: TransformersBackend, compiled: Any) -> dict[str, list[int]]:
    """Each category id's continuation tokens after the prefix: 'Unsafe", "category": "<label>"'."""
    return {
        category_id: backend.tokenizer.encode(
            compiled.continuation("Unsafe", label), add_special_tokens=False
        )
        for label, category_id in compiled.labels.items()
        if label in compiled.unsafe_labels  # after "Unsafe", only a violated category
    }


def branch_product(
    sequences: dict[str, list[int]], ids: list[int], logits: Any, start: int
) -> float:
    """The chance of `ids` among `sequences`: at each token where they branch, the softmax over
    the branches' tokens (logits of an uncached pass whose continuation begins at `start`)."""
    prob = 1.0
    for j, token in enumerate(ids):
        branches = sorted({o[j] for o in sequences.values() if o[:j] == ids[:j]})
        if len(branches) > 1:
            row = logits[start - 1 + j, branches].softmax(-1)
            prob *= float(row[branches.index(token)])
    return prob


def test_category_scores_equal_a_full_recomputation(greedy: TransformersBackend) -> None:
    """The KV-cache walk over the label trie gives what scoring each label from scratch gives.

    The score of a label is the chance that decoding constrained to the labels picks it: at
    each token where the labels' tokenizations branch, the softmax over the branches' tokens.
    Here each label's sequence is run in one uncached forward pass instead.
    """
    import torch

    image = varied_images(2)[1]
    compiled = get_host().compile(load_policy("llavaguard"))
    engine = Engine(compiled.policy, greedy, mode="score")
    walked = engine.assess(image).verdict.category_scores
    assert walked is not None
    batch = engine._batch([engine._prepare(image, None)])
    assert batch is not None
    inputs = greedy._inputs(batch, "score")
    start = inputs["input_ids"].shape[1]
    sequences = label_sequences(greedy, compiled)
    expected = {}
    with torch.inference_mode():
        for category_id, ids in sequences.items():
            full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
            batch = {**inputs, "input_ids": full, "attention_mask": torch.ones_like(full)}
            logits = greedy.model(**batch).logits[0].float()
            expected[category_id] = branch_product(sequences, ids, logits, start)
    assert math.isclose(sum(expected.values()), 1.0, abs_tol=1e-5)
    for category_id, value in expected.items():
        assert walked[category_id] == pytest.approx(value, abs=1e-4)


def assert_batched_equals_sequential(
    greedy: TransformersBackend, images: list[Image.Image], batch_size: int
) -> None:
    """Greedy answers (text and score) in batches equal those one image at a time."""
    batched = Engine("llavaguard", greedy, mode="full", batch_size=batch_size, max_new_tokens=48)
    single = Engine("llavaguard", greedy, mode="full", batch_size=1, max_new_tokens=48)
    together = [d.verdict for d in batched.assess_many(images)]
    alone = [d.verdict for d in single.assess_many(images)]
    assert all(v.ok for v in together + alone), [v.error for v in together + alone]
    assert [v.raw for v in together] == [v.raw for v in alone]
    for a, b in zip(together, alone, strict=True):
        assert a.p_unsafe == pytest.approx(b.p_unsafe, abs=1e-4)


def test_batched_greedy_equals_one_at_a_time(greedy: TransformersBackend) -> None:
    assert_batched_equals_sequential(greedy, varied_images(8), batch_size=8)


def test_grammar_cache_is_hit_on_the_second_call(backend: TransformersBackend) -> None:
    from policy_engine.backends import guidance

    guidance.clear_grammar_cache()
    engine = Engine("llavaguard", backend, mode="verdict")
    engine.assess(varied_images(1)[0])
    first = guidance.grammar_cache_info()
    assert (first.hits, first.misses) == (0, 1)
    engine.assess(varied_images(2)[1])
    second = guidance.grammar_cache_info()
    assert (second.hits, second.misses) == (1, 1)


def test_local_checkpoint_directory_loads_through_the_same_path(tiny_cache: Path) -> None:
    path = tiny_model_path("tiny-random-llava", cache_dir=tiny_cache)
    engine = Engine(
        "llavaguard-v1.0",
        "transformers",
        mode="verdict",
        backend_options={"model": str(path), "greedy": True},
    )
    decisions = list(engine.assess_many(varied_images(6)))
    for decision in decisions:
        check_answer(decision, engine, "verdict")
    assert decisions[0].verdict.model == str(path)


def test_missing_model_offline_names_the_fix(tiny_cache: Path) -> None:
    engine = Engine(
        "llavaguard",
        "transformers",
        backend_options={"model": "AIML-TUDA/no-such-checkpoint", "local_files_only": True},
    )
    with pytest.raises(BackendUnavailableError) as caught:
        engine.load()
    message = str(caught.value)
    assert "AIML-TUDA/no-such-checkpoint" in message
    assert "--model PATH" in message and "tiny-random" in message
    assert "\n" not in message


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    backend = TransformersBackend(model=str(tmp_path / "nope"))
    with pytest.raises(BackendUnavailableError, match="no checkpoint there"):
        backend.load()


def test_cli_offline_error_is_one_line(tiny_cache: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    result = run_cli(
        "assess", str(image), "-b", "transformers", "-m", "AIML-TUDA/no-such-checkpoint",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--model PATH" in lines[0]


def test_cli_tiny_random_says_its_verdicts_are_random(tiny_cache: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    result = run_cli(
        "assess", str(image), "-m", "tiny-random", "--mode", "verdict", "-o", "greedy=true",
        env={"HF_HUB_OFFLINE": "1", "POLICY_ENGINE_CACHE": str(tiny_cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr
    decision = json.loads(result.stdout)
    assert decision["verdict"]["model"] == "tiny-random (random weights)"
    assert decision["verdict"]["rating"] in ("Safe", "Unsafe")


def test_missing_extra_names_the_install_command() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # makes `import torch` fail as if it were not installed
        "from policy_engine.backends.transformers import TransformersBackend\n"
        "from policy_engine.errors import BackendUnavailableError\n"
        "try:\n"
        "    TransformersBackend(model='tiny-random').load()\n"
        "except BackendUnavailableError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'policy-engine[transformers]'" in result.stdout, result.stderr


def test_options_are_validated_at_construction() -> None:
    with pytest.raises(PolicyEngineError, match="option temperature"):
        TransformersBackend(temperature=0)
    with pytest.raises(PolicyEngineError, match="option devise: unknown option"):
        TransformersBackend(devise="cpu")


def test_score_mode_names_the_most_likely_violated_category(greedy: TransformersBackend) -> None:
    policy = load_policy("llavaguard")
    images = varied_images(3)
    unsafe = Engine(policy, greedy, mode="score", score_threshold=0.0)
    safe = Engine(policy, greedy, mode="score", score_threshold=1.0 + 1e-9)
    for decision in unsafe.assess_many(images):
        verdict = decision.verdict
        scores = verdict.category_scores
        assert verdict.rating == "Unsafe" and scores is not None
        best = max((c.id for c in policy.categories), key=lambda c: scores[c])
        assert verdict.category_id == best
        assert verdict.category_name == policy.category(best).name
        assert verdict.severity == policy.category(best).severity
    for decision in safe.assess_many(images):
        assert (decision.rating, decision.category_id) == ("Safe", "NA")
        assert decision.severity is None


def test_children_platform_acts_on_model_verdicts_end_to_end(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """`policy-engine assess` with a model backend: the shipped rules turn verdicts into actions."""
    paths = []
    for i, image in enumerate(varied_images(4)):
        paths.append(tmp_path / f"{i}.png")
        image.convert("RGB").save(paths[-1])
    result = run_cli(
        "assess", *map(str, paths), "-p", "children-platform", "-m", "tiny-random",
        "--mode", "verdict", "-o", "greedy=true",
        env={"HF_HUB_OFFLINE": "1", "POLICY_ENGINE_CACHE": str(tiny_cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        decision = json.loads(line)
        verdict = decision["verdict"]
        expected = []
        if verdict["category_id"] == "O7":
            expected.append("escalate")
        if verdict["rating"] == "Unsafe":
            expected.append("block")
        elif verdict["p_unsafe"] >= 0.3:
            expected.append("blur")
        assert [a["name"] for a in decision["actions"]] == expected
        assert len(decision["trace"]) == 4  # one line per rule of the shipped policy


def test_hub_reachable_tells_an_open_port_from_a_closed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    from policy_engine.backends.transformers import hub_reachable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=2.0)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now
    assert not hub_reachable(timeout=2.0)


def test_unreachable_hub_fails_fast_without_hf_hub_offline(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without HF_HUB_OFFLINE huggingface_hub would retry for minutes; we look in the cache."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BackendUnavailableError, match="--model PATH"):
        TransformersBackend(model="AIML-TUDA/no-such-checkpoint").load()
    # the probe failed, so loading went to the cache only (no minutes of download retries)
    assert "the hub is unreachable; looking for" in caplog.text


def test_a_budget_too_small_for_a_whole_answer_is_raised_and_said_once(
    loaded_backend: Callable[..., TransformersBackend], caplog: pytest.LogCaptureFixture
) -> None:
    backend = loaded_backend(model="tiny-random", greedy=True, max_new_tokens=5)
    engine = Engine("llavaguard", backend, mode="verdict")
    for decision in engine.assess_many(varied_images(3)):
        check_answer(decision, engine, "verdict")  # whole answers despite 5 tokens asked for
    warnings = [m for r in caplog.records if "token budget 5 raised to" in (m := r.getMessage())]
    assert len(warnings) == 1 and "mode verdict" in warnings[0]
