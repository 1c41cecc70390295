"""The sglang backend against the loopback SGLang server (tests/sglang_server.py).

The transport and mode tests also run against a real SGLang server when
POLICY_ENGINE_SGLANG_URL points at one (its model must speak the LlavaGuard answer format);
fault injection needs the loopback server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from policy_engine.backends.chat_templates import (
    TEMPLATES,
    JinjaTemplate,
    guess_template,
    template_for,
)
from policy_engine.backends.http_client import normalize_url
from policy_engine.backends.sglang import SGLangBackend
from sglang_server import FakeSGLang, Fault
from support import run_cli

from policy_engine import Engine, get_host
from policy_engine.errors import BackendError, BackendUnavailableError, PolicyEngineError
from policy_engine.images import load_image
from policy_engine.loader import load_policy

REAL_URL = os.environ.get("POLICY_ENGINE_SGLANG_URL")
TRANSPORTS = ("openai", "native")
MODES = ("full", "verdict", "score")
FAST = {"backoff": 0.01, "backoff_max": 0.05}  # retries without waiting: faults are injected


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSGLang]:
    with FakeSGLang() as server:
        yield server


@pytest.fixture
def server(fake: FakeSGLang) -> FakeSGLang:
    fake.clear()
    return fake


@pytest.fixture(params=["loopback", "real"] if REAL_URL else ["loopback"])
def target(request: pytest.FixtureRequest, fake: FakeSGLang) -> str:
    """The server the functional tests talk to: the loopback one, and a real one if set."""
    fake.clear()
    return REAL_URL if request.param == "real" and REAL_URL else fake.url


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Images of several sizes, modes and formats, each different."""
    folder = tmp_path_factory.mktemp("images")
    specs = [
        ((64, 48), "RGB", "PNG"),
        ((1, 1), "L", "PNG"),
        ((300, 20), "RGBA", "PNG"),
        ((33, 77), "P", "GIF"),
        ((128, 128), "RGB", "JPEG"),
        ((20, 300), "CMYK", "JPEG"),
    ]
    paths = []
    for index, (size, mode, fmt) in enumerate(specs):
        image = Image.new("RGB", size, (index * 40 % 256, 255 - index * 30, index * 70 % 256))
        image.putpixel((0, 0), (index, index, index))
        path = folder / f"img{index}.{fmt.lower()}"
        image.convert(mode).save(path, format=fmt)
        paths.append(path)
    return paths


def engine(url: str | list[str], transport: str, mode: str = "full", **options: Any) -> Engine:
    return Engine(
        "llavaguard",
        "sglang",
        mode=mode,  # type: ignore[arg-type]
        backend_options={"url": url, "transport": transport, **options},
    )


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def posted(server: FakeSGLang, path: str) -> list[dict[str, Any]]:
    return [r.body for r in server.received if r.path == path and r.fault is None]


def sent_image(body: dict[str, Any]) -> str:
    """The data URL a request carried (requests run concurrently: match them by image)."""
    if "image_data" in body:
        return str(body["image_data"])
    return str(body["messages"][0]["content"][0]["image_url"]["url"])


def by_image(bodies: list[dict[str, Any]], paths: list[Path]) -> list[dict[str, Any]]:
    """The request bodies in the order of `paths`, one each."""
    found = {sent_image(body): body for body in bodies}
    assert len(found) == len(bodies) == len(paths)
    return [found[load_image(path).to_data_url("PNG")] for path in paths]


