"""The fake SGLang server (tests/sglang_server.py), exercised over real HTTP with aiohttp: it
accepts, rejects and renders what SGLang 0.5.23 does (tests/sglang_protocol.py cites the source)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from fake_model import EOS_ID, SAFE_ID, UNSAFE_ID, toy_ids, toy_tokens
from PIL import Image
from schema_instances import instance_for
from sglang_protocol import FLAT_SCHEMA_MESSAGE
from sglang_server import FakeSGLang, Fault, serve

from policy_engine import get_host
from policy_engine.loader import load_policy

HERE = Path(__file__).resolve().parent
MODEL = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV"
PROMPT = "<|im_start|>user\n<image>\nAssess the image.<|im_end|>\n<|im_start|>assistant\n"


def png_b64(color: str, size: tuple[int, int] = (8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def data_url(b64: str) -> str:
    return f"data:image/png;base64,{b64}"


RED, BLUE, GREEN = png_b64("red"), png_b64("blue"), png_b64("green")
NOT_AN_IMAGE = base64.b64encode(b"definitely not a picture").decode("ascii")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


async def _fetch(
    method: str,
    url: str,
    payload: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.request(method, url, json=payload, headers=headers) as response,
    ):
        return Reply(response.status, dict(response.headers), await response.text())


def call(method: str, url: str, payload: Any = None, **kwargs: Any) -> Reply:
    return asyncio.run(_fetch(method, url, payload, **kwargs))


def post(fake: FakeSGLang, path: str, payload: Any, **kwargs: Any) -> Reply:
    return call("POST", fake.url + path, payload, **kwargs)


def get(fake: FakeSGLang, path: str, **kwargs: Any) -> Reply:
    return call("GET", fake.url + path, **kwargs)


def gen_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "text": PROMPT,
        "image_data": RED,
        "sampling_params": {"max_new_tokens": 500, "temperature": 0.0},
    }
    body.update(overrides)
    return body


def user_turn(image_url: str = data_url(RED), text: str = "Assess the image.") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": text},
        ],
    }


def chat_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [user_turn()],
        "max_tokens": 500,
        "temperature": 0.0,
    }
    body.update(overrides)
    return body


def nested_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeSGLang]:
    with serve() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeSGLang) -> Iterator[FakeSGLang]:
    server.clear()
    yield server
    server.clear()


@pytest.fixture(scope="module")
def compiled() -> Any:
    return get_host().compile(load_policy("llavaguard"))


@pytest.fixture(scope="module")
def prefix(compiled: Any) -> str:
    value = compiled.layout_for("full").prefix()
    assert value.endswith('"rating": "')
    return str(value)


# ---- toy tokenizer and instance generator -------------------------------------------------


def test_toy_tokenizer_splits_words_punctuation_and_spaces() -> None:
    assert toy_tokens('Safe",') == ["Safe", '"', ","]
    text = '{\n    "rating": "Safe"}'
    assert "".join(toy_tokens(text)) == text
    assert toy_tokens(text)[:3] == ["{", "\n    ", '"']
    assert toy_ids("Safe") == [SAFE_ID] and SAFE_ID != UNSAFE_ID
    assert all(100 <= i < 50100 for i in toy_ids(text))
    assert toy_ids("a b", add_special_tokens=True)[0] == 1


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_instances_for_compiled_schemas_validate(compiled: Any, prefix: str, mode: str) -> None:
    schema = compiled.schema_for(mode)
    seen = set()
    for seed in range(40):
        value = instance_for(schema, random.Random(seed))
        jsonschema.validate(value, schema)
        assert tuple(value) == compiled.layout_for(mode).keys  # whatever the schema's shape
        assert json.dumps(value, indent=4).startswith(prefix)
        seen.add(value["rating"])
    assert seen == {"Safe", "Unsafe"}
    assert instance_for(schema, random.Random(7)) == instance_for(schema, random.Random(7))


def test_instance_for_supports_the_documented_keywords() -> None:
    schema = {
        "$defs": {"Tag": {"type": "string", "enum": ["a", "b", "c"]}},
        "definitions": {"Score": {"type": "integer", "exclusiveMinimum": 3, "maximum": 4}},
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"$ref": "#/$defs/Tag"},
                "uniqueItems": True,
                "minItems": 3,
                "maxItems": 3,
            },
            "score": {"$ref": "#/definitions/Score"},
            "ratio": {"type": "number", "minimum": 0.25, "exclusiveMaximum": 0.5},
            "either": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
            "one": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}]},
            "multi": {"type": ["integer", "null"]},
            "fixed": {"const": {"k": [1, 2]}},
            "short": {"type": "string", "minLength": 2, "maxLength": 5},
            "optional": {"type": "string"},
        },
        "required": ["tags", "score", "ratio", "either", "one", "multi", "fixed", "short"],
        "additionalProperties": False,
    }
    for seed in range(30):
        value = instance_for(schema, random.Random(seed))
        jsonschema.validate(value, schema)
        assert "optional" not in value
        assert sorted(value["tags"]) == ["a", "b", "c"]
        assert value["score"] == 4
        assert 2 <= len(value["short"]) <= 5


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^a+$"},
        {"type": "string", "minLength": 5, "maxLength": 2},
        {"type": "integer", "minimum": 3, "maximum": 2},
        {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "uniqueItems": True},
        {"type": "object", "required": ["x"], "additionalProperties": False},
        {"type": "object", "properties": {"x": False}, "required": ["x"]},
        {"$ref": "https://example.com/schema.json"},
        {"type": "string", "format": "date-time"},
    ],
)
def test_instance_for_refuses_what_it_cannot_satisfy(schema: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        instance_for(schema, random.Random(0))


# ---- GET endpoints and /tokenize --------------------------------------------------------------


def test_get_endpoints(fake: FakeSGLang) -> None:
    for path in ("/health", "/health_generate"):
        reply = get(fake, path)
        assert (reply.status, reply.text) == (200, "")
    for path in ("/get_model_info", "/model_info"):  # the router probes both
        info = get(fake, path)
        assert info.status == 200
        assert {k: info.json()[k] for k in ("model_path", "tokenizer_path", "is_generation")} == {
            "model_path": MODEL,
            "tokenizer_path": MODEL,
            "is_generation": True,
        }
    for path in ("/server_info", "/get_server_info"):
        server = get(fake, path).json()
        assert server["version"] == "0.5.23" and server["model_path"] == MODEL
        assert server["chat_template"] is None  # the model's own (HF) template
    models = get(fake, "/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert (card["id"], card["object"], card["owned_by"], card["root"]) == (
        MODEL,
        "model",
        "sglang",
        MODEL,
    )
    assert get(fake, "/nope").status == 404
    assert post(fake, "/nope", {}).status == 404
    assert fake.counts == {}  # GETs and unknown paths are not recorded
    with serve(chat_template="chatml-llava") as other:
        assert get(other, "/server_info").json()["chat_template"] == "chatml-llava"


def test_tokenize(fake: FakeSGLang) -> None:
    one = post(fake, "/tokenize", {"prompt": 'Safe",'})
    assert one.status == 200
    assert one.json() == {
        "tokens": [1, *toy_ids('Safe",')],
        "count": 4,
        "max_model_len": 32768,
    }
    many = post(fake, "/tokenize", {"prompt": ["Safe", "Unsafe"], "add_special_tokens": False})
    assert many.json()["tokens"] == [[SAFE_ID], [UNSAFE_ID]]
    assert many.json()["count"] == [1, 1]
    extra = post(fake, "/v1/tokenize", {"prompt": "x", "oops": 1})  # TokenizeRequest allows it
    assert extra.status == 200 and extra.json()["tokens"] == [1, *toy_ids("x")]
    bad = post(fake, "/tokenize", {"prompt": 5})
    assert bad.status == 400 and "prompt must be" in bad.json()["message"]
    assert fake.counts["/tokenize"] == 3 and fake.counts["/v1/tokenize"] == 1


# ---- /generate ------------------------------------------------------------------------------


def test_generate_plain_reply_shape(fake: FakeSGLang) -> None:
    reply = post(fake, "/generate", gen_body(rid="req-1"))
    assert reply.status == 200
    item = reply.json()
    assert set(item) == {"text", "output_ids", "meta_info"}
    meta = item["meta_info"]
    assert set(meta) == {
        "id",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "e2e_latency",
    }
    assert meta["id"] == "req-1"
    assert meta["finish_reason"] == {"type": "stop", "matched": EOS_ID}
    assert item["output_ids"] == toy_ids(item["text"])
    assert meta["completion_tokens"] == len(item["output_ids"]) > 0
    assert meta["prompt_tokens"] > len(toy_ids(PROMPT))
    assert meta["cached_tokens"] == 0 and meta["e2e_latency"] >= 0
    assert not item["text"].startswith("{")
    # Without an image the text must not carry an image token either.
    text_only = post(fake, "/generate", gen_body(text="Hello there", image_data=None))
    assert text_only.status == 200 and len(text_only.json()["meta_info"]["id"]) == 32
    [record, _] = fake.received
    assert record.path == "/generate" and record.status == 200 and record.fault is None
    assert record.body == gen_body(rid="req-1")
    assert record.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_generate_schema_replies_validate(
    fake: FakeSGLang, compiled: Any, prefix: str, mode: str
) -> None:
    schema = compiled.schema_for(mode)
    params = {"max_new_tokens": 500, "temperature": 0.0, "json_schema": json.dumps(schema)}
    for image in (RED, BLUE, GREEN):
        item = post(fake, "/generate", gen_body(image_data=image, sampling_params=params)).json()
        assert item["meta_info"]["finish_reason"]["type"] == "stop"
        assert item["text"].startswith(prefix)
        jsonschema.validate(json.loads(item["text"]), schema)
        assert item["meta_info"]["completion_tokens"] == len(toy_ids(item["text"]))


def test_full_answer_is_truncated_at_128_tokens(fake: FakeSGLang, compiled: Any) -> None:
    schema = json.dumps(compiled.schema_for("full"))
    for color in ("red", "blue", "green", "white", "black", "yellow"):
        params = {"max_new_tokens": 128, "temperature": 0.0, "json_schema": schema}
        body = gen_body(image_data=png_b64(color), sampling_params=params)
        item = post(fake, "/generate", body).json()
        assert item["meta_info"]["finish_reason"] == {"type": "length", "length": 128}
        assert item["meta_info"]["completion_tokens"] == 128 == len(item["output_ids"])
        with pytest.raises(json.JSONDecodeError):
            json.loads(item["text"])


def test_small_budget_truncates_plain_text(fake: FakeSGLang) -> None:
    body = gen_body(sampling_params={"max_new_tokens": 3})
    item = post(fake, "/generate", body).json()
    assert item["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert len(toy_tokens(item["text"])) == 3


def test_batch_keeps_order(fake: FakeSGLang, compiled: Any) -> None:
    schema = json.dumps(compiled.schema_for("verdict"))
    texts = [PROMPT.replace("Assess", word) for word in ("First", "Second", "Third")]
    params = [
        {"max_new_tokens": 3},
        {"max_new_tokens": 500, "json_schema": schema},
        {"max_new_tokens": 6, "temperature": 0.5},
    ]
    body = {
        "text": texts,
        "image_data": [RED, data_url(BLUE), GREEN],
        "sampling_params": params,
        "rid": ["a", "b", "c"],
    }
    reply = post(fake, "/generate", body)
    assert reply.status == 200
    items = reply.json()
    assert [i["meta_info"]["id"] for i in items] == ["a", "b", "c"]
    assert [i["meta_info"]["completion_tokens"] for i in items][::2] == [3, 6]
    jsonschema.validate(json.loads(items[1]["text"]), compiled.schema_for("verdict"))
    # Each batch item is what the same request alone gets.
    for text, image, p, item in zip(texts, [RED, BLUE, GREEN], params, items, strict=True):
        alone = post(fake, "/generate", {"text": text, "image_data": image, "sampling_params": p})
        assert alone.json()["text"] == item["text"]


def test_token_ids_logprob_deterministic_and_varies_by_image(fake: FakeSGLang, prefix: str) -> None:
    def ask(image: str) -> dict[str, Any]:
        body = gen_body(
            text=PROMPT + prefix,
            image_data=image,
            sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            return_logprob=True,
            top_logprobs_num=5,
            token_ids_logprob=[SAFE_ID, UNSAFE_ID],
        )
        reply = post(fake, "/generate", body)
        assert reply.status == 200, reply.text
        return dict(reply.json())

    red, red_again, blue = ask(RED), ask(RED), ask(BLUE)
    pairs = []
    for item in (red, blue):
        meta = item["meta_info"]
        assert item["text"] in ("Safe", "Unsafe")
        assert meta["finish_reason"] == {"type": "length", "length": 1}
        [position] = meta["output_token_ids_logprobs"]
        assert [entry[1] for entry in position] == [SAFE_ID, UNSAFE_ID]
        assert all(entry[0] < 0 and entry[2] is None for entry in position)
        probs = [math.exp(entry[0]) for entry in position]
        assert sum(probs) <= 1.0
        chosen = SAFE_ID if probs[0] >= probs[1] else UNSAFE_ID
        assert item["output_ids"] == [chosen]
        assert meta["output_token_logprobs"][0][:2] == [max(e[0] for e in position), chosen]
        [top] = meta["output_top_logprobs"]
        assert len(top) == 5 and {e[1] for e in top[:2]} == {SAFE_ID, UNSAFE_ID}
        assert sum(math.exp(e[0]) for e in top) <= 1.0
        pairs.append([entry[0] for entry in position])
    assert (
        red["meta_info"]["output_token_ids_logprobs"]
        == (red_again["meta_info"]["output_token_ids_logprobs"])
    )
    assert pairs[0] != pairs[1]


def test_logprobs_per_output_token(fake: FakeSGLang) -> None:
    body = gen_body(
        sampling_params={"max_new_tokens": 8},
        return_logprob=True,
        token_ids_logprob=[5, 6, 7],
        return_text_in_logprobs=True,
    )
    meta = post(fake, "/generate", body).json()["meta_info"]
    count = meta["completion_tokens"]
    assert len(meta["output_token_logprobs"]) == count == meta["output_token_logprobs_length"]
    assert "output_top_logprobs" not in meta  # only with top_logprobs_num > 0, as SGLang
    assert len(meta["output_token_ids_logprobs"]) == count
    for position in meta["output_token_ids_logprobs"]:
        assert [e[1] for e in position] == [5, 6, 7]
        assert sum(math.exp(e[0]) for e in position) <= 1.0
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])


def _without_sampling_key(key: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        del body["sampling_params"][key]

    return change


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[key] = value

    return change


def _set_param(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["sampling_params"][key] = value

    return change


GENERATE_REJECTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "negative max_new_tokens": (_set_param("max_new_tokens", -1), "integer >= 0"),
    "json_schema as dict": (_set_param("json_schema", {"type": "object"}), "must be a JSON string"),
    "json_schema not JSON": (_set_param("json_schema", "{type: object"), "not valid JSON"),
    "json_schema not a schema": (_set_param("json_schema", '{"type": 5}'), "valid JSON Schema"),
    # SamplingParams rejects unknown keys (api_types.py); the top level ignores them
    "unknown sampling key": (_set_param("max_tokens", 5), "unknown field(s) in sampling_params"),
    "negative temperature": (_set_param("temperature", -0.1), "temperature must be"),
    "top_p zero": (_set_param("top_p", 0), "top_p must be"),
    "top_k zero": (_set_param("top_k", 0), "top_k must be"),
    "regex": (_set_param("regex", "a+"), "not simulated"),
    "input_ids": (_set("input_ids", [1, 2]), "input_ids is not accepted"),
    "no text": (_set("text", None), "text must be a string"),
    "image token missing": (_set("text", "Assess the image."), "exactly once"),
    "image token twice": (_set("text", "<image><image>Assess"), "2 times"),
    "undecodable image": (_set("image_data", NOT_AN_IMAGE), "not an image Pillow can decode"),
    "garbage base64": (_set("image_data", "%%% not base64"), "not valid base64"),
    "two images for one text": (_set("image_data", [RED, BLUE]), "one image per text"),
    "token_ids_logprob without return_logprob": (
        _set("token_ids_logprob", [SAFE_ID]),
        "token_ids_logprob requires return_logprob: true",
    ),
    "top_logprobs_num without return_logprob": (
        _set("top_logprobs_num", 3),
        "top_logprobs_num requires return_logprob",
    ),
    "stream": (_set("stream", True), "stream must be false"),
    "sampling list for one text": (_set("sampling_params", [{"max_new_tokens": 5}]), "object"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_REJECTIONS))
def test_generate_rejections(fake: FakeSGLang, case: str) -> None:
    change, message = GENERATE_REJECTIONS[case]
    body = gen_body()
    change(body)
    reply = post(fake, "/generate", body)
    assert reply.status == 400, reply.text
    assert set(reply.json()) == {"error"}
    assert message in reply.json()["error"]["message"]
    assert fake.received[-1].status == 400


# What sglang-router 0.3.2 adds when it re-serialises a /generate body (measured)
ROUTER_GENERATE_FIELDS = {
    "model": None,
    "stream": False,
    "log_metrics": True,
    "return_hidden_states": False,
    "background": False,
    "no_logs": False,
    "return_bytes": False,
    "return_entropy": False,
    "return_text_in_logprobs": False,
}


def test_generate_ignores_unknown_top_level_keys_as_sglang_does(fake: FakeSGLang) -> None:
    plain = post(fake, "/generate", gen_body()).json()
    routed = post(fake, "/generate", gen_body(**ROUTER_GENERATE_FIELDS, anything_else=[1])).json()
    assert routed["text"] == plain["text"]


def test_generate_defaults_to_128_new_tokens_like_sglang(fake: FakeSGLang, compiled: Any) -> None:
    """SamplingParams.max_new_tokens defaults to 128: a full verdict is cut there."""
    for body in (
        gen_body(sampling_params={"json_schema": json.dumps(compiled.schema_for("full"))}),
        {"text": "Hello there"},  # no sampling_params at all
    ):
        meta = post(fake, "/generate", body).json()["meta_info"]
        if meta["finish_reason"]["type"] == "length":
            assert meta["finish_reason"] == {"type": "length", "length": 128}
        assert meta["completion_tokens"] <= 128
    full = gen_body(sampling_params={"json_schema": json.dumps(compiled.schema_for("full"))})
    assert post(fake, "/generate", full).json()["meta_info"]["completion_tokens"] == 128
    zero = post(fake, "/generate", gen_body(sampling_params={"max_new_tokens": 0})).json()
    assert zero["text"] == "" and zero["meta_info"]["completion_tokens"] == 0


def test_generate_top_logprobs_with_text(fake: FakeSGLang, prefix: str) -> None:
    """[logprob, token_id, text] per entry, text only with return_text_in_logprobs."""
    for with_text in (True, False):
        body = gen_body(
            text=PROMPT + prefix,
            sampling_params={"max_new_tokens": 1, "temperature": 1.0},
            return_logprob=True,
            top_logprobs_num=5,
            return_text_in_logprobs=with_text,
        )
        meta = post(fake, "/generate", body).json()["meta_info"]
        [top] = meta["output_top_logprobs"]
        assert len(top) == 5 and all(len(entry) == 3 for entry in top)
        assert {entry[1] for entry in top[:2]} == {SAFE_ID, UNSAFE_ID}
        texts = [entry[2] for entry in top]
        if with_text:
            assert set(texts[:2]) == {"Safe", "Unsafe"} and texts[2:] == ["S", "Un", "{"]
        else:
            assert texts == [None] * 5
        assert "output_token_ids_logprobs" not in meta


def test_generate_rejects_image_token_without_image(fake: FakeSGLang) -> None:
    reply = post(fake, "/generate", gen_body(image_data=None))
    assert reply.status == 400
    assert "but no image_data" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_data", [RED, BLUE], "image_data must be a list of 3"),
        ("sampling_params", [{"max_new_tokens": 5}] * 2, "one per text"),
        ("rid", ["a"], "rid must be"),
        ("image_data", RED, "must be a list"),
    ],
)
def test_generate_list_length_mismatch(
    fake: FakeSGLang, field: str, value: Any, message: str
) -> None:
    body = gen_body(text=[PROMPT] * 3, image_data=[RED] * 3)
    body[field] = value
    reply = post(fake, "/generate", body)
    assert reply.status == 400
    assert message in reply.json()["error"]["message"]


def test_generate_rejects_non_json_body(fake: FakeSGLang) -> None:
    async def send() -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                fake.url + "/generate", data=b"{nope", headers={"Content-Type": "application/json"}
            ) as response,
        ):
            return response.status, await response.json()

    status, body = asyncio.run(send())
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert fake.received[-1].body is None


# ---- /v1/chat/completions ---------------------------------------------------------------------


def test_chat_plain_reply_shape(fake: FakeSGLang) -> None:
    reply = post(fake, "/v1/chat/completions", chat_body(model="anything"))
    assert reply.status == 200, reply.text
    data = reply.json()
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert isinstance(data["created"], int) and data["model"] == "anything"
    [choice] = data["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["completion_tokens"] == len(toy_ids(choice["message"]["content"]))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_chat_schema_replies_validate(fake: FakeSGLang, compiled: Any, mode: str) -> None:
    schema = compiled.schema_for(mode)
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": schema, "strict": True}}
    for image in (RED, BLUE):
        body = chat_body(messages=[user_turn(data_url(image))], response_format=fmt)
        data = post(fake, "/v1/chat/completions", body).json()
        jsonschema.validate(json.loads(data["choices"][0]["message"]["content"]), schema)
    text_format = chat_body(response_format={"type": "text"}, max_completion_tokens=4)
    del text_format["max_tokens"]
    data = post(fake, "/v1/chat/completions", text_format).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 4


def test_chat_truncates_at_max_tokens(fake: FakeSGLang, compiled: Any) -> None:
    body = chat_body(max_tokens=128, response_format=nested_format(compiled.schema_for("full")))
    data = post(fake, "/v1/chat/completions", body).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 128


def test_chat_prefill_verdict_logprobs(fake: FakeSGLang, prefix: str) -> None:
    def ask(image: str, max_tokens: int = 1) -> dict[str, Any]:
        body = chat_body(
            messages=[user_turn(data_url(image)), {"role": "assistant", "content": prefix}],
            continue_final_message=True,
            max_tokens=max_tokens,
            logprobs=True,
            top_logprobs=6,
        )
        reply = post(fake, "/v1/chat/completions", body)
        assert reply.status == 200, reply.text
        return dict(reply.json()["choices"][0])

    tops = []
    for image in (RED, BLUE):
        choice = ask(image)
        content = choice["message"]["content"]
        assert content in ("Safe", "Unsafe") and choice["finish_reason"] == "length"
        [first] = choice["logprobs"]["content"]
        assert first["token"] == content and first["bytes"] == list(content.encode())
        top = {entry["token"]: entry["logprob"] for entry in first["top_logprobs"]}
        assert len(top) == 6 and {"Safe", "Unsafe"} <= set(top)
        assert max(top, key=lambda t: top[t]) == content == first["token"]
        assert all(lp < 0 for lp in top.values())
        assert sum(math.exp(lp) for lp in top.values()) <= 1.0
        assert set(top) == {"Safe", "Unsafe", "S", "Un", "{", " "}
        tops.append(top)
    assert tops[0] != tops[1]
    assert ask(RED)["logprobs"] == ask(RED)["logprobs"]
    longer = ask(RED, max_tokens=500)
    assert not longer["message"]["content"].startswith("{")
    assert json.loads(prefix + longer["message"]["content"])["rating"] in ("Safe", "Unsafe")


def test_chat_logprobs_cover_every_output_token(fake: FakeSGLang) -> None:
    body = chat_body(max_tokens=12, logprobs=True, top_logprobs=2)
    choice = post(fake, "/v1/chat/completions", body).json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for entry in entries:
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert set(entry["top_logprobs"][1]) == {"token", "logprob", "bytes"}


def _chat_set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[key] = value

    return change


def _chat_del(key: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        del body[key]

    return change


FLAT = {"type": "json_schema", "schema": {"type": "object"}}
CHAT_REJECTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "flat response_format": (_chat_set("response_format", FLAT), FLAT_SCHEMA_MESSAGE),
    "json_object format": (
        _chat_set("response_format", {"type": "json_object"}),
        "must be 'json_schema' or 'text'",
    ),
    "schema without name": (
        _chat_set("response_format", {"type": "json_schema", "json_schema": {"schema": {}}}),
        "name is required",
    ),
    "zero max_tokens": (_chat_set("max_tokens", 0), "max_tokens must be an integer >= 1"),
    "string temperature": (_chat_set("temperature", "hot"), "temperature must be"),
    "empty messages": (_chat_set("messages", []), "messages must be a non-empty list"),
    "stream": (_chat_set("stream", True), "stream must be false"),
    "top_logprobs without logprobs": (_chat_set("top_logprobs", 3), "requires logprobs"),
    "unknown role": (
        _chat_set("messages", [{"role": "tool", "content": "x"}]),
        "role must be 'system', 'user' or 'assistant'",
    ),
    "undecodable image": (
        _chat_set("messages", [user_turn(data_url(NOT_AN_IMAGE))]),
        "not an image Pillow can decode",
    ),
    "http image": (
        _chat_set("messages", [user_turn("http://example.com/cat.png")]),
        "data:image/...;base64, URL",
    ),
    "image token in text": (
        _chat_set("messages", [user_turn(text="<image>\nAssess")]),
        "image tokens do not match the images",
    ),
}


@pytest.mark.parametrize("case", sorted(CHAT_REJECTIONS))
def test_chat_rejections(fake: FakeSGLang, case: str) -> None:
    change, message = CHAT_REJECTIONS[case]
    body = chat_body()
    change(body)
    reply = post(fake, "/v1/chat/completions", body)
    assert reply.status == 400, reply.text
    data = reply.json()
    assert {k: data[k] for k in ("object", "type", "code")} == {
        "object": "error",
        "type": "BadRequestError",
        "code": 400,
    }
    assert message in data["message"]


# What sglang-router 0.3.2 sends for a chat request it re-serialises (measured): max_tokens
# renamed to max_completion_tokens, add_generation_prompt dropped, SGLang's defaults added.
ROUTER_CHAT_FIELDS = {
    "no_stop_trim": False,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
}


def test_chat_takes_what_sglang_takes(fake: FakeSGLang) -> None:
    """Unknown keys ignored, max_tokens or max_completion_tokens (the latter wins), no budget
    or temperature needed, a string user message, text before the image."""
    routed = chat_body(**ROUTER_CHAT_FIELDS, add_generation_prompt=False, frequency_penalty=0.5)
    assert post(fake, "/v1/chat/completions", routed).status == 200
    both = chat_body(max_tokens=3, max_completion_tokens=5)
    assert post(fake, "/v1/chat/completions", both).json()["usage"]["completion_tokens"] == 5
    bare = {"messages": [user_turn()]}
    reply = post(fake, "/v1/chat/completions", bare)
    assert reply.status == 200 and reply.json()["choices"][0]["finish_reason"] == "stop"
    text_first = {
        "role": "user",
        "content": [
            {"type": "text", "text": "Assess"},
            {"type": "image_url", "image_url": {"url": data_url(RED)}},
        ],
    }
    for messages in ([{"role": "user", "content": "Assess"}], [text_first]):
        assert post(fake, "/v1/chat/completions", chat_body(messages=messages)).status == 200
    assert fake.prompts[-1].endswith(
        "<|im_start|>user\nAssess<image>\n<|im_end|>\n<|im_start|>assistant\n"
    )


# The prompt SGLang 0.5.23 builds for chat_body(messages=[user_turn(), prefill]) with
# continue_final_message, per --chat-template. Golden strings from running SGLang's own
# conversation.py (generate_chat_conv, get_prompt) and serving_chat._apply_conversation_template's
# strip on this request, outside this repository; None is the model's HF template (Jinja path).
SYSTEM_VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
PREFILL = '{\n    "rating": "'
CONTINUED = {
    None: "<|im_start|>user\n<image>\nAssess the image.<|im_end|>\n<|im_start|>assistant\n"
    + PREFILL,
    "chatml-llava": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nAssess the image.<|im_end|>\n<|im_start|>assistant\n"
    + PREFILL
    + "<|im_end|>\n",  # closed: CHATML ends a message with <|im_end|>\n, nothing is stripped
    "vicuna_v1.1": SYSTEM_VICUNA + " USER: <image>\nAssess the image. ASSISTANT: " + PREFILL,
    "qwen2-vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Assess the image.<|im_end|>\n"
    "<|im_start|>assistant\n" + PREFILL,
}


@pytest.mark.parametrize("template", list(CONTINUED), ids=str)
def test_continue_final_message_renders_as_sglang_does(template: str | None, prefix: str) -> None:
    assert prefix == PREFILL
    with serve(chat_template=template) as server:
        body = chat_body(
            messages=[user_turn(), {"role": "assistant", "content": prefix}],
            continue_final_message=True,
            max_tokens=1,
            logprobs=True,
            top_logprobs=20,
        )
        reply = post(server, "/v1/chat/completions", body).json()
        assert server.prompts == [CONTINUED[template]]
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        rating_mass = sum(
            math.exp(t["logprob"])
            for t in top
            if t["token"] and any(r.startswith(t["token"]) for r in ("Safe", "Unsafe"))
        )
        # a continued turn is at the rating; a closed one is not, whatever follows
        assert (rating_mass > 0.9) == (template != "chatml-llava"), rating_mass


@pytest.mark.parametrize("template", list(CONTINUED), ids=str)
def test_a_final_assistant_message_without_continue_is_not_continued(
    template: str | None, prefix: str
) -> None:
    """Without continue_final_message the prefill is closed (conversation templates) or becomes
    a user message (the Jinja path), and a new assistant turn follows."""
    with serve(chat_template=template) as server:
        body = chat_body(messages=[user_turn(), {"role": "assistant", "content": prefix}])
        assert post(server, "/v1/chat/completions", body).status == 200
        [prompt] = server.prompts
        assert not prompt.endswith(prefix)
        assert prompt.endswith(("<|im_start|>assistant\n", "ASSISTANT:"))


# ---- auth ----------------------------------------------------------------------------------


def test_api_key_required_except_health() -> None:
    with serve(api_key="sekrit") as fake:
        good = {"Authorization": "Bearer sekrit"}
        assert get(fake, "/health").status == 200
        assert get(fake, "/health_generate").status == 200
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            denied = get(fake, "/get_model_info", headers=headers)
            assert denied.status == 401 and denied.json() == {"error": "Unauthorized"}
            assert post(fake, "/generate", gen_body(), headers=headers).status == 401
        assert get(fake, "/v1/models").status == 401
        assert get(fake, "/v1/models", headers=good).status == 200
        assert post(fake, "/generate", gen_body(), headers=good).status == 200
        chat = post(fake, "/v1/chat/completions", chat_body(), headers=good)
        assert chat.status == 200
        assert [r.path for r in fake.received] == ["/generate", "/v1/chat/completions"]
        assert fake.received[0].headers["Authorization"] == "Bearer sekrit"


# ---- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "503"])
def test_status_faults(fake: FakeSGLang, kind: str) -> None:
    fake.inject(Fault(kind))  # type: ignore[arg-type]
    failed = post(fake, "/generate", gen_body())
    assert failed.status == int(kind) and "message" in failed.json()["error"]
    assert post(fake, "/generate", gen_body()).status == 200
    assert [(r.fault, r.status) for r in fake.received] == [(kind, int(kind)), (None, 200)]


@pytest.mark.parametrize(("seconds", "header"), [(2, "2"), (2.0, "2"), (1.5, "1.5"), (None, None)])
def test_429_sends_retry_after(fake: FakeSGLang, seconds: float | None, header: str | None) -> None:
    fake.inject(Fault("429", retry_after=seconds))
    reply = post(fake, "/v1/chat/completions", chat_body())
    assert reply.status == 429
    assert reply.headers.get("Retry-After") == header
    assert reply.json()["code"] == 429


def test_drop_fault_is_a_connection_error(fake: FakeSGLang) -> None:
    fake.inject(Fault("drop"))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        post(fake, "/generate", gen_body())
    assert post(fake, "/generate", gen_body()).status == 200
    assert [(r.fault, r.status) for r in fake.received] == [("drop", 0), (None, 200)]


def test_timeout_fault_times_the_client_out(fake: FakeSGLang) -> None:
    fake.inject(Fault("timeout"))
    with pytest.raises(asyncio.TimeoutError):
        post(fake, "/generate", gen_body(), timeout=0.3)
    assert fake.received[-1].fault == "timeout" and fake.received[-1].status == 0
    assert post(fake, "/generate", gen_body()).status == 200


def test_malformed_and_shape_faults(fake: FakeSGLang) -> None:
    fake.inject(Fault("malformed"), Fault("shape"))
    broken = post(fake, "/generate", gen_body())
    assert broken.status == 200
    assert broken.headers["Content-Type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        broken.json()
    odd = post(fake, "/generate", gen_body())
    assert odd.status == 200 and "text" not in odd.json()


def test_slow_fault_answers_normally(fake: FakeSGLang) -> None:
    fake.inject(Fault("slow", delay=0.05))
    reply = post(fake, "/generate", gen_body())
    assert reply.status == 200 and "text" in reply.json()
    assert fake.received[-1].fault == "slow"


def test_faults_fifo_times_paths_and_before_validation(fake: FakeSGLang) -> None:
    fake.inject(Fault("500", path="/v1/chat/completions"))
    fake.inject(Fault("500"), Fault("503"), times=2)
    assert len(fake.pending_faults) == 5
    # Consumed before validation: an invalid body still gets the fault.
    statuses = [post(fake, "/generate", {"bogus": True}).status for _ in range(4)]
    assert statuses == [500, 500, 503, 503]
    assert post(fake, "/generate", gen_body()).status == 200
    chat = post(fake, "/v1/chat/completions", chat_body())
    assert chat.status == 500 and chat.json()["type"] == "InternalServerError"
    assert post(fake, "/v1/chat/completions", chat_body()).status == 200
    fake.inject(Fault("503"), times=3)
    fake.clear()
    assert fake.pending_faults == [] and fake.received == [] and not fake.counts
    assert post(fake, "/generate", gen_body()).status == 200


def test_fault_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        Fault("418")  # type: ignore[arg-type]


def test_stop_cancels_a_hung_handler() -> None:
    fake = FakeSGLang().start()
    fake.inject(Fault("timeout"))  # hangs 30 s unless cancelled
    port = int(fake.url.rsplit(":", 1)[1])
    body = json.dumps(gen_body()).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        for _ in range(1000):  # wait (boundedly) until the handler has the request
            if fake.received:
                break
            time.sleep(0.01)
        assert fake.received and fake.received[0].fault == "timeout"
        fake.stop()
        sock.settimeout(None)
        assert sock.recv(1024) == b""  # closed without a reply
    assert fake.received[0].status == 0


# ---- capacity ------------------------------------------------------------------------------


def test_concurrency_in_flight_and_slots() -> None:
    async def burst(fake: FakeSGLang, count: int) -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                body = gen_body(text=f"{PROMPT} {i}")
                async with session.post(fake.url + "/generate", json=body) as response:
                    await response.read()
                    return response.status

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    with serve(max_running=2, service_time=0.05) as fake:
        assert asyncio.run(burst(fake, 6)) == [200] * 6
        assert fake.counts["/generate"] == 6
        assert fake.max_in_flight > 2  # handlers queue for the two slots
        assert fake.max_busy_slots == 2  # never more than max_running at once
        fake.clear()
        assert fake.max_in_flight == 0 and fake.max_busy_slots == 0
        # A native list batch takes one slot and one service time for all its items.
        batch = {"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 2}}
        assert len(post(fake, "/generate", batch).json()) == 3
        assert fake.max_busy_slots == 1


# ---- subprocess mode -----------------------------------------------------------------------


def test_subprocess_mode_serves_and_stops_on_sigterm() -> None:
    script = HERE / "sglang_server.py"
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--port",
            "0",
            "--service-time",
            "0.01",
            "--max-running",
            "4",
            "--model-path",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        url = match.group(1)
        with urllib.request.urlopen(url + "/health") as response:
            assert response.status == 200 and response.read() == b""
        with urllib.request.urlopen(url + "/get_model_info") as response:
            assert json.loads(response.read())["model_path"] == "tiny"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stdout.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()
