"""`policy_engine.backends.ray_llm`: the preprocess/postprocess of a `ray.data.llm` processor.

vLLM and SGLang cannot run here: their steps are checked on the row shapes Ray 2.60's stages
read and write. The HTTP processor runs for real against the loopback SGLang server.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data.llm")

from PIL import Image  # noqa: E402
from policy_engine.backends.ray_llm import (  # noqa: E402
    COLUMNS,
    ERROR_KEY,
    build_llm_processor,
    llm_processor_steps,
)
from sglang_server import FakeSGLang  # noqa: E402

from policy_engine import PolicyEngineError, get_host, load_policy  # noqa: E402
from policy_engine.ray import LOCAL_SYSTEM_CONFIG  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
POLICY = "children-platform"
VIOLENCE = "O2: Violence, Harm, or Cruelty"


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24 + seed, 16), (seed * 50 % 256, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def compiled() -> Any:
    return get_host().compile(load_policy(POLICY))


def answer(rating: str, category: str) -> str:
    return json.dumps({"rating": rating, "category": category, "rationale": "Checked."})


# -- engine kinds: the row shapes the stages read --------------------------------------------
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_preprocess_gives_the_engine_stage_its_row(engine: str) -> None:
    pre, _ = llm_processor_steps(POLICY, engine=engine, model="llavaguard")  # type: ignore[arg-type]
    row = pre({"id": "a", "image": png(1)})
    (message,) = row["messages"]
    image, text = message["content"]
    assert message["role"] == "user"
    assert image["type"] == "image_url"
    sent = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",", 1)[1])))
    assert sent.size == (25, 16)
    assert text == {"type": "text", "text": compiled().prompt}
    params = row["sampling_params"]
    assert params["temperature"] == 0.0 and "top_p" not in params and "top_k" not in params
    if engine == "vllm":  # vllm.SamplingParams(**params, structured_outputs=...(json=...))
        assert params["max_tokens"] == compiled().max_new_tokens
        assert json.loads(params["structured_outputs"]["json"]) == compiled().schema_for("full")
    else:  # SGLang's sampling params take json_schema as a JSON string
        assert params["max_new_tokens"] == compiled().max_new_tokens
        assert json.loads(params["json_schema"]) == compiled().schema_for("full")
        assert row["image_data"] == image["image_url"]["url"]
    assert row["id"] == "a" and row[ERROR_KEY] == ""  # a null marker would skip the row


def test_verdict_mode_sends_the_verdict_schema() -> None:
    pre, _ = llm_processor_steps(POLICY, engine="vllm", mode="verdict")
    params = pre({"id": 1, "image": png(2)})["sampling_params"]
    assert json.loads(params["structured_outputs"]["json"]) == compiled().schema_for("verdict")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_postprocess_reads_the_engine_answer_strictly(engine: str) -> None:
    _, post = llm_processor_steps(POLICY, engine=engine, model="llavaguard")  # type: ignore[arg-type]
    stage_row = {"id": "a", "prompt": "...", "num_input_tokens": 9, "generated_tokens": [1]}

    unsafe = post(stage_row | {"generated_text": answer("Unsafe", VIOLENCE)})
    assert set(unsafe) == {"id", *COLUMNS}
    assert (unsafe["rating"], unsafe["category"], unsafe["error"]) == ("Unsafe", "O2", None)
    assert unsafe["actions"] == ["block"]  # children-platform blocks every unsafe verdict
    assert unsafe["policy_id"] == POLICY and unsafe["policy_hash"] == compiled().hash
    assert unsafe["model"] == "llavaguard" and json.loads(unsafe["decoding"]) == {
        "method": "greedy"
    }
    assert unsafe["p_unsafe"] is None and unsafe["id"] == "a"

    safe = post(stage_row | {"generated_text": answer("Safe", compiled().none_label)})
    assert (safe["rating"], safe["error"], safe["actions"]) == ("Safe", None, [])

    outside = post(stage_row | {"generated_text": answer("Unsafe", compiled().none_label)})
    assert outside["rating"] is None and outside["error"].startswith("output: invalid verdict")

    prose = post(stage_row | {"generated_text": "The image is safe. " + answer("Safe", VIOLENCE)})
    assert prose["rating"] is None and prose["error"].startswith("output:")

    failed = post(stage_row | {"generated_text": "", ERROR_KEY: "EngineDeadError: boom"})
    assert failed["rating"] is None and "EngineDeadError" in failed["error"]


def test_an_undecodable_image_is_an_error_row_that_skips_the_stages() -> None:
    pre, post = llm_processor_steps(POLICY, engine="vllm")
    row = pre({"id": "bad", "image": b"not an image"})
    assert (
        row[ERROR_KEY].startswith("policy-engine image") and "messages" not in row
    )  # Ray's stages pass such rows through
    out = post(row)
    assert out["rating"] is None and out["error"].startswith("image: ")


def test_score_mode_and_the_sglang_engine_processor_are_refused() -> None:
    from ray.data.llm import SGLangEngineProcessorConfig

    with pytest.raises(PolicyEngineError, match="score"):
        llm_processor_steps(POLICY, engine="vllm", mode="score")
    config = SGLangEngineProcessorConfig(model_source="unused", engine_kwargs={})
    with pytest.raises(PolicyEngineError, match="image_data"):
        build_llm_processor(POLICY, config)


# -- the HTTP processor for real -------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    if ray.is_initialized():  # pragma: no cover - another module left one running
        ray.shutdown()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        logging_level="WARNING",
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSGLang]:
    with FakeSGLang() as server:
        yield server


def test_http_processor_against_the_loopback_server(local_ray: None, fake: FakeSGLang) -> None:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    fake.clear()
    pre, post = llm_processor_steps(POLICY, engine="http", model="llavaguard", server="sglang")
    config = HttpRequestProcessorConfig(
        url=f"{fake.url}/v1/chat/completions", concurrency=1, batch_size=2
    )
    processor = build_processor(config, preprocess=pre, postprocess=post)
    items = [{"id": f"img{i}", "image": png(i)} for i in range(3)]
    rows = {row["id"]: row for row in processor(ray.data.from_items(items)).take_all()}

    bodies = [r.body for r in fake.received if r.path == "/v1/chat/completions"]
    assert len(bodies) == len(rows) == 3
    for body in bodies:  # what the sglang backend sends, through Ray's Arrow round trip
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema == compiled().schema_for("full")
        image, text = body["messages"][0]["content"]
        # Arrow unifies the two content parts' keys: each gains the other's key as null
        assert text == {"type": "text", "text": compiled().prompt, "image_url": None}
        assert image["type"] == "image_url" and image.get("text") is None
        assert body["temperature"] == 0.0
    by_image = {body["messages"][0]["content"][0]["image_url"]["url"]: body for body in bodies}
    for row in rows.values():
        assert row["error"] is None and row["rating"] in ("Safe", "Unsafe")
        assert row["policy_hash"] == compiled().hash
        assert (row["actions"] == ["block"]) == (row["rating"] == "Unsafe")
    # the verdicts are the loopback model's: the same answer for the same request body
    for item in items:
        url = "data:image/png;base64," + base64.b64encode(item["image"]).decode()
        reply = post_json(f"{fake.url}/v1/chat/completions", by_image[url])
        content = json.loads(reply["choices"][0]["message"]["content"])
        assert rows[item["id"]]["rating"] == content["rating"]
        assert rows[item["id"]]["category"] == compiled().labels[content["category"]]


def test_build_llm_processor_turns_bad_images_and_server_errors_into_rows(
    local_ray: None, fake: FakeSGLang
) -> None:
    from ray.data.llm import HttpRequestProcessorConfig

    fake.clear()
    config = HttpRequestProcessorConfig(
        url=f"{fake.url}/v1/chat/completions", concurrency=1, batch_size=2
    )
    judge = build_llm_processor(POLICY, config, model="llavaguard", server="sglang")
    items = [{"id": "ok", "image": png(4)}, {"id": "bad", "image": b"junk"}]
    rows = {row["id"]: row for row in judge(ray.data.from_items(items)).take_all()}
    assert rows["ok"]["error"] is None and rows["ok"]["rating"] in ("Safe", "Unsafe")
    assert rows["bad"]["rating"] is None and rows["bad"]["error"].startswith("image: ")
    assert rows["bad"]["policy_hash"] == compiled().hash


def test_an_error_body_from_the_server_is_an_error_row() -> None:
    _, post = llm_processor_steps(POLICY, engine="http")
    out = post({"id": 1, "http_response": {"object": "error", "message": "bad request"}})
    assert out["rating"] is None and "bad request" in out["error"]
    cut = {"choices": [{"message": {"content": '{"rating": "Sa'}, "finish_reason": "length"}]}
    out = post({"id": 2, "http_response": cut})
    assert out["rating"] is None and "token budget" in out["error"]


def post_json(url: str, body: Any) -> Any:
    import urllib.request

    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as reply:
        return json.loads(reply.read())