# -- every transport and mode ----------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", MODES)
def test_every_transport_and_mode_gives_valid_verdicts(
    target: str, transport: str, mode: str, images: list[Path]
) -> None:
    compiled = get_host().compile(load_policy("llavaguard"))
    with engine(target, transport, mode) as e:
        decisions = list(e.assess_many(images))
    assert [d.verdict.source for d in decisions] == [str(p) for p in images]
    for decision in decisions:
        verdict = decision.verdict
        assert verdict.ok, verdict.error
        assert verdict.rating in ("Safe", "Unsafe")
        assert verdict.policy_hash == compiled.hash
        if mode == "score":
            assert verdict.p_unsafe is not None and 0.0 <= verdict.p_unsafe <= 1.0
            assert verdict.rating == ("Unsafe" if verdict.p_unsafe >= 0.5 else "Safe")
        else:
            assert verdict.category_id in compiled.labels.values()
            assert (verdict.rationale is not None) == (mode == "full")


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_openai_requests_carry_the_compiled_schema_nested(
    server: FakeSGLang, mode: str, images: list[Path]
) -> None:
    compiled = get_host().compile(load_policy("llavaguard"))
    with engine(server.url, "openai", mode, greedy=False) as e:  # LlavaGuard's sampling
        list(e.assess_many(images[:2]))
    bodies = by_image(posted(server, "/v1/chat/completions"), images[:2])
    for body, path in zip(bodies, images[:2], strict=True):
        assert body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": compiled.schema_for(mode), "strict": True},
        }
        sampling = ("max_completion_tokens", "temperature", "top_p", "top_k")
        assert [body[key] for key in sampling] == [500, 0.2, 0.95, 50]  # top_k: SGLang takes it
        assert "max_tokens" not in body  # deprecated in SGLang's ChatCompletionRequest
        image_part, text_part = body["messages"][0]["content"]
        assert text_part == {"type": "text", "text": compiled.prompt}
        sent = decode_data_url(image_part["image_url"]["url"])
        assert sent.tobytes() == load_image(path).image.tobytes()  # lossless, as decoded
        assert body["model"] == server.model_path


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_native_requests_carry_template_schema_and_budget(
    server: FakeSGLang, mode: str, images: list[Path]
) -> None:
    compiled = get_host().compile(load_policy("llavaguard"))
    with engine(server.url, "native", mode, greedy=True, max_new_tokens=700) as e:
        list(e.assess_many(images[:2]))
    bodies = posted(server, "/generate")
    assert len(bodies) == 2
    for body in bodies:
        params = body["sampling_params"]
        assert isinstance(params["json_schema"], str)
        assert json.loads(params["json_schema"]) == compiled.schema_for(mode)
        assert params["max_new_tokens"] == 700
        assert params["temperature"] == 0.0 and "top_p" not in params
        assert body["text"] == TEMPLATES["chatml-llava"].render(compiled.prompt)
        assert body["text"].startswith("<|im_start|>system\nYou are a helpful assistant.")
        assert body["text"].endswith(compiled.prompt + "<|im_end|>\n<|im_start|>assistant\n")


def test_native_score_reads_the_first_tokens_top_logprobs(
    server: FakeSGLang, images: list[Path]
) -> None:
    """No /tokenize (SGLang's router has none): the first token's top logprobs, as text."""
    compiled = get_host().compile(load_policy("llavaguard"))
    with engine(server.url, "native", "score") as e:
        decisions = list(e.assess_many(images))
    assert server.counts["/tokenize"] == server.counts["/v1/tokenize"] == 0
    bodies = by_image(posted(server, "/generate"), images)
    prefix = compiled.layout_for("score").prefix()
    scores = []
    for body, decision in zip(bodies, decisions, strict=True):
        assert body["sampling_params"] == {"max_new_tokens": 1, "temperature": 1.0}
        assert (body["return_logprob"], body["return_text_in_logprobs"]) == (True, True)
        assert body["top_logprobs_num"] == 20 and "token_ids_logprob" not in body
        # the conversation with the prefix as the open assistant message, as SGLang renders it
        assert body["text"] == TEMPLATES["chatml-llava"].continued(compiled.prompt, prefix)
        assert body["text"].endswith("<|im_start|>assistant\n" + prefix)
        # replay the request: P(Unsafe) is the Unsafe share of the tokens that start a rating
        reply = post_json(server.url + "/generate", body)
        [top] = reply["meta_info"]["output_top_logprobs"]
        mass = {
            rating: sum(
                math.exp(lp)
                for lp, _, text in top
                if text and compiled.continuation(rating).startswith(text)
            )
            for rating in ("Safe", "Unsafe")
        }
        assert mass["Safe"] + mass["Unsafe"] >= 0.5
        expected = mass["Unsafe"] / (mass["Safe"] + mass["Unsafe"])
        assert decision.verdict.p_unsafe == pytest.approx(expected, rel=1e-9)
        scores.append(decision.verdict.p_unsafe)
    assert len(set(scores)) > 1  # the score follows the image


