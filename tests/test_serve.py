"""The HTTP service (`policy-engine serve`, policy_engine/serve/).

Contract tests drive the app with starlette's TestClient and check every answer against the
service's own OpenAPI document (status declared, body valid). The OpenAI client, saturation and
shutdown tests use real sockets: uvicorn in a thread, or the command in a subprocess, with the
loopback SGLang fake (tests/sglang_server.py) as a slow backend.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx
import jsonschema
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from policy_engine.backends.static import StaticBackend
from sglang_server import FakeSGLang

from policy_engine import Batch, Capabilities, Engine, Generation, get_host
from policy_engine.cli import cli
from policy_engine.errors import BackendUnavailableError
from policy_engine.loader import load_policy
from policy_engine.serve.accesslog import EventLog
from policy_engine.serve.app import create_app
from policy_engine.serve.command import serve_command
from policy_engine.serve.pool import EnginePool
from policy_engine.serve.settings import ServeSettings, is_loopback

KEY = "pe-test-key-5f1c"
OTHER_KEY = "pe-test-key-other-9a2b"
WRONG_KEY = "pe-wrong-key-77d0"
CHILD = (
    "import sys\n"
    "from policy_engine.cli import cli, main\n"
    "from policy_engine.serve.command import serve_command\n"
    "cli.add_command(serve_command)\n"
    "sys.argv = ['policy-engine', 'serve', *sys.argv[1:]]\n"
    "main()\n"
)
RULES_POLICY = """\
extends: llavaguard
id: rules-test
postprocess:
  - name: rules
    params:
      rules:
        - {when: {rating: Unsafe, metadata: {audience: minors}}, then: block}
        - {when: {rating: Unsafe}, then: {action: human_review, queue: moderation}}
      default: allow
"""


# -- helpers -----------------------------------------------------------------------------------
def png(width: int = 8, height: int = 8, color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


RED = data_url(png(color="red"))
BLUE = data_url(png(color="blue"))


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def wait_for(condition: Callable[[], bool], attempts: int = 1500, pause: float = 0.02) -> None:
    """Poll until `condition()` holds (a bound on attempts, not a timing assertion)."""
    event = threading.Event()
    for _ in range(attempts):
        try:
            if condition():
                return
        except (httpx.HTTPError, OSError):
            pass
        event.wait(pause)
    raise AssertionError("condition never held")


class ColorBackend(StaticBackend):
    """Red images are Unsafe (O2, P=0.8), others Safe (P=0.1)."""

    name = "color-test"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.unsafe = StaticBackend(rating="Unsafe", category="O2", p_unsafe=0.8)
        self.safe = StaticBackend(rating="Safe", p_unsafe=0.1)

    def generate(self, batch: Batch) -> list[Generation]:
        out = []
        for image in batch:
            red = image.image.getpixel((0, 0))
            assert isinstance(red, tuple)
            backend = self.unsafe if red[0] > 128 and red[2] < 128 else self.safe
            out.append(backend._answer(batch))
        return out


class NoScoreBackend(StaticBackend):
    name = "no-score-test"
    capabilities = Capabilities(images=True, json_schema=True, scores=False)


class GatedBackend(StaticBackend):
    """load() waits for `gate`, or fails with `failure`."""

    name = "gated-test"

    def __init__(self, failure: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.gate = threading.Event()
        self.failure = failure

    def load(self) -> None:
        if self.failure is not None:
            raise BackendUnavailableError(self.failure)
        assert self.gate.wait(60)


class BrokenBackend(StaticBackend):
    """A backend with a bug: it raises instead of returning an error Generation."""

    name = "broken-test"

    async def agenerate(self, batch: Batch) -> list[Generation]:
        raise RuntimeError("internal detail 4242")


class Contract:
    """Checks answers against the app's OpenAPI document: declared status, valid JSON body."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.seen: set[tuple[str, str, int]] = set()

    def check(self, method: str, path: str, response: httpx.Response) -> None:
        operation = self.spec["paths"].get(path, {}).get(method.lower())
        if operation is None:  # not an API path (404 probes)
            return
        status = str(response.status_code)
        declared = operation["responses"]
        assert status in declared, f"{method} {path}: {status} not declared ({sorted(declared)})"
        self.seen.add((method, path, response.status_code))
        content = declared[status].get("content", {})
        media = response.headers["content-type"].split(";")[0]
        assert media in content, f"{method} {path} {status}: {media} not declared"
        if media == "application/json":
            root = {"$ref": content[media]["schema"]["$ref"], "components": self.spec["components"]}
            jsonschema.Draft202012Validator(root).validate(response.json())
        for header in declared[status].get("headers", {}):
            assert header.lower() in response.headers, f"{method} {path}: no {header}"


