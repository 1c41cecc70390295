"""The sglang backend against servers that are not a well-configured SGLang: strict OpenAI-style
servers, a server that ignores the schema or answers in prose, vLLM, a closed prefill, and a
server that fails while the backend starts (tests/openai_servers.py, tests/sglang_server.py)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai_servers import OPENAI_FIELDS, TRANSFORMERS_FIELDS, OpenAIStyleServer
from PIL import Image
from policy_engine.backends import scores
from sglang_server import FakeSGLang, Fault
from support import run_cli

from policy_engine import Engine, get_host
from policy_engine.errors import BackendError
from policy_engine.loader import load_policy

FAST = {"backoff": 0.01, "backoff_max": 0.05}
LOGGER = "policy_engine.backends.sglang"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index in range(4):
        path = folder / f"{index}.png"
        Image.new("RGB", (32 + index, 24), (index * 60, 90, 200 - index * 40)).save(path)
        paths.append(path)
    return paths


def engine(url: str, mode: str, transport: str = "openai", **options: Any) -> Engine:
    return Engine(
        "llavaguard",
        "sglang",
        mode=mode,  # type: ignore[arg-type]
        backend_options={"url": url, "transport": transport, **options},
    )


def warnings_about(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and words in r.getMessage()
    ]


@pytest.fixture
def openai_server() -> Iterator[OpenAIStyleServer]:
    with OpenAIStyleServer("openai") as server:
        yield server


# -- strict servers ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_a_strict_openai_style_server_gets_openai_fields_only(
    openai_server: OpenAIStyleServer, images: list[Path], mode: str
) -> None:
    """OpenAI's API refuses unknown arguments (400): no top_k, max_tokens as the budget."""
    with engine(openai_server.url, mode) as e:
        decisions = list(e.assess_many(images))
    assert all(d.verdict.ok for d in decisions), [d.verdict.error for d in decisions]
    assert openai_server.statuses == {200: len(images)}
    for body in openai_server.bodies:
        assert set(body) <= OPENAI_FIELDS
        assert body["max_tokens"] == 500 and "top_k" not in body
        assert body["response_format"]["type"] == "json_schema"


