"""Property-based fuzzing of the HTTP service from its own OpenAPI document (schemathesis).

Schemathesis reads `/openapi.json` of an app built in-process (`create_app` over an
`EnginePool` with the `static` backend, no socket) and sends every operation requests made
from the document: its examples, boundary values of each constraint (coverage phase) and
random inputs (fuzzing phase), valid and invalid. Every answer goes through all of
schemathesis' checks: never a 5xx, a declared status, content type and headers, a body valid
against the declared schema, invalid input rejected with a 4xx, valid input accepted, other
methods refused with 405, the key enforced (`ignored_auth` replays keyed requests without the
key and with a wrong one).

The service is fuzzed without API keys and with a key sent on every request; a third run sends
the keyed service requests without the key (or with a made-up one): 401 on every path but
`/healthz` and `/readyz`.

Allowances, each narrow:

- Valid input is not always accepted: a schema-valid data URL or upload rarely holds the bytes
  of an image (422 `invalid_image`, docs/serve.md "GET /openapi.json"), and a schema-valid
  `model` or `policy` is any string, naming no loaded policy (404). `positive_data_acceptance`
  accepts 2xx, 404 and 422, nothing else.
- A multipart form cannot carry every invalid value schemathesis generates: an empty list sends
  no part, a one-item list a plain field. `negative_data_rejection` judges a form by the parts
  actually sent (`sent_form`), not by the generated value.
- An empty form field is refused like the JSON body refuses it (`test_an_empty_form_field_is_
  refused`, found by this fuzzing: the service once read it as absent).

Deterministic and bounded: a fixed seed, derandomized Hypothesis, no example database, at most
`MAX_EXAMPLES` random inputs per operation (the examples and coverage phases add a fixed set);
about 1,900 requests.
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import email.policy
import io
import json
import threading
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

import jsonschema
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import negative_data_rejection

from policy_engine.serve.accesslog import EventLog
from policy_engine.serve.app import create_app
from policy_engine.serve.limits import OPEN_PATHS
from policy_engine.serve.models import EXAMPLE_IMAGE
from policy_engine.serve.pool import EnginePool
from policy_engine.serve.settings import ServeSettings

KEY = "pe-fuzz-key-3c9e"
SEED = 20_260_511
MAX_EXAMPLES = 100
POLICIES = ["llavaguard", "children-platform"]
ACCEPTED = ["2xx", "404", "422"]
"""What a schema-valid request may get: judged, no such policy, or bytes that are no image."""
FORM = "multipart/form-data"


def build_app(keys: tuple[str, ...]) -> FastAPI:
    pool = EnginePool(POLICIES, "static", backend_options={"rating": "Unsafe", "category": "O2"})
    # no warm-up: schemathesis starts the app for each case, and a readiness probe during a
    # warm-up that a loaded machine slows down says 503 (tested in test_serve_readiness.py)
    settings = ServeSettings(api_keys=keys, warmup=False)
    return create_app(settings, pool, log=EventLog(io.StringIO()))


def wait_until_ready(client: Any) -> None:
    """The lifespan loads the backend in a thread: fuzzing before it is loaded would only see
    503s."""
    pause = threading.Event()
    for _ in range(500):
        if client.get("/readyz").status_code == 200:
            return
        pause.wait(0.02)
    raise AssertionError("the service never became ready")


def load(keys: tuple[str, ...], *, send_key: bool, accepted: list[str]) -> schemathesis.BaseSchema:
    """The OpenAPI schema of a fresh, ready service (read with the key when it has one);
    `send_key`: every generated request carries the key."""
    app = build_app(keys)
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    data: dict[str, Any] = {
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "checks": {"positive_data_acceptance": {"expected-statuses": accepted}},
    }
    if send_key and headers:
        data["headers"] = headers
    config = SchemathesisConfig.from_dict(data)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, headers=headers)
    with ASGIClient(app) as client:  # the lifespan schemathesis started with the loader
        wait_until_ready(client)
    return schema


def sent_form(case: schemathesis.Case, response: schemathesis.Response) -> dict[str, Any] | None:
    """The fields of a multipart request as sent, typed as the document types them (None for
    any other request): a file part as a string (its bytes are the `binary` string), the
    `metadata` part parsed as the JSON its encoding declares (kept as text when it is not JSON),
    a repeated field as the list of its values."""
    request = response.request
    content_type = request.headers.get("Content-Type", "")
    if case.media_type != FORM or not content_type.startswith(FORM):
        return None
    body = request.body if isinstance(request.body, bytes) else b""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, list[Any]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        raw = part.get_payload(decode=True) or b""
        value: Any = f"<file of {len(raw)} bytes>"
        if part.get_filename() is None:
            value = raw.decode("utf-8", "replace")
            if name == "metadata":
                with contextlib.suppress(ValueError):
                    value = json.loads(value)
        fields.setdefault(name, []).append(value)
    return {name: values[0] if len(values) == 1 else values for name, values in fields.items()}


def conforms(case: schemathesis.Case, fields: dict[str, Any]) -> bool:
    operation = case.operation.schema.raw_schema["paths"][case.path][case.method.lower()]
    schema = operation["requestBody"]["content"][FORM]["schema"]
    return bool(jsonschema.Draft202012Validator(schema).is_valid(fields))


def excluded_checks(
    case: schemathesis.Case, response: schemathesis.Response
) -> list[schemathesis.CheckFunction]:
    """`negative_data_rejection` does not apply to a form that conforms once encoded (the
    service rightly accepts it, whatever schemathesis generated)."""
    fields = sent_form(case, response)
    if fields is None:
        return []
    return [negative_data_rejection] if conforms(case, fields) else []


def starting(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    if case.path != "/readyz" or response.status_code != 503:
        return False
    with contextlib.suppress(ValueError):
        return bool(json.loads(response.text).get("status") in ("loading", "warming_up"))
    return False


def call_and_validate(case: schemathesis.Case) -> schemathesis.Response:
    response = case.call()
    pause = threading.Event()
    for _ in range(1500):  # a loaded machine may still be loading the backend: as a client,
        if not starting(case, response):  # ask /readyz again until it has an answer
            break
        pause.wait(0.02)
        response = case.call()
    case.validate_response(response, excluded_checks=excluded_checks(case, response))
    return response


@schemathesis.pytest.parametrize(
    open=load((), send_key=False, accepted=ACCEPTED),
    keyed=load((KEY,), send_key=True, accepted=ACCEPTED),
)
def test_every_generated_request_gets_a_declared_non_5xx_answer(case: schemathesis.Case) -> None:
    call_and_validate(case)


@load((KEY,), send_key=False, accepted=["2xx", "401"]).parametrize()
def test_without_the_key_everything_but_health_is_401(case: schemathesis.Case) -> None:
    """The keyed service, every generated request without the key (or with one schemathesis
    made up for the declared Bearer scheme): 401, whatever the body."""
    response = call_and_validate(case)
    if case.path in OPEN_PATHS:
        assert response.status_code < 500
    else:
        assert response.status_code == 401, response.text
        assert response.headers.get("www-authenticate") == ["Bearer"]
        assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("field", ["mode", "policy", "metadata"])
def test_an_empty_form_field_is_refused(field: str) -> None:
    """Found by the fuzzing above: `-F mode=` was judged in the default mode and `-F policy=` by
    the default policy, while JSON `{"mode": ""}` is a 422 and `{"policy": ""}` a 404."""
    app = build_app(())
    image = base64.b64decode(EXAMPLE_IMAGE.split(",", 1)[1])
    with TestClient(app) as client:
        wait_until_ready(client)
        answer = client.post(
            "/v1/assess", files={"image": ("one.png", image, "image/png")}, data={field: ""}
        )
    assert 400 <= answer.status_code < 500, answer.text