class Api:
    """A TestClient whose every answer is checked by the contract (and never a 500)."""

    def __init__(self, client: TestClient, key: str | None = None) -> None:
        self.client = client
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        spec = client.get("/openapi.json", headers=headers).json()
        self.contract = Contract(spec)
        self.key = key

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.key}"
        response = self.client.request(method, path, headers=headers, **kwargs)
        assert response.status_code != 500, response.text
        self.contract.check(method, path, response)
        if response.status_code >= 400 and path != "/readyz":
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code", "request_id"}
            assert error["request_id"] == response.headers["x-request-id"]
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@contextmanager
def serving(
    pool: EnginePool | None = None,
    settings: ServeSettings | None = None,
    *,
    key: str | None = None,
    log: io.StringIO | None = None,
    ready: bool = True,
    **pool_args: Any,
) -> Iterator[Api]:
    if pool is None:
        pool_args.setdefault("backend_options", {"rating": "Unsafe", "category": "O2"})
        pool = EnginePool(pool_args.pop("policies", ["llavaguard"]), "static", **pool_args)
    settings = settings or ServeSettings(api_keys=(key,) if key else ())
    app = create_app(settings, pool, log=EventLog(log if log is not None else io.StringIO()))
    with TestClient(app) as client:
        if ready:
            wait_for(lambda: client.get("/readyz").status_code == 200)
        yield Api(client, key)


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port; the URL, once ready."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, http="h11", ws="none", loop="asyncio", access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A small parser of the text exposition format: fails on anything malformed."""
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
            continue
        match = sample.match(line)
        assert match, f"malformed sample line: {line!r}"
        name, _, body, value = match.groups()
        labels: list[tuple[str, str]] = []
        rest = body or ""
        while rest:
            found = label.match(rest)
            assert found, f"malformed labels: {body!r}"
            labels.append((found.group(1), found.group(2)))
            rest = rest[found.end() :]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or family in types, f"sample without TYPE: {name}"
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    for (name, labels), value in samples.items():
        if name.endswith("_bucket"):
            assert not math.isnan(value)
            if ("le", "+Inf") in labels:
                count = (name[: -len("_bucket")] + "_count", labels - {("le", "+Inf")})
                assert samples[count] == value
    return samples


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- health, readiness, policies -------------------------------------------------------------
def test_health_readiness_and_policies() -> None:
    with serving(policies=["llavaguard", "children-platform"]) as api:
        assert api.get("/healthz").json() == {"status": "ok"}
        assert api.get("/readyz").json() == {"status": "ready", "backend": "static", "error": None}
        listing = api.get("/v1/policies").json()
    assert listing["default"] == "llavaguard"
    by_id = {p["id"]: p for p in listing["data"]}
    assert list(by_id) == ["llavaguard", "children-platform"]
    for policy_id, info in by_id.items():
        compiled = get_host().compile(load_policy(policy_id))
        assert info["hash"] == compiled.hash
        assert info["version"] == compiled.policy.version
        assert [c["id"] for c in info["categories"]] == [c.id for c in compiled.policy.categories]
        assert info["modes"] == ["full", "verdict", "score"]
    assert by_id["llavaguard"]["default"] and not by_id["children-platform"]["default"]


def test_not_ready_until_the_backend_is_loaded() -> None:
    backend = GatedBackend(rating="Unsafe", category="O2")
    with serving(EnginePool(["llavaguard"], backend), ready=False) as api:
        assert api.get("/healthz").status_code == 200
        waiting = api.get("/readyz")
        assert waiting.status_code == 503 and waiting.json()["status"] == "loading"
        refused = api.post("/v1/assess", json={"image": RED})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["retry-after"] == "5"
        backend.gate.set()
        wait_for(lambda: api.get("/readyz").status_code == 200)
        assert api.post("/v1/assess", json={"image": RED}).status_code == 200


@pytest.mark.parametrize("keys", [(), (KEY,)])
def test_a_backend_that_fails_to_load_is_reported(keys: tuple[str, ...]) -> None:
    failures: list[str] = []
    pool = EnginePool(["llavaguard"], GatedBackend(failure="no GPU at 10.0.0.7"))
    log = io.StringIO()
    settings = ServeSettings(api_keys=keys)
    app = create_app(settings, pool, log=EventLog(log), on_load_error=failures.append)
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").json()["status"] == "failed")
        readiness = client.get("/readyz").json()
        refused = client.post("/v1/assess", json={"image": RED}, headers=headers)
    # the reason is public only without keys (it may name internal hosts)
    assert readiness["error"] == ("see the server log" if keys else "no GPU at 10.0.0.7")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert failures == ["no GPU at 10.0.0.7"]
    assert '"event":"backend_failed"' in log.getvalue() and "10.0.0.7" in log.getvalue()


# -- /v1/moderations ---------------------------------------------------------------------------
def test_moderation_result_uses_the_policy_categories() -> None:
    with serving(EnginePool(["llavaguard"], ColorBackend())) as api:
        answer = api.post("/v1/moderations", json={"input": [image_part(RED)]}).json()
    assert re.fullmatch(r"modr-[0-9a-f]{32}", answer["id"])
    assert answer["model"] == "llavaguard"
    (result,) = answer["results"]
    ids = [f"O{i}" for i in range(1, 10)]
    assert result["flagged"] is True
    assert result["categories"] == {c: c == "O2" for c in ids}
    assert result["category_scores"] == {c: 0.8 if c == "O2" else 0.0 for c in ids}
    assert result["category_applied_input_types"] == {
        c: ["image"] if c == "O2" else [] for c in ids
    }
    extension = result["policy_engine"]
    assert extension["rating"] == "Unsafe" and extension["category_id"] == "O2"
    assert extension["category_name"] == "Violence, Harm, or Cruelty"
    assert extension["p_unsafe"] == 0.8
    assert extension["policy_id"] == "llavaguard"
    assert extension["policy_hash"] == get_host().compile(load_policy("llavaguard")).hash