def test_score_mode_where_no_prefill_can_continue_is_one_clear_error(
    openai_server: OpenAIStyleServer, images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with engine(openai_server.url, "score") as e:
        decisions = list(e.assess_many(images))
    assert openai_server.bodies == []  # nothing sent that could only fail
    messages = {d.verdict.error.message for d in decisions if d.verdict.error}
    assert len(decisions) == len(images) and len(messages) == 1
    [message] = messages
    assert "continue_final_message" in message and "-o server=sglang|vllm" in message
    assert "an OpenAI-compatible server" in message
    assert all(d.verdict.p_unsafe is None for d in decisions)
    assert len(warnings_about(caplog, "continue_final_message")) == 1


def test_transformers_serve_is_sent_nothing_it_refuses(images: list[Path]) -> None:
    """transformers serve answers 422 to any field it does not know; it ignores the schema, and
    a LlavaGuard checkpoint still answers full verdicts in its trained layout."""
    with (
        OpenAIStyleServer("transformers-serve", answers="layout") as server,
        engine(server.url, "full") as e,
    ):
        decisions = list(e.assess_many(images))
    assert all(d.verdict.ok for d in decisions), [d.verdict.error for d in decisions]
    assert server.statuses == {200: len(images)}
    assert all(set(body) <= TRANSFORMERS_FIELDS for body in server.bodies)


@pytest.mark.parametrize("answers", ["free", "layout"])
def test_an_ignored_schema_is_named_once_and_in_every_error(
    images: list[Path], caplog: pytest.LogCaptureFixture, answers: str
) -> None:
    """Verdict mode asks for no rationale; a server that ignores response_format writes one (or
    anything): every item says why, with the fix, and the log says it once."""
    kind: Any = answers
    with (
        OpenAIStyleServer("transformers-serve", answers=kind) as server,
        engine(server.url, "verdict") as e,
    ):
        decisions = list(e.assess_many(images))
    for decision in decisions:
        error = decision.verdict.error
        assert error is not None and not error.retryable
        assert f"{server.url} seems to ignore response_format" in error.message
        assert "SGLang or vLLM" in error.message
        assert decision.verdict.raw  # the reply is kept
    assert len(warnings_about(caplog, "seems to ignore response_format")) == 1


@pytest.mark.parametrize("answers", ["prose", "array"])
def test_a_reply_outside_the_schema_is_never_read_as_a_rating(
    images: list[Path], answers: str
) -> None:
    """'The answer format is {"rating": "Safe", …}. My assessment: … Unsafe' is not Safe, nor is
    the first object of an array. (Needs the strict reply parser of policy_engine/verdict.py.)"""
    kind: Any = answers
    with (
        OpenAIStyleServer("transformers-serve", answers=kind) as server,
        engine(server.url, "full") as e,
    ):
        decisions = list(e.assess_many(images))
    for decision in decisions:
        assert not decision.verdict.ok and decision.verdict.rating is None
        assert decision.verdict.error is not None
        assert "seems to ignore response_format" in decision.verdict.error.message
        assert decision.verdict.raw is not None and "Safe" in decision.verdict.raw


def test_vllm_gets_its_own_fields_and_scores(images: list[Path]) -> None:
    """vLLM takes top_k and continue_final_message, and refuses the latter beside its default
    add_generation_prompt=true: both are sent, add_generation_prompt false."""
    with OpenAIStyleServer("vllm") as server:
        with engine(server.url, "score") as e:
            scored = list(e.assess_many(images))
        with engine(server.url, "verdict", greedy=False) as e:
            answered = list(e.assess_many(images))
    assert server.statuses == {200: 2 * len(images)}
    assert all(d.verdict.ok and d.verdict.p_unsafe is not None for d in scored)
    assert len({d.verdict.p_unsafe for d in scored}) > 1
    assert all(d.verdict.ok for d in answered)
    score_body, answer_body = server.bodies[0], server.bodies[-1]
    assert (score_body["continue_final_message"], score_body["add_generation_prompt"]) == (
        True,
        False,
    )
    assert score_body["max_completion_tokens"] == 1
    assert answer_body["top_k"] == 50 and "continue_final_message" not in answer_body


def test_the_server_option_overrides_what_is_asked(images: list[Path]) -> None:
    """-o server=openai sends OpenAI's fields only, even to SGLang."""
    with FakeSGLang() as server:
        with engine(server.url, "verdict", server="openai") as e:
            assert all(d.verdict.ok for d in e.assess_many(images[:2]))
        bodies = [r.body for r in server.received]
    assert bodies and all(b is not None and "top_k" not in b and "max_tokens" in b for b in bodies)
    assert server.gets["/server_info"] == 0


# -- closed prefills ---------------------------------------------------------------------------
def test_a_template_that_closes_the_prefill_is_refused_before_sending(
    images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """SGLang says (/server_info) it runs --chat-template chatml-llava: score mode over openai
    could only read a closed turn, so it is refused; the native transport renders the open turn
    itself and scores."""
    with FakeSGLang(chat_template="chatml-llava") as server:
        with engine(server.url, "score") as e:
            refused = list(e.assess_many(images))
        assert server.counts["/v1/chat/completions"] == 0
        with engine(server.url, "score", "native") as e:
            scored = list(e.assess_many(images))
    for decision in refused:
        message = decision.verdict.error.message if decision.verdict.error else ""
        assert "--chat-template chatml-llava" in message and "--transport native" in message
        assert "--chat-template chatml-llava.jinja" in message
    assert len(warnings_about(caplog, "closes a prefilled assistant message")) == 1
    assert all(d.verdict.ok and d.verdict.p_unsafe is not None for d in scored)


def test_a_closed_prefill_gives_an_error_not_a_score(images: list[Path]) -> None:
    """Told only that it is SGLang (as behind a router), the backend sends the prefill; SGLang
    closes the turn, the ratings hold a sliver of the first token's probability, and the item is
    an error that names the likely cause, not a confident P(Unsafe)."""
    with FakeSGLang(chat_template="chatml-llava") as server:
        with engine(server.url, "score", server="sglang") as e:
            decisions = list(e.assess_many(images))
        prompts = list(server.prompts)
    assert len(prompts) == len(images)
    assert all(p.endswith('"rating": "<|im_end|>\n') for p in prompts)  # closed, as SGLang does
    for decision in decisions:
        assert decision.verdict.p_unsafe is None and decision.verdict.error is not None
        message = decision.verdict.error.message
        assert "below the floor of 0.5 (min_rating_mass)" in message
        assert "closed instead of continued" in message


def test_a_failed_score_answers_request_is_an_error_on_the_item(images: list[Path]) -> None:
    """score_answers: the answer came but its P(Unsafe) could not: an error, never an OK
    verdict without the P(Unsafe) its rules read."""
    with (
        FakeSGLang(chat_template="chatml-llava") as server,
        engine(server.url, "full", score_answers=True) as e,
    ):
        decisions = list(e.assess_many(images))
    for decision in decisions:
        assert not decision.verdict.ok and decision.verdict.error is not None
        message = decision.verdict.error.message
        assert message.startswith("score_answers: the answer came, but its P(Unsafe) did not")
        assert decision.verdict.raw is not None and '"rationale"' in decision.verdict.raw


def test_the_rating_mass_floor() -> None:
    compiled = get_host().compile(load_policy("llavaguard"))
    log = math.log
    confident = scores.score(compiled, [("Safe", log(0.6)), ("Unsafe", log(0.3))], 0.5, "m")
    assert confident.p_unsafe == pytest.approx(1 / 3) and confident.error is None
    pieces = [("S", log(0.2)), ("Un", log(0.4)), ("<|im_start|>", log(0.3))]  # 0.6 >= 0.5
    assert scores.score(compiled, pieces, 0.5, "m").p_unsafe == pytest.approx(2 / 3)
    closed = [("<|im_start|>", log(0.98)), ("Safe", log(1e-5)), ("Unsafe", log(1e-5))]
    sliver = scores.score(compiled, closed, 0.5, "m")
    assert sliver.p_unsafe is None and sliver.error is not None
    assert sliver.error.startswith("the two ratings hold 2e-05 of the first answer token's")
    assert "'<|im_start|>': 0.98" in sliver.error
    assert scores.score(compiled, closed, 1e-6, "m").p_unsafe == pytest.approx(0.5)
    assert scores.score(compiled, [], 0.5, "m").error is not None


# -- faults at start -----------------------------------------------------------------------------
def test_start_up_gets_are_retried(images: list[Path]) -> None:
    with FakeSGLang() as server:
        server.inject(Fault("503", path="/server_info"), Fault("drop", path="/server_info"))
        with engine(server.url, "verdict", **FAST) as e:
            assert e.assess(images[0]).verdict.ok
        assert server.gets["/server_info"] == 3


@pytest.mark.parametrize("transport", ["openai", "native"])
def test_a_lasting_5xx_at_start_is_a_fault_not_a_user_error(
    images: list[Path], transport: str
) -> None:
    path = "/server_info" if transport == "openai" else "/get_model_info"
    with FakeSGLang() as server:
        server.inject(Fault("500", path=path), times=20)
        with pytest.raises(BackendError, match="HTTP 500") as caught:
            engine(server.url, "verdict", transport, retries=2, **FAST).load()
        assert "gave up after 3 attempts" in str(caught.value)
        assert "needs an SGLang server" not in str(caught.value)
        if transport == "native":  # the look-up it could skip
            assert "-o chat_template=NAME" in str(caught.value)
        result = run_cli(
            "assess",
            str(images[0]),
            "-b",
            "sglang",
            "--url",
            server.url,
            "--transport",
            transport,
            *("-o", "retries=1", "-o", "backoff=0.01"),
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "HTTP 500" in result.stderr