def test_openai_score_prefills_the_answer_and_reads_top_logprobs(
    server: FakeSGLang, images: list[Path]
) -> None:
    compiled = get_host().compile(load_policy("llavaguard"))
    with engine(server.url, "openai", "score") as e:
        decisions = list(e.assess_many(images))
    bodies = by_image(posted(server, "/v1/chat/completions"), images)
    scores = []
    for body, decision in zip(bodies, decisions, strict=True):
        assert body["messages"][-1] == {
            "role": "assistant",
            "content": compiled.layout_for("score").prefix(),
        }
        assert body["continue_final_message"] is True and "response_format" not in body
        assert "add_generation_prompt" not in body  # not a field of SGLang's request
        assert (body["max_completion_tokens"], body["temperature"], body["logprobs"]) == (
            1,
            1.0,
            True,
        )
        reply = post_json(server.url + "/v1/chat/completions", body)
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        mass = {
            rating: sum(
                math.exp(t["logprob"])
                for t in top
                if t["token"] and compiled.continuation(rating).startswith(t["token"])
            )
            for rating in ("Safe", "Unsafe")
        }
        expected = mass["Unsafe"] / (mass["Safe"] + mass["Unsafe"])
        assert decision.verdict.p_unsafe == pytest.approx(expected, rel=1e-9)
        scores.append(decision.verdict.p_unsafe)
    assert len(set(scores)) > 1
    # the server continued the prefilled turn: its prompt ends inside the answer
    assert all(prompt.endswith('"rating": "') for prompt in server.prompts)


def post_json(url: str, body: Any) -> Any:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as reply:
        return json.loads(reply.read())


def test_native_list_batches_keep_order_and_equal_single_requests(
    server: FakeSGLang, images: list[Path]
) -> None:
    with engine(server.url, "native", "verdict", greedy=True) as e:
        single = [d.verdict for d in e.assess_many(images)]
    server.clear()
    with engine(server.url, "native", "verdict", greedy=True, list_batch=4) as e:
        batched = [d.verdict for d in e.assess_many(images)]
    assert server.counts["/generate"] == 2  # 6 images: 4 + 2
    lists = posted(server, "/generate")
    assert sorted(len(b["text"]) for b in lists) == [2, 4]
    assert [(v.source, v.rating, v.category_id) for v in batched] == [
        (v.source, v.rating, v.category_id) for v in single
    ]


def test_the_async_api_shares_the_backend_loop(server: FakeSGLang, images: list[Path]) -> None:
    async def run() -> list[Any]:
        with engine(server.url, "native", "score") as e:
            return [d async for d in e.aassess_many(images * 3)]

    decisions = asyncio.run(run())
    assert [d.verdict.source for d in decisions] == [str(p) for p in images * 3]
    assert all(d.verdict.ok for d in decisions)
    assert server.counts["/generate"] == len(images) * 3


def test_the_cli_assesses_with_both_transports(target: str, images: list[Path]) -> None:
    for transport in TRANSPORTS:
        for mode in MODES:
            result = run_cli(
                "assess",
                *map(str, images[:2]),
                "--backend",
                "sglang",
                "--url",
                target,
                "--transport",
                transport,
                "--mode",
                mode,
            )
            assert result.returncode == 0, result.stderr
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            assert [d["verdict"]["source"] for d in lines] == [str(p) for p in images[:2]]
            assert all(d["verdict"]["rating"] in ("Safe", "Unsafe") for d in lines)


# -- throughput ------------------------------------------------------------------------------
def test_requests_overlap_up_to_the_concurrency_bound(images: list[Path]) -> None:
    with FakeSGLang(service_time=0.05) as server:
        with engine(server.url, "openai", "verdict", concurrency=4) as e:
            decisions = list(e.assess_many(images * 4))
        assert all(d.verdict.ok for d in decisions)
        assert 2 <= server.max_in_flight <= 4


def test_the_sync_api_keeps_many_requests_in_flight(images: list[Path]) -> None:
    with FakeSGLang(service_time=0.05) as server:
        with engine(server.url, "native", "score") as e:
            decisions = list(e.assess_many(images * 20))
        assert len(decisions) == 120 and all(d.verdict.ok for d in decisions)
        assert server.max_in_flight > 16


# -- faults ----------------------------------------------------------------------------------
FAULTS = [
    Fault("500"),
    Fault("503"),
    Fault("429", retry_after=0.2),
    Fault("drop"),
    Fault("malformed"),
    Fault("shape"),
    Fault("slow", delay=0.3),
    Fault("timeout", delay=5.0),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.kind)