def test_moderation_of_several_images_flags_any_and_keeps_the_max() -> None:
    body = {
        "model": "children-platform",
        "input": [image_part(BLUE), {"type": "text", "text": "ignored"}, image_part(RED)],
    }
    with serving(EnginePool(["llavaguard", "children-platform"], ColorBackend())) as api:
        (result,) = api.post("/v1/moderations", json=body).json()["results"]
        safe = api.post("/v1/moderations", json={"input": [image_part(BLUE)]}).json()
    assert result["flagged"] is True
    assert [c for c, on in result["categories"].items() if on] == ["O2"]
    assert result["category_scores"]["O2"] == 0.8
    extension = result["policy_engine"]
    assert extension["policy_id"] == "children-platform"
    assert [i["rating"] for i in extension["images"]] == ["Safe", "Unsafe"]
    assert extension["rating"] == "Unsafe"  # the deciding image is the unsafe one
    assert [a["name"] for a in extension["actions"]] == ["block"]  # the policy's rule
    (clean,) = safe["results"]
    assert clean["flagged"] is False and not any(clean["categories"].values())
    assert set(clean["category_scores"].values()) == {0.0}
    assert clean["category_applied_input_types"]["O2"] == []


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"input": "a text"}, 400, "image_required", "input"),
        ({"input": ["a", "b"]}, 400, "image_required", "input"),
        ({"input": [{"type": "text", "text": "t"}]}, 400, "image_required", "input"),
        ({"input": [image_part("https://example.com/a.png")]}, 400, "invalid_image_url", None),
        ({"input": []}, 400, "invalid_request", "input"),
        ({"input": [image_part(RED)], "user": "x"}, 400, "invalid_request", "user"),
        ({"input": [{"type": "video"}]}, 400, "invalid_request", "input.0"),
        ({"model": "nope", "input": [image_part(RED)]}, 404, "model_not_found", "model"),
        ({"input": [image_part("data:image/png;base64,AAAA")]}, 422, "invalid_image", "input"),
        ({"input": [image_part("data:text/plain;base64,AAAA")]}, 422, "invalid_image", "input"),
    ],
)
def test_moderation_errors_in_openai_shape(
    body: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    with serving() as api:
        answer = api.post("/v1/moderations", json=body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if code == "invalid_image_url":
        assert "never fetches remote URLs" in error["message"]
    if code == "image_required":
        assert "judges images" in error["message"]


def test_moderation_of_a_failed_verdict_is_a_502() -> None:
    with serving(backend_options={"raw": "not a verdict"}) as api:
        answer = api.post("/v1/moderations", json={"input": [image_part(RED)]})
        native = api.post("/v1/assess", json={"image": RED})
    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "server_error"
    # the native API answers the Decision, which says why
    assert native.status_code == 200
    verdict = native.json()["decision"]["verdict"]
    assert verdict["rating"] is None and verdict["error"]["kind"] == "output"


# -- /v1/assess --------------------------------------------------------------------------------
def test_assess_json_upload_and_batch(tmp_path: Path) -> None:
    policy = tmp_path / "rules.yaml"
    policy.write_text(RULES_POLICY, encoding="utf-8")
    pool = EnginePool([str(policy), "llavaguard"], ColorBackend())
    with serving(pool) as api:
        minors = api.post("/v1/assess", json={"image": RED, "metadata": {"audience": "minors"}})
        adults = api.post("/v1/assess", json={"image": RED, "metadata": {"audience": "adults"}})
        upload = api.post(
            "/v1/assess",
            files={"image": ("red.png", png(), "image/png")},
            data={"mode": "verdict", "metadata": '{"audience": "minors"}'},
        )
        batch = api.post(
            "/v1/assess/batch",
            json={
                "items": [
                    {"image": BLUE},
                    {"image": RED, "policy": "llavaguard", "mode": "score"},
                    {"image": RED, "metadata": {"audience": "minors"}},
                ]
            },
        )
    decision = minors.json()["decision"]
    assert decision["verdict"]["rating"] == "Unsafe"
    assert decision["verdict"]["policy_id"] == "rules-test"
    assert decision["metadata"] == {"audience": "minors"}
    assert [a["name"] for a in decision["actions"]] == ["block"]
    assert [a["name"] for a in adults.json()["decision"]["actions"]] == ["human_review"]
    uploaded = upload.json()["decision"]
    assert uploaded["verdict"]["rationale"] is None  # verdict mode
    assert [a["name"] for a in uploaded["actions"]] == ["block"]
    first, second, third = batch.json()["decisions"]
    assert first["verdict"]["rating"] == "Safe"
    assert [a["name"] for a in first["actions"]] == ["allow"]
    assert second["verdict"]["policy_id"] == "llavaguard"
    assert second["verdict"]["p_unsafe"] == 0.8 and second["verdict"]["raw"] is None
    assert [a["name"] for a in third["actions"]] == ["block"]


def test_service_metadata_defaults_are_merged(tmp_path: Path) -> None:
    policy = tmp_path / "rules.yaml"
    policy.write_text(RULES_POLICY, encoding="utf-8")
    settings = ServeSettings(default_metadata={"audience": "minors", "site": "a"})
    with serving(EnginePool([str(policy)], ColorBackend()), settings) as api:
        default = api.post("/v1/assess", json={"image": RED}).json()["decision"]
        given = api.post("/v1/assess", json={"image": RED, "metadata": {"audience": "adults"}})
    assert default["metadata"] == {"audience": "minors", "site": "a"}
    assert [a["name"] for a in default["actions"]] == ["block"]
    assert given.json()["decision"]["metadata"] == {"audience": "adults", "site": "a"}


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param"),
    [
        ({"json": {"image": RED, "policy": "nope"}}, 404, "policy_not_found", "policy"),
        ({"json": {"image": "https://example.com/a.png"}}, 422, "invalid_request", "image"),
        ({"json": {"image": "/etc/hostname"}}, 422, "invalid_request", "image"),
        ({"json": {"image": RED, "mode": "fast"}}, 422, "invalid_request", "mode"),
        ({"json": {"image": RED, "extra": 1}}, 422, "invalid_request", "extra"),
        ({"json": {"image": "data:image/png;base64,AAAA"}}, 422, "invalid_image", "image"),
        ({"json": {"image": RED, "metadata": []}}, 422, "invalid_request", "metadata"),
        (
            {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
            None,
        ),
        (
            {"content": b'{"image": NaN}', "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
            None,
        ),
        (
            {"content": b"image", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            None,
        ),
        ({"files": {"other": ("a.png", png(), "image/png")}}, 422, "invalid_request", "other"),
        (
            {"data": {"image": "/etc/hostname"}, "files": {"x": ("x", b"")}},
            422,
            "invalid_request",
            None,
        ),
        (
            {"files": {"image": ("a.png", png(), "image/png")}, "data": {"metadata": "[1]"}},
            422,
            "invalid_request",
            "metadata",
        ),
        ({"files": {"image": ("a.png", b"", "image/png")}}, 422, "invalid_image", "image"),
        (
            {"files": {"image": ("a.png", png(), "image/png")}, "data": {"policy": "nope"}},
            404,
            "policy_not_found",
            "policy",
        ),
    ],
)
def test_assess_errors(kwargs: dict[str, Any], status: int, code: str, param: str | None) -> None:
    with serving() as api:
        answer = api.post("/v1/assess", **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def test_batch_errors() -> None:
    with serving() as api:
        unknown = api.post(
            "/v1/assess/batch", json={"items": [{"image": RED}, {"image": RED, "policy": "nope"}]}
        )
        empty = api.post("/v1/assess/batch", json={"items": []})
        too_many = api.post("/v1/assess/batch", json={"items": [{"image": RED}] * 65})
        bad_image = api.post(
            "/v1/assess/batch", json={"items": [{"image": RED}, {"image": "data:image/png,x"}]}
        )
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "items.1.policy"
    assert empty.status_code == 422 and too_many.status_code == 422
    assert too_many.json()["error"]["param"] == "items"
    # one bad image does not sink the batch: its Decision says why
    good, bad = bad_image.json()["decisions"]
    assert good["verdict"]["rating"] == "Unsafe"
    assert bad["verdict"]["error"]["kind"] == "image"


def test_score_mode_needs_a_backend_that_scores() -> None:
    with serving(EnginePool(["llavaguard"], NoScoreBackend())) as api:
        answer = api.post("/v1/assess", json={"image": RED, "mode": "score"})
        listing = api.get("/v1/policies").json()
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "mode_unavailable"
    assert listing["data"][0]["modes"] == ["full", "verdict"]


# -- limits ------------------------------------------------------------------------------------
def test_body_size_limit() -> None:
    big = data_url(png(200, 200, "red") + b"\0" * 4000)
    settings = ServeSettings(max_body_bytes=4000)
    with serving(settings=settings) as api:
        declared = api.post("/v1/assess", json={"image": big})
        moderation = api.post("/v1/moderations", json={"input": [image_part(big)]})
        upload = api.post("/v1/assess", files={"image": ("a.png", b"\0" * 5000, "image/png")})
        body = json.dumps({"image": big}).encode()
        chunked = api.post(
            "/v1/assess",
            content=iter([body[:2000], body[2000:]]),
            headers={"content-type": "application/json"},
        )
        small = api.post("/v1/assess", json={"image": RED})
    for answer in (declared, moderation, upload, chunked):
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in chunked.request.headers  # counted while read, not declared
    assert small.status_code == 200


def test_pixel_limit() -> None:
    with serving(max_pixels=32 * 32) as api:
        fits = api.post("/v1/assess", json={"image": data_url(png(32, 32))})
        too_big = api.post("/v1/assess", json={"image": data_url(png(33, 32))})
        moderation = api.post(
            "/v1/moderations", json={"input": [image_part(data_url(png(40, 40)))]}
        )
    assert fits.status_code == 200
    assert too_big.status_code == 422
    assert "too many pixels" in too_big.json()["error"]["message"]
    assert moderation.status_code == 422


# -- auth, request ids, logs, errors -------------------------------------------------------------
def test_auth_on() -> None:
    log = io.StringIO()
    settings = ServeSettings(api_keys=(KEY, OTHER_KEY))
    with serving(settings=settings, key=KEY, log=log) as api:
        for path in ("/healthz", "/readyz"):
            assert api.get(path, headers={"Authorization": ""}).status_code == 200
        refused = []
        for headers in (
            {"Authorization": ""},
            {"Authorization": f"Bearer {WRONG_KEY}"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": "Bearer "},
        ):
            for method, path in (
                ("GET", "/metrics"),
                ("GET", "/v1/policies"),
                ("POST", "/v1/assess"),
                ("POST", "/v1/moderations"),
                ("GET", "/openapi.json"),
                ("GET", "/not-a-path"),
            ):
                answer = api.request(method, path, headers=headers, json={"image": RED})
                refused.append(answer)
        other = api.get("/v1/policies", headers={"Authorization": f"bearer {OTHER_KEY}"})
        accepted = api.post("/v1/assess", json={"image": RED})
        spec = api.client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    for answer in refused:
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
        for secret in (KEY, OTHER_KEY, WRONG_KEY):
            assert secret not in answer.text and secret not in str(answer.headers)
    assert other.status_code == 200 and accepted.status_code == 200
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/assess"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in spec["paths"]["/metrics"]["get"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    for secret in (KEY, OTHER_KEY, WRONG_KEY):
        assert secret not in log.getvalue()


def test_auth_off_declares_no_keys() -> None:
    with serving() as api:
        spec = api.get("/openapi.json").json()
        assert api.get("/metrics").status_code == 200
    assert "securitySchemes" not in spec.get("components", {})
    assert all(
        "401" not in op["responses"] and "security" not in op
        for operations in spec["paths"].values()
        for op in operations.values()
    )


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com", ""):
        assert not is_loopback(host), host


def test_non_loopback_without_keys_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLICY_ENGINE_SERVE_API_KEYS", raising=False)
    cli.add_command(serve_command)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--backend", "static"])
    assert result.exit_code == 2
    assert result.output.startswith("error: refusing to serve on 0.0.0.0 without API keys")
    assert "POLICY_ENGINE_SERVE_API_KEYS" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nope"], "error: unknown backend 'nope'"),
        (["--backend", "static", "-p", "nope.yaml"], "nope.yaml"),
        (["--backend", "static", "-p", "llavaguard", "-p", "llavaguard"], "two policies"),
        (
            ["--backend", "static", "--max-concurrency", "0"],
            "Invalid value for '--max-concurrency'",
        ),
    ],
)
def test_serve_command_errors_are_one_line(args: list[str], message: str) -> None:
    cli.add_command(serve_command)
    result = CliRunner().invoke(cli, ["serve", "--port", "0", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_port_in_use_is_one_line() -> None:
    cli.add_command(serve_command)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        result = CliRunner().invoke(cli, ["serve", "--backend", "static", "--port", port])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert len(result.output.strip().splitlines()) == 1


def test_request_ids_are_echoed_or_made() -> None:
    with serving() as api:
        given = api.get("/healthz", headers={"X-Request-ID": "req-42.a:b"})
        invalid = api.get("/healthz", headers={"X-Request-ID": "has spaces " + "x" * 200})
        made = api.post("/v1/assess", json={"image": RED, "policy": "nope"})
    assert given.headers["x-request-id"] == "req-42.a:b"
    assert re.fullmatch(r"[0-9a-f]{32}", invalid.headers["x-request-id"])
    assert made.json()["error"]["request_id"] == made.headers["x-request-id"]


def test_access_log_is_json_without_images_or_keys() -> None:
    log = io.StringIO()
    with serving(settings=ServeSettings(api_keys=(KEY,)), key=KEY, log=log) as api:
        api.post("/v1/assess", json={"image": RED, "metadata": {"secret": "meta-7"}})
        api.post("/v1/moderations?token=query-secret-3", json={"input": [image_part(RED)]})
        api.post("/v1/assess", files={"image": ("a.png", png(), "image/png")})
        api.get("/v1/policies", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    access = [line for line in lines if line["event"] == "access"]
    assert len(access) >= 5
    for line in access:
        assert {
            "time",
            "request_id",
            "method",
            "path",
            "status",
            "duration_ms",
            "client",
            "policy",
            "bytes_in",
            "bytes_out",
        } <= set(line)
    assess = [line for line in access if line["path"] == "/v1/assess"]
    assert [line["policy"] for line in assess] == ["llavaguard", "llavaguard"]
    assert all(line["bytes_in"] > 0 and line["status"] == 200 for line in assess)
    assert any(line["status"] == 401 for line in access)
    text = log.getvalue()
    payload = RED.split(",", 1)[1]
    for forbidden in (
        payload[:40],
        "data:image",
        KEY,
        WRONG_KEY,
        "query-secret-3",
        "meta-7",
        "Bearer",
    ):
        assert forbidden not in text


def test_metrics_count_what_happened() -> None:
    with serving(EnginePool(["llavaguard"], ColorBackend())) as api:
        for url in (RED, RED, BLUE):
            api.post("/v1/moderations", json={"input": [image_part(url)]})
        api.post("/v1/assess", json={"image": "data:image/png;base64,AAAA"})
        api.post("/v1/assess", json={"image": RED, "policy": "nope"})
        text = api.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(text.text)
    requests = "policy_engine_http_requests_total"
    assert metric(samples, requests, method="POST", route="/v1/moderations", status="200") == 3
    assert metric(samples, requests, method="POST", route="/v1/assess", status="422") == 1
    assert metric(samples, requests, method="POST", route="/v1/assess", status="404") == 1
    verdicts = "policy_engine_verdicts_total"
    assert metric(samples, verdicts, policy="llavaguard", rating="Unsafe", category="O2") == 2
    assert metric(samples, verdicts, policy="llavaguard", rating="Safe", category="NA") == 1
    assert metric(samples, verdicts, policy="llavaguard", rating="error", category="none") == 1
    errors = "policy_engine_assessment_errors_total"
    assert metric(samples, errors, policy="llavaguard", kind="image") == 1
    count = "policy_engine_http_request_duration_seconds_count"
    assert metric(samples, count, route="/v1/moderations") == 3
    assert (
        metric(
            samples,
            "policy_engine_assessment_duration_seconds_count",
            policy="llavaguard",
            mode="full",
        )
        == 4
    )
    assert metric(samples, "policy_engine_backend_ready") == 1
    assert metric(samples, "policy_engine_requests_in_flight") == 0


def test_two_apps_keep_their_own_metrics() -> None:
    """One registry per app: two services in one process neither clash nor share a series,
    and nothing lands in prometheus-client's process-global registry."""
    import prometheus_client

    with (
        serving(EnginePool(["llavaguard"], ColorBackend())) as first,
        serving(EnginePool(["children-platform"], ColorBackend())) as second,
    ):
        first.post("/v1/assess", json={"image": RED})
        first.post("/v1/assess", json={"image": RED})
        second.post("/v1/assess", json={"image": BLUE})
        one = parse_prometheus(first.get("/metrics").text)
        two = parse_prometheus(second.get("/metrics").text)
    verdicts = "policy_engine_verdicts_total"
    assert metric(one, verdicts, policy="llavaguard", rating="Unsafe", category="O2") == 2
    assert metric(two, verdicts, policy="llavaguard", rating="Unsafe", category="O2") == 0
    assert metric(two, verdicts, policy="children-platform", rating="Safe", category="NA") == 1
    assert metric(one, verdicts, policy="children-platform", rating="Safe", category="NA") == 0
    requests = "policy_engine_http_requests_total"
    assert metric(one, requests, method="POST", route="/v1/assess", status="200") == 2
    assert metric(two, requests, method="POST", route="/v1/assess", status="200") == 1
    global_names = {
        sample.name for family in prometheus_client.REGISTRY.collect() for sample in family.samples
    }
    assert not any(name.startswith("policy_engine_") for name in global_names)


def test_metrics_speak_openmetrics_when_asked_and_show_no_created_series() -> None:
    with serving() as api:
        api.post("/v1/assess", json={"image": RED})
        text = api.get("/metrics")
        open_metrics = api.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert text.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "_created" not in text.text
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
    assert "_created" not in open_metrics.text
    unsafe = r'^policy_engine_verdicts_total\{[^}]*rating="Unsafe"[^}]*\} 1\.0$'
    assert re.search(unsafe, open_metrics.text, re.M)


def test_hostile_inputs_never_crash_the_service() -> None:
    image = '"image": "' + RED + '"'
    texts = [
        "",
        "null",
        "[]",
        "[" * 100_000 + "]" * 100_000,
        "{" + image + ', "metadata": ' + '{"a":' * 50 + "1" + "}" * 50 + "}",
        "{" + image + ', "metadata": {"x": "\\ud800"}}',
        "{" + image + ', "metadata": {"\\udcff": 1e999}}',
        "{" + image + ', "policy": "\\ud800"}',
        '{"image": "data:\\ud800;base64,AA"}',
        '{"items": [{' + image + ', "metadata": {"k": "\\ud800"}}]}',
        '{"input": [{"type": "image_url", "image_url": {"url": "data:"}}]}',
        '{"input": [{"type": "image_url", "image_url": {"url": "DATA:image/png;base64,"}}]}',
        '{"model": "\\ud800", "input": "x"}',
    ]
    form = b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nabc\r\n--x--\r\n"
    bodies: list[dict[str, Any]] = [{"content": text.encode()} for text in texts]
    bodies += [
        {"content": b"\xff\xfe\x00"},
        {"content": form, "content_type": "multipart/form-data; boundary=x"},
        {"content": b"garbage", "content_type": "multipart/form-data"},
        {"content": b"image=1", "content_type": "application/x-www-form-urlencoded"},
    ]
    with serving() as api:
        for path in ("/v1/assess", "/v1/assess/batch", "/v1/moderations"):
            for body in bodies:
                content_type = body.get("content_type", "application/json")
                answer = api.post(
                    path, content=body["content"], headers={"content-type": content_type}
                )
                assert answer.status_code < 500, answer.text
                if answer.status_code == 200:
                    json.loads(answer.text)  # valid JSON, even with odd metadata echoed


def test_a_backend_that_raises_gives_error_verdicts_without_its_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine turns an unexpected backend exception into error verdicts; the exception's
    text (internal detail) stays in the log."""
    log = io.StringIO()
    pool = EnginePool(["llavaguard"], BrokenBackend())
    app = create_app(ServeSettings(warmup=False), pool, log=EventLog(log))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        answer = client.post("/v1/assess", json={"image": RED})
    assert "4242" not in answer.text and "Traceback" not in answer.text
    assert "failed unexpectedly: RuntimeError" in answer.text
    assert "internal detail 4242" in caplog.text  # serve's JSON log carries it (test_serve_logs)


def test_the_last_resort_handler_hides_details(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:  # a bug in the engine itself
        raise RuntimeError("internal detail 4242")
        yield  # pragma: no cover - an async generator that fails at once

    monkeypatch.setattr(Engine, "aassess_many", broken)
    log = io.StringIO()
    pool = EnginePool(["llavaguard"], StaticBackend())
    # no cross-request batching: each request runs the (broken) aassess_many
    settings = ServeSettings(warmup=False, batch_window_ms=0)
    app = create_app(settings, pool, log=EventLog(log))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        answer = client.post("/v1/assess", json={"image": RED})
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert "4242" not in answer.text and "Traceback" not in answer.text
    errors = [json.loads(line) for line in log.getvalue().splitlines() if '"error"' in line]
    logged = [e for e in errors if e["event"] == "error"]
    assert logged and logged[0]["request_id"] == answer.headers["x-request-id"]
    assert "internal detail 4242" in logged[0]["traceback"]


def test_openapi_document_covers_every_route() -> None:
    with serving() as api:
        spec = api.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/policies",
        "/v1/moderations",
        "/v1/assess",
        "/v1/assess/batch",
    }
    assess = spec["paths"]["/v1/assess"]["post"]
    assert set(assess["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    for operations in spec["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                assert response.get("content"), f"{status} has no schema"
                assert not status.startswith("5") or status in {"502", "503", "504"}
    schemas = spec["components"]["schemas"]
    assert {"ErrorResponse", "Decision", "ModerationResponse", "AssessRequest"} <= set(schemas)


# -- real sockets --------------------------------------------------------------------------------
def test_official_openai_client() -> None:
    openai = pytest.importorskip("openai")
    pool = EnginePool(["llavaguard"], ColorBackend())
    app = create_app(ServeSettings(api_keys=(KEY,)), pool, log=EventLog(io.StringIO()))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        response = client.moderations.create(model="llavaguard", input=[image_part(RED)])
        with pytest.raises(openai.BadRequestError) as text_only:
            client.moderations.create(model="llavaguard", input="some text")
        with pytest.raises(openai.NotFoundError) as unknown:
            client.moderations.create(model="omni-moderation-latest", input=[image_part(RED)])
        wrong = openai.OpenAI(base_url=url + "/v1", api_key=WRONG_KEY, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.moderations.create(model="llavaguard", input=[image_part(RED)])
    from openai.types import ModerationCreateResponse

    assert isinstance(response, ModerationCreateResponse)
    assert response.model == "llavaguard" and response.id.startswith("modr-")
    (result,) = response.results
    assert result.flagged is True
    ids = [f"O{i}" for i in range(1, 10)]
    assert result.categories.model_extra == {c: c == "O2" for c in ids}
    assert result.category_scores.model_extra is not None
    assert result.category_scores.model_extra["O2"] == 0.8
    assert result.category_applied_input_types.model_extra is not None
    assert result.category_applied_input_types.model_extra["O2"] == ["image"]
    assert text_only.value.code == "image_required"
    assert unknown.value.code == "model_not_found"


def test_saturation_answers_429_with_retry_after() -> None:
    with FakeSGLang(service_time=3.0) as fake:
        pool = EnginePool(["llavaguard"], "sglang", backend_options={"url": [fake.url]})
        # no warm-up: it would wait on the slow server and add to its request counts
        settings = ServeSettings(max_concurrency=2, max_queue=0, warmup=False)
        app = create_app(settings, pool, log=EventLog(io.StringIO()))
        with live_server(app) as url, ThreadPoolExecutor(2) as threads:
            body = {"image": RED, "mode": "verdict"}
            first = [
                threads.submit(httpx.post, url + "/v1/assess", json=body, timeout=60)
                for _ in range(2)
            ]
            wait_for(lambda: fake.counts["/v1/chat/completions"] >= 2)
            busy = httpx.post(url + "/v1/assess", json=body, timeout=60)
            moderation = httpx.post(
                url + "/v1/moderations", json={"input": [image_part(RED)]}, timeout=60
            )
            fake.service_time = 0.0
            done = [future.result() for future in first]
            after = httpx.post(url + "/v1/assess", json=body, timeout=60)
            samples = parse_prometheus(httpx.get(url + "/metrics").text)
    for refused in (busy, moderation):
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "server_busy"
        assert int(refused.headers["retry-after"]) >= 1
    assert [answer.status_code for answer in done] == [200, 200]
    assert all(a.json()["decision"]["verdict"]["error"] is None for a in done)
    assert after.status_code == 200
    assert metric(samples, "policy_engine_requests_rejected_total", reason="saturated") == 2


def test_deadline_answers_504() -> None:
    with FakeSGLang(service_time=5.0) as fake:
        pool = EnginePool(["llavaguard"], "sglang", backend_options={"url": [fake.url]})
        # no warm-up: with a 0.5 s deadline on a 5 s server it is a fault (never ready)
        with serving(pool, ServeSettings(timeout=0.5, warmup=False)) as api:
            native = api.post("/v1/assess", json={"image": RED})
            moderation = api.post("/v1/moderations", json={"input": [image_part(RED)]})
            samples = parse_prometheus(api.get("/metrics").text)
    for answer in (native, moderation):
        assert answer.status_code == 504
        assert answer.json()["error"] | {"request_id": None} == {
            "message": "no answer within 0.5 s",
            "type": "server_error",
            "param": None,
            "code": "timeout",
            "request_id": None,
        }
    assert metric(samples, "policy_engine_requests_rejected_total", reason="timeout") == 2


def test_graceful_shutdown_drains_in_flight_requests() -> None:
    with FakeSGLang(service_time=3.0) as fake:
        command = [
            sys.executable,
            "-c",
            CHILD,
            "--backend",
            "sglang",
            "--url",
            fake.url,
            "--port",
            "0",
            "--mode",
            "verdict",
            "--shutdown-timeout",
            "60",
            "--no-warmup",  # it would wait on the slow server and add to its request counts
        ]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []

        def read() -> None:
            for line in process.stderr or ():
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_for(lambda: any('"listening"' in line for line in lines))
            listening = json.loads(next(line for line in lines if '"listening"' in line))
            url = listening["url"]
            port = int(url.rsplit(":", 1)[1])
            wait_for(lambda: httpx.get(url + "/readyz").status_code == 200)
            with ThreadPoolExecutor(3) as threads:
                body = {"image": RED}
                futures = [
                    threads.submit(httpx.post, url + "/v1/assess", json=body, timeout=60)
                    for _ in range(3)
                ]
                wait_for(lambda: fake.counts["/v1/chat/completions"] >= 3)
                process.send_signal(signal.SIGTERM)
                wait_for(lambda: refused(port))  # no new connections while draining
                answers = [future.result() for future in futures]
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        reader.join(timeout=10)
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert all(a.json()["decision"]["verdict"]["error"] is None for a in answers)
    assert refused(port)
    records = [json.loads(line) for line in lines]  # every stderr line is JSON
    served = [r for r in records if r["event"] == "access" and r["path"] == "/v1/assess"]
    assert [r["status"] for r in served] == [200, 200, 200]
    assert records[-1]["event"] in {"server", "stopped"}
    assert any(r["event"] == "stopped" for r in records)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


ENGINE_OPTIONS = {
    "--backend",
    "--model",
    "--url",
    "--transport",
    "--launch",
    "--mode",
    "--option",
    "--meta",
    "--batch-size",
}


def test_every_option_is_documented_with_its_default() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serve.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Options") : doc.index("## Endpoints")]
    rows = dict(re.findall(r"^\| `(--[a-z-]+)`[^|]* \| ([^|]+) \|", section, re.M))
    params = {
        p.opts[0] if p.opts[0].startswith("--") else p.opts[1]: p for p in serve_command.params
    }
    own = set(params) - ENGINE_OPTIONS - {"--help"}
    assert set(rows) == own
    assert all(f"`{name}`" in section for name in ENGINE_OPTIONS)
    for name, cell in rows.items():
        default = params[name].default
        if isinstance(default, int | float | str) and not isinstance(default, bool):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert cell.strip().strip("`") == shown, name


def test_importing_the_command_does_not_load_the_web_stack() -> None:
    probe = (
        "import sys\n"
        "from policy_engine.cli import cli\n"
        "from policy_engine.serve.command import serve_command\n"
        "cli.add_command(serve_command)\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        cli(['serve', '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = {'fastapi', 'starlette', 'uvicorn', 'PIL', 'torch'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_flagged_follows_the_policys_decision_not_only_the_rating() -> None:
    """children-platform blurs a Safe image the model was unsure of: that is flagged."""
    unsure = EnginePool(
        ["children-platform"], StaticBackend(rating="Safe", category="O4", p_unsafe=0.4)
    )
    with serving(unsure) as api:
        (result,) = api.post("/v1/moderations", json={"input": [image_part(BLUE)]}).json()[
            "results"
        ]
    assert result["policy_engine"]["rating"] == "Safe"
    assert [a["name"] for a in result["policy_engine"]["actions"]] == ["blur"]
    assert result["flagged"] is True
    assert [c for c, on in result["categories"].items() if on] == ["O4"]
    assert result["category_scores"]["O4"] == 0.4  # the evidence there is
