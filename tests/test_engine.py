"""The engine end to end with the built-in static backend and real images."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from policy_engine import (
    Backend,
    BackendError,
    Batch,
    Capabilities,
    Decision,
    Generation,
    PolicyEngineError,
    PolicyError,
    PostProcessor,
    StepContext,
    get_host,
    hookimpl,
    load_policy,
)
from policy_engine.engine import Engine
from policy_engine.policy import PostprocessStep


def png(color: str = "red", size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png())
    return path


def test_assess_with_static_backend(image_file: Path) -> None:
    engine = Engine("llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"})
    decision = engine.assess(image_file)
    verdict = decision.verdict
    assert verdict.ok
    assert (verdict.rating, verdict.category_id, verdict.category_name) == (
        "Unsafe",
        "O2",
        "Violence, Harm, or Cruelty",
    )
    assert verdict.source == str(image_file)
    assert verdict.policy_hash == engine.compiled.hash
    assert verdict.model == "static"
    assert verdict.p_unsafe == 1.0
    assert '"rating": "Unsafe"' in (verdict.raw or "")
    assert set(verdict.timings) >= {"decode_image", "generate"}


def _children(**options: Any) -> Engine:
    return Engine("children-platform", "static", backend_options=options)


def test_children_platform_escalates_self_harm_then_blocks() -> None:
    decision = _children(rating="Unsafe", category="O7").assess(png())
    assert [(a.name, a.params) for a in decision.actions] == [
        ("escalate", {"queue": "safeguarding", "priority": "urgent"}),
        ("block", {}),
    ]
    assert [a.by for a in decision.actions] == [
        "children-moderation:safeguarding",
        "children-moderation:block-unsafe",
    ]
    assert [t.message for t in decision.trace] == [
        "rule 'safeguarding': matched (category O7) -> escalate queue=safeguarding priority=urgent",
        "rule 'block-unsafe': matched (rating Unsafe) -> block",
        "rule 'blur-borderline': no match (rating Unsafe not Safe)",
        "rule 'review-failures': no match (verdict is not an error)",
    ]


def test_children_platform_blocks_other_unsafe_and_allows_safe() -> None:
    blocked = _children(rating="Unsafe", category="O3").assess(png())
    assert [a.name for a in blocked.actions] == ["block"]
    assert blocked.verdict.severity == "critical"  # raised from llavaguard's "high"
    safe = _children(rating="Safe").assess(png())
    assert safe.actions == []
    assert [t.message for t in safe.trace][-1] == "no rule matched; no default"
    assert all("no match" in t.message for t in safe.trace[:-1]), safe.trace


def test_children_platform_blurs_safe_verdicts_the_model_was_unsure_of() -> None:
    unsure = _children(rating="Safe", p_unsafe=0.35).assess(png())
    assert [(a.name, a.params) for a in unsure.actions] == [
        ("blur", {"reason": "the model was unsure this image is safe"})
    ]
    sure = _children(rating="Safe", p_unsafe=0.29).assess(png())
    assert sure.actions == []


def test_children_platform_sends_failed_assessments_to_review(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(png()[:40])
    decision = _children(rating="Safe").assess(broken)
    assert decision.rating is None
    assert decision.verdict.error is not None and decision.verdict.error.kind == "image"
    assert [(a.name, a.params) for a in decision.actions] == [
        ("human_review", {"queue": "moderation", "priority": "high"})
    ]


def test_health_platform_routes_unsafe_to_clinical_review() -> None:
    engine = Engine(
        "health-platform", "static", backend_options={"rating": "Unsafe", "category": "O3"}
    )
    assert [(a.name, a.params.get("queue")) for a in engine.assess(png()).actions] == [
        ("human_review", "clinical-review")
    ]
    assert engine.policy.exceptions["O4"].status.value == "non-violating"


def test_metadata_reaches_post_processors() -> None:
    policy = load_policy("llavaguard").model_copy(
        update={
            "postprocess": [
                PostprocessStep(
                    name="escalate",
                    params={
                        "metadata": {"audience": "minors"},
                        "action": "blur",
                        "ratings": ["Safe", "Unsafe"],
                    },
                )
            ]
        }
    )
    engine = Engine(policy, "static")
    assert [a.name for a in engine.assess(png(), {"audience": "minors"}).actions] == ["blur"]
    assert engine.assess(png(), {"audience": "adults"}).actions == []
    decisions = list(
        engine.assess_many([png(), (png(), {"audience": "x"})], metadata={"audience": "minors"})
    )
    assert [len(d.actions) for d in decisions] == [1, 0]
    assert decisions[0].metadata == {"audience": "minors"}


class _Recorder(PostProcessor):
    """Appends its name to a shared log, to observe ordering."""

    log: list[str] = []

    def __call__(self, decision: Decision, context: StepContext) -> None:
        self.log.append(self.name)
        decision.note(self.name, "ran")


class _First(_Recorder):
    name = "test-first"


class _Second(_Recorder):
    name = "test-second"


class _Broken(PostProcessor):
    name = "test-broken"

    def __call__(self, decision: Decision, context: StepContext) -> None:
        raise RuntimeError("boom")


class _OrderPlugin:
    @hookimpl
    def register_postprocessors(self, register: Any) -> None:
        # Registration order deliberately differs from the policy's order.
        register(_First)
        register(_Second)
        register(_Broken)


@pytest.fixture
def order_plugin() -> Iterator[None]:
    host = get_host()
    host.register(_OrderPlugin(), name="test-order")
    try:
        yield
    finally:
        host.unregister("test-order")


def _with_steps(*names: str) -> Any:
    steps = [PostprocessStep(name=n) for n in names]
    return load_policy("llavaguard").model_copy(update={"postprocess": steps})


@pytest.mark.usefixtures("order_plugin")
def test_post_processors_run_in_policy_order_not_registration_order() -> None:
    _Recorder.log.clear()
    decision = Engine(_with_steps("test-second", "test-first"), "static").assess(png())
    assert _Recorder.log == ["test-second", "test-first"]
    assert [t.step for t in decision.trace] == ["test-second", "test-first"]


@pytest.mark.usefixtures("order_plugin")
def test_failing_post_processor_keeps_verdict_and_records_error() -> None:
    _Recorder.log.clear()
    engine = Engine(
        _with_steps("test-broken", "test-first"),
        "static",
        backend_options={"rating": "Unsafe", "category": "O1"},
    )
    decision = engine.assess(png())
    assert decision.rating == "Unsafe"
    assert decision.trace[0].error and "RuntimeError: boom" in decision.trace[0].message
    assert _Recorder.log == ["test-first"]  # the chain goes on
    assert not decision.ok


def test_assess_many_preserves_order_and_survives_bad_items(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(png())
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    items = [good, tmp_path / "missing.png", png("blue"), text, b"", good]
    decisions = list(Engine("llavaguard", "static").assess_many(items))
    assert [d.verdict.ok for d in decisions] == [True, False, True, False, False, True]
    assert decisions[1].verdict.source == str(tmp_path / "missing.png")
    assert all(d.rating is None for d in decisions if not d.verdict.ok)


class _BatchBackend(Backend):
    """A backend that records the batch sizes it is called with."""

    name = "test-batch"
    capabilities = Capabilities(json_schema=True, batching=True, max_batch_size=3)
    calls: list[int] = []
    fail: bool = False

    def generate(self, batch: Batch) -> list[Generation]:
        self.calls.append(len(batch))
        if self.fail:
            raise BackendError("server unreachable", retryable=True)
        text = '{"rating": "Safe", "category": "NA: None applying", "rationale": "ok"}'
        return [Generation(text=text, model="batch") for _ in batch]


def test_batches_follow_backend_capability() -> None:
    backend = _BatchBackend()
    backend.calls = []
    decisions = list(Engine("llavaguard", backend).assess_many([png()] * 7))
    assert backend.calls == [3, 3, 1]
    assert all(d.rating == "Safe" for d in decisions)
    backend.calls = []
    list(Engine("llavaguard", backend, batch_size=2).assess_many([png()] * 3))
    assert backend.calls == [2, 1]


class _OverlapBackend(Backend):
    """Records how many generate() calls run at once; `concurrent` says overlap helps."""

    name = "test-overlap"
    capabilities = Capabilities(batching=True, max_batch_size=2, concurrent=True)

    def __init__(self, concurrent: bool) -> None:
        super().__init__()
        self.capabilities = replace(self.capabilities, concurrent=concurrent)
        self.running = self.most = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=10)

    def generate(self, batch: Batch) -> list[Generation]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        if self.capabilities.concurrent:
            # two calls must meet here: only an engine that overlaps them gets past
            self.barrier.wait()
        with self.lock:
            self.running -= 1
        answer = {"rating": "Unsafe", "category": "O1: Hate, Humiliation, Harassment"}
        return [Generation(text=json.dumps(answer | {"rationale": "x"})) for _ in batch]


@pytest.mark.parametrize("concurrent", [True, False])
def test_a_concurrent_backend_gets_overlapping_calls_and_order_holds(concurrent: bool) -> None:
    backend = _OverlapBackend(concurrent)
    items = [(png(), {"n": n}) for n in range(8)]
    decisions = list(Engine("llavaguard", backend).assess_many(items))
    assert [d.metadata["n"] for d in decisions] == list(range(8))
    assert all(d.rating == "Unsafe" for d in decisions)
    assert backend.most == (2 if concurrent else 1)


def test_backend_fault_becomes_error_verdicts() -> None:
    backend = _BatchBackend()
    backend.calls, backend.fail = [], True
    decisions = list(Engine("llavaguard", backend).assess_many([png()] * 2))
    assert [d.verdict.error.kind if d.verdict.error else None for d in decisions] == [
        "backend",
        "backend",
    ]
    assert decisions[0].verdict.error is not None and decisions[0].verdict.error.retryable


def test_unparseable_output_is_error_not_safe() -> None:
    engine = Engine("llavaguard", "static", backend_options={"raw": "The image looks fine."})
    verdict = engine.assess(png()).verdict
    assert verdict.rating is None and verdict.error is not None
    assert verdict.error.kind == "output" and verdict.raw == "The image looks fine."


def test_score_mode() -> None:
    engine = Engine("llavaguard", "static", mode="score", backend_options={"p_unsafe": 0.7})
    verdict = engine.assess(png()).verdict
    assert (verdict.rating, verdict.p_unsafe, verdict.category_id) == ("Unsafe", 0.7, None)
    low = Engine(
        "llavaguard", "static", mode="score", score_threshold=0.8, backend_options={"p_unsafe": 0.7}
    )
    assert low.assess(png()).verdict.rating == "Safe"


def test_score_mode_needs_a_scoring_backend() -> None:
    with pytest.raises(PolicyEngineError, match="cannot score"):
        Engine("llavaguard", _BatchBackend(), mode="score")


def test_verdict_mode_skips_rationale() -> None:
    verdict = Engine("llavaguard", "static", mode="verdict").assess(png()).verdict
    assert verdict.ok and verdict.rationale is None
    assert "rationale" not in (verdict.raw or "")


def test_async_twins_preserve_order() -> None:
    engine = Engine("llavaguard", "static", concurrency=4, batch_size=1)

    async def run() -> list[Decision]:
        single = await engine.aassess(png())
        assert single.verdict.ok
        return [d async for d in engine.aassess_many([png(), b"junk", png("green")])]

    decisions = asyncio.run(run())
    assert [d.verdict.ok for d in decisions] == [True, False, True]


def test_unknown_backend_lists_installed() -> None:
    with pytest.raises(PolicyEngineError, match=r"unknown backend .nope.; installed: .*static"):
        Engine("llavaguard", "nope")


def test_bad_backend_option_is_a_clear_error() -> None:
    with pytest.raises(PolicyEngineError, match="backend 'static': option rating: "):
        Engine("llavaguard", "static", backend_options={"rating": "Maybe"})
    with pytest.raises(PolicyEngineError, match=r"option temprature: unknown option \(options: "):
        Engine("llavaguard", "static", backend_options={"temprature": 0.2})


def test_policy_built_in_code_is_checked_like_a_file() -> None:
    policy = _with_steps("no-such-step")
    with pytest.raises(PolicyError, match=r"postprocess\[0\]\.name: unknown post-processor"):
        Engine(policy, "static")
    bad = load_policy("llavaguard").model_copy(
        update={"postprocess": [PostprocessStep(name="escalate", params={"categories": ["O42"]})]}
    )
    with pytest.raises(PolicyError, match="unknown category 'O42'"):
        Engine(bad, "static")


class _ShortBackend(Backend):
    """Breaks the contract: one answer, whatever the number of requests."""

    name = "test-short"
    capabilities = Capabilities(batching=True, max_batch_size=4)

    def generate(self, batch: Batch) -> list[Generation]:
        return [Generation(text="{}")]


def test_wrong_answer_count_is_an_error_for_every_item_sync_and_async() -> None:
    engine = Engine("llavaguard", _ShortBackend())

    async def run() -> list[Decision]:
        return [d async for d in engine.aassess_many([png(), png()])]

    for decisions in (list(engine.assess_many([png(), png()])), asyncio.run(run())):
        assert len(decisions) == 2
        for decision in decisions:
            assert decision.verdict.error is not None
            assert "returned 1 answers for 2 images" in decision.verdict.error.message
            assert "decode_image" not in decision.metadata


class _OutOfMemory(Backend):
    """Raises what a CUDA backend raises when a batch does not fit: not a BackendError."""

    name = "test-oom"
    capabilities = Capabilities(batching=True, max_batch_size=2)

    def generate(self, batch: Batch) -> list[Generation]:
        if len(batch) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB at /secret/path")
        return [Generation(text=SAFE_ANSWER)]


SAFE_ANSWER = '{"rating": "Safe", "category": "NA: None applying", "rationale": "ok"}'


def test_an_unexpected_backend_exception_is_an_error_verdict_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Engine("llavaguard", _OutOfMemory())
    decisions = list(engine.assess_many([png(), png(), png()]))  # batches of 2, then 1
    assert [d.verdict.ok for d in decisions] == [False, False, True]
    error = decisions[0].verdict.error
    assert error is not None and error.kind == "backend" and not error.retryable
    assert error.message == "backend 'test-oom' failed unexpectedly: RuntimeError (see the log)"
    assert "/secret/path" not in error.message  # details go to the log, not into verdicts
    assert "CUDA out of memory" in caplog.text
    assert decisions[0].rating is None  # never a silent Safe

    async def run_async() -> list[Decision]:
        return [d async for d in engine.aassess_many([png(), png()])]

    assert [d.verdict.ok for d in asyncio.run(run_async())] == [False, False]


class _ThreadRecorder(Backend):
    """Records which thread each generate() call ran on."""

    name = "test-threads"
    capabilities = Capabilities(batching=True, max_batch_size=2)

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def generate(self, batch: Batch) -> list[Generation]:
        self.threads.append(threading.current_thread().name)
        answer = {"rating": "Safe", "category": "NA: None applying", "rationale": "x"}
        return [Generation(text=json.dumps(answer)) for _ in batch]


def test_an_in_process_backend_answers_async_calls_on_its_one_call_thread() -> None:
    """torch keeps per-thread state (OpenMP teams): an in-process backend's async calls all
    run on its own call thread, not round the event loop's shared worker threads."""
    backend = _ThreadRecorder()
    engine = Engine("llavaguard", backend, concurrency=4)

    async def many() -> list[str | None]:
        return [d.rating async for d in engine.aassess_many([png()] * 16)]

    assert asyncio.run(many()) == ["Safe"] * 16
    assert backend.threads == ["policy-engine-test-threads_0"] * 8
    backend.close()  # the call thread goes with the backend; a reload starts another
    assert asyncio.run(many()) == ["Safe"] * 16
    assert set(backend.threads) == {"policy-engine-test-threads_0"}