def test_each_fault_is_absorbed_with_nothing_lost_or_duplicated(
    server: FakeSGLang, transport: str, fault: Fault, images: list[Path]
) -> None:
    path = "/v1/chat/completions" if transport == "openai" else "/generate"
    server.inject(Fault(fault.kind, path=path, retry_after=fault.retry_after, delay=fault.delay))
    items = [(p, {"n": i}) for i, p in enumerate(images * 2)]
    with engine(server.url, transport, "verdict", timeout=1.0, **FAST) as e:
        decisions = list(e.assess_many(items))
    assert [d.metadata["n"] for d in decisions] == list(range(len(items)))
    assert all(d.verdict.ok for d in decisions), [d.verdict.error for d in decisions]
    faulted = [r for r in server.received if r.fault]
    assert [r.fault for r in faulted] == [fault.kind]
    extra = 0 if fault.kind == "slow" else 1  # a slow answer is still an answer
    assert server.counts[path] == len(items) + extra


def test_retry_after_is_honoured(server: FakeSGLang, images: list[Path]) -> None:
    server.inject(Fault("429", path="/generate", retry_after=1))
    started = time.monotonic()
    with engine(server.url, "native", "verdict", **FAST) as e:
        decision = e.assess(images[0])
    assert decision.verdict.ok
    assert time.monotonic() - started >= 1.0  # not the 0.01 s backoff: the server's word


def test_a_request_that_keeps_failing_becomes_an_error_verdict(
    server: FakeSGLang, images: list[Path]
) -> None:
    server.inject(Fault("503", path="/generate"), times=3)
    with engine(server.url, "native", "verdict", retries=2, **FAST) as e:
        first = e.assess(images[0], {"n": 0})  # meets all three faults
        others = list(e.assess_many([(p, {"n": i}) for i, p in enumerate(images[1:3], 1)]))
    decisions = [first, *others]
    assert not first.verdict.ok and first.verdict.error is not None
    assert first.verdict.error.kind == "backend" and first.verdict.error.retryable
    assert "HTTP 503" in first.verdict.error.message
    assert "gave up after 3 attempts" in first.verdict.error.message
    assert all(d.verdict.ok for d in others)
    assert [d.metadata["n"] for d in decisions] == [0, 1, 2]


def test_the_deadline_bounds_a_request(server: FakeSGLang, images: list[Path]) -> None:
    server.inject(Fault("timeout", path="/generate", delay=10.0), times=10)
    with engine(server.url, "native", "verdict", deadline=1.0, **FAST) as e:
        decision = e.assess(images[0])
    assert decision.verdict.error is not None
    assert "deadline of 1s" in decision.verdict.error.message


def test_a_rejected_request_is_not_retried(server: FakeSGLang, images: list[Path]) -> None:
    # the qwen2-vl template has no "<image>" token: the server says 400, retrying cannot help
    with engine(server.url, "native", "verdict", chat_template="qwen2-vl", **FAST) as e:
        decisions = list(e.assess_many(images[:2]))
    for decision in decisions:
        assert decision.verdict.error is not None
        assert "HTTP 400" in decision.verdict.error.message
        assert "image" in decision.verdict.error.message
        assert not decision.verdict.error.retryable
    assert server.counts["/generate"] == 2


def test_a_truncated_answer_says_so(server: FakeSGLang, images: list[Path]) -> None:
    with engine(server.url, "openai", "full", max_new_tokens=20) as e:
        decision = e.assess(images[0])
    assert decision.verdict.error is not None
    assert "cut at the token budget (20 tokens)" in decision.verdict.error.message


# -- endpoints -------------------------------------------------------------------------------
def test_several_endpoints_share_the_load(images: list[Path]) -> None:
    with FakeSGLang(service_time=0.02) as a, FakeSGLang(service_time=0.02) as b:
        for balance in ("least-in-flight", "round-robin"):
            a.clear()
            b.clear()
            with engine([a.url, b.url], "openai", "verdict", balance=balance) as e:
                decisions = list(e.assess_many(images * 4))
            assert all(d.verdict.ok for d in decisions)
            served = (a.counts["/v1/chat/completions"], b.counts["/v1/chat/completions"])
            assert sum(served) == 24 and min(served) >= 6, (balance, served)


def test_an_endpoint_that_dies_is_routed_around(images: list[Path]) -> None:
    with FakeSGLang() as a:
        b = FakeSGLang().start()
        with engine([a.url, b.url], "openai", "verdict", **FAST) as e:
            e.load()
            b.stop()  # after the health check
            decisions = list(e.assess_many(images * 2))
        assert all(d.verdict.ok for d in decisions), [d.verdict.error for d in decisions]
        assert a.counts["/v1/chat/completions"] == 12


def test_an_unhealthy_endpoint_is_skipped_with_a_warning(
    server: FakeSGLang, images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    dead = "http://127.0.0.1:9"
    with engine([dead, server.url], "openai", "verdict") as e:
        decisions = list(e.assess_many(images))
    assert all(d.verdict.ok for d in decisions)
    assert f"{dead} is not healthy (connection refused)" in caplog.text


def test_no_healthy_endpoint_is_a_backend_fault(images: list[Path]) -> None:
    """An unreachable server is a fault (exit 1), tried again with the requests' backoff."""
    with pytest.raises(BackendError, match="no SGLang server answers /health") as caught:
        engine("http://127.0.0.1:9", "openai", retries=2, **FAST).load()
    assert "after 3 attempts" in str(caught.value) and caught.value.retryable
    result = run_cli(
        "assess",
        str(images[0]),
        "-b",
        "sglang",
        "--url",
        "http://127.0.0.1:9/v1/",
        "-o",
        "retries=0",
    )
    assert result.returncode == 1
    assert result.stderr == (
        "error: no SGLang server answers /health (http://127.0.0.1:9: connection refused)\n"
    )


def test_health_probes_the_endpoints_after_load(images: list[Path]) -> None:
    with FakeSGLang() as a, FakeSGLang() as b:
        backend = SGLangBackend(url=[a.url, b.url])
        assert backend.health() == "the sglang backend is not loaded"
        with Engine("llavaguard", backend) as e:
            e.load()
            assert backend.health() is None
            a.stop()
            assert backend.health() is None  # one endpoint answering is enough
            b.stop()
            problem = backend.health()
            assert problem is not None and problem.startswith("no SGLang server answers /health")
            assert f"{a.url}: connection refused" in problem
            assert f"{b.url}: connection refused" in problem


def test_options_are_checked_before_anything_connects() -> None:
    with pytest.raises(PolicyEngineError, match="no server URL"):
        SGLangBackend()
    with pytest.raises(PolicyEngineError, match="'ftp://x' is not an http"):
        SGLangBackend(url="ftp://x")
    with pytest.raises(PolicyEngineError, match="option transport"):
        SGLangBackend(url="http://h:1", transport="grpc")
    backend = SGLangBackend(url="http://a:1/v1/, http://b:2/")
    assert backend.urls == ["http://a:1", "http://b:2"]
    assert normalize_url("https://h/prefix/v1") == "https://h/prefix"


# -- the API key -----------------------------------------------------------------------------
def test_the_api_key_comes_from_the_environment_and_is_never_shown(
    images: list[Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "sk-test-0123456789abcdef"
    with FakeSGLang(api_key=secret) as server:
        monkeypatch.delenv("POLICY_ENGINE_SGLANG_API_KEY", raising=False)
        with pytest.raises(BackendUnavailableError) as refused:  # the info routes need the key
            engine(server.url, "openai", "verdict", model="m").load()
        assert "HTTP 401" in str(refused.value)
        assert "$POLICY_ENGINE_SGLANG_API_KEY" in str(refused.value)
        denied = run_cli("assess", str(images[0]), "-b", "sglang", "--url", server.url)
        assert denied.returncode == 2 and "$POLICY_ENGINE_SGLANG_API_KEY" in denied.stderr

        monkeypatch.setenv("POLICY_ENGINE_SGLANG_API_KEY", secret)
        server.inject(Fault("500", path="/v1/chat/completions"), times=2)
        with engine(server.url, "openai", "verdict", retries=1, **FAST) as e:
            failed = e.assess(images[0])
            ok = e.assess(images[1])
        assert ok.verdict.ok
        assert failed.verdict.error is not None and "HTTP 500" in failed.verdict.error.message
        assert server.received[-1].headers["Authorization"] == f"Bearer {secret}"
        shown = failed.model_dump_json() + ok.model_dump_json() + repr(e.backend.options)
        result = run_cli(
            "assess",
            str(images[0]),
            "-b",
            "sglang",
            "--url",
            server.url,
            env={"POLICY_ENGINE_SGLANG_API_KEY": secret},
        )
        assert result.returncode == 0, result.stderr
        shown += result.stdout + result.stderr + denied.stderr + capsys.readouterr().err
        shown += str(refused.value)
        assert secret not in shown


# -- chat templates and launch ---------------------------------------------------------------
def test_chat_templates_are_named_like_sglangs() -> None:
    assert guess_template("AIML-TUDA/LlavaGuard-v1.2-0.5B-OV") == "chatml-llava"
    assert guess_template("AIML-TUDA/LlavaGuard-v1.2-7B-OV") == "chatml-llava"
    assert guess_template("AIML-TUDA/LlavaGuard-34B") == "chatml-llava"
    assert guess_template("AIML-TUDA/LlavaGuard-7B") == "vicuna_v1.1"
    assert guess_template("AIML-TUDA/LlavaGuard-13B") == "vicuna_v1.1"
    assert guess_template("AIML-TUDA/QwenGuard-v1.2-3B") == "qwen2-vl"
    assert guess_template("some/other-model") is None
    vicuna = TEMPLATES["vicuna_v1.1"].render("POLICY")
    assert vicuna.endswith("user's questions. USER: <image>\nPOLICY ASSISTANT:")
    with pytest.raises(BackendUnavailableError, match="cannot tell the chat template"):
        template_for("auto", "some/other-model")
    with pytest.raises(BackendUnavailableError, match="unknown chat template 'nope'"):
        template_for("nope", None)


def test_a_jinja_chat_template_from_a_checkpoint_directory(tmp_path: Path) -> None:
    source = (
        "{% for m in messages %}<|{{ m.role }}|>{% for c in m.content %}"
        "{% if c.type == 'image' %}<image>{% else %}{{ c.text }}{% endif %}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": source}))
    template = template_for(str(tmp_path), None)
    assert isinstance(template, JinjaTemplate)
    assert template.render("POLICY") == "<|user|><image>POLICY<|assistant|>"
    (tmp_path / "t.jinja").write_text("{{ messages[0].content[1].text }}!")
    assert template_for(str(tmp_path / "t.jinja"), None).render("P") == "P!"


def test_launch_starts_a_server_and_stops_it(images: list[Path]) -> None:
    server_script = Path(__file__).with_name("sglang_server.py")
    command = f"{{python}} {server_script} --port {{port}} --model-path {{model}}"
    backend = SGLangBackend(
        launch=True,
        launch_port=free_port(),
        launch_command=command,
        model="AIML-TUDA/LlavaGuard-v1.2-0.5B-OV",
        transport="native",
        launch_timeout=60,
    )
    with backend:  # whoever builds a backend closes it; an Engine given one only uses it
        with Engine("llavaguard", backend, mode="score") as e:
            decision = e.assess(images[0])
            process = backend.process
            assert process is not None and process.poll() is None
        assert process.poll() is None  # the engine did not close what it did not build
    assert decision.verdict.ok, decision.verdict.error
    assert process.poll() is not None  # closed with the backend


def test_launch_explains_what_is_missing(tmp_path: Path) -> None:
    backend = SGLangBackend(launch=True, launch_port=free_port())
    if "sglang" not in sys.modules:
        with pytest.raises(BackendUnavailableError, match="needs the sglang package"):
            backend.load()
    crashing = SGLangBackend(
        launch=True,
        launch_port=free_port(),
        launch_command="{python} -c \"import sys; print('CUDA not found'); sys.exit(3)\"",
    )
    with pytest.raises(BackendUnavailableError, match=r"exited with status 3: CUDA not found"):
        crashing.load()


def test_launch_serves_each_checkpoint_so_that_score_mode_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """chatml-llava goes as its Jinja twin (SGLang's openai path would close the prefill);
    vicuna_v1.1 and qwen2-vl, which SGLang continues, by name. (sglang itself needs a GPU
    machine: only its presence is pretended here.)"""
    import importlib.util

    from policy_engine.backends import sglang_launch
    from policy_engine.backends.chat_templates import JINJA_SOURCES

    real = importlib.util.find_spec
    monkeypatch.setattr(
        sglang_launch.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "sglang" else real(name, *a),
    )
    backend = SGLangBackend(launch=True, model="AIML-TUDA/LlavaGuard-v1.2-7B-OV")
    command = backend.launch_command()
    assert command[1:3] == ["-m", "sglang.launch_server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    twin = Path(command[command.index("--chat-template") + 1])
    assert twin.name == "chatml-llava.jinja"
    assert twin.read_text() == JINJA_SOURCES["chatml-llava"]
    backend.close()
    assert not twin.exists()  # the temporary directory goes with the backend
    for model, name in (
        ("AIML-TUDA/LlavaGuard-7B", "vicuna_v1.1"),
        ("x/QwenGuard-v1.2-3B", "qwen2-vl"),
    ):
        command = SGLangBackend(launch=True, model=model).launch_command()
        assert command[command.index("--chat-template") + 1] == name


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_another_policy_travels_whole_and_is_post_processed(
    server: FakeSGLang, images: list[Path]
) -> None:
    compiled = get_host().compile(load_policy("children-platform"))
    with Engine(
        compiled.policy,
        "sglang",
        backend_options={"url": server.url, "transport": "native"},
    ) as e:
        decisions = list(e.assess_many(images))
    for decision, body in zip(
        decisions, by_image(posted(server, "/generate"), images), strict=True
    ):
        assert decision.verdict.ok
        assert decision.verdict.policy_id == "children-platform"
        assert json.loads(body["sampling_params"]["json_schema"]) == compiled.schema
        assert compiled.prompt in body["text"]
        if decision.rating == "Unsafe":  # the policy's rules act on what came back
            assert decision.actions, decision.trace


def test_native_score_mode_in_list_batches(server: FakeSGLang, images: list[Path]) -> None:
    with engine(server.url, "native", "score") as e:
        single = [d.verdict.p_unsafe for d in e.assess_many(images)]
    server.clear()
    with engine(server.url, "native", "score", list_batch=3) as e:
        batched = [d.verdict.p_unsafe for d in e.assess_many(images)]
    assert server.counts["/generate"] == 2
    assert sorted(len(b["text"]) for b in posted(server, "/generate")) == [3, 3]
    assert batched == pytest.approx(single, rel=1e-12)


def test_a_server_without_the_transports_api_is_told_apart() -> None:
    """A server that is healthy but lacks /get_model_info (not SGLang) or /v1/models."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/health"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(BackendUnavailableError, match="native transport needs an SGLang"):
            engine(url, "native").load()
        with pytest.raises(BackendUnavailableError, match="OpenAI-compatible server"):
            engine(url, "openai").load()
        with engine(url, "openai", model="given") as e:
            e.load()  # a named model needs no listing
            assert e.backend.loaded
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_score_answers_adds_p_unsafe_to_full_answers(
    server: FakeSGLang, transport: str, images: list[Path]
) -> None:
    with engine(server.url, transport, "score") as e:
        expected = [d.verdict.p_unsafe for d in e.assess_many(images)]
    path = "/v1/chat/completions" if transport == "openai" else "/generate"
    server.clear()
    with engine(server.url, transport, "full", score_answers=True) as e:
        decisions = list(e.assess_many(images))
    assert server.counts[path] == 2 * len(images)  # the answer and its score, per image
    assert all(d.verdict.ok and d.verdict.rationale for d in decisions)
    assert [d.verdict.p_unsafe for d in decisions] == pytest.approx(expected, rel=1e-12)
    server.clear()
    with engine(server.url, transport, "full") as e:  # off by default: no extra request
        assert all(d.verdict.p_unsafe is None for d in e.assess_many(images[:2]))
    assert server.counts[path] == 2


def test_max_side_shrinks_large_images_before_sending(
    server: FakeSGLang, images: list[Path]
) -> None:
    with engine(server.url, "native", "verdict", max_side=64) as e:
        decisions = list(e.assess_many(images))
    assert all(d.verdict.ok for d in decisions)
    expected = []
    for path in images:
        image = load_image(path).image.copy()
        image.thumbnail((64, 64))  # the longer side to 64, aspect kept; smaller ones untouched
        expected.append(image.size)
    sent = [decode_data_url(b["image_data"]).size for b in posted(server, "/generate")]
    assert sorted(sent) == sorted(expected)
    assert any(max(load_image(p).image.size) > 64 for p in images)  # something was shrunk
    assert all(max(size) <= 64 for size in sent)
