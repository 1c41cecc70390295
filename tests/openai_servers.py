"""Loopback stand-ins for OpenAI-style chat servers that are not SGLang.

Each follows its real counterpart's source where it matters to a client:

- `transformers-serve` (transformers 5.25, `cli/serving/utils.py` `_validate_request` and
  `chat_completion.py`): a field outside OpenAI's `CompletionCreateParamsStreaming` (plus
  `generation_config`, `seed`, `chat_template_kwargs`) is a 422 `{"detail": "Unexpected fields
  in the request: {...}"}`; `response_format`, `logprobs`, `top_logprobs`, `n`, `user`, … are
  ignored with a warning, so it decodes unconstrained; `temperature` is dropped here (its
  generation flags are not valid for the model, FIELD-NOTES); `/health` answers
  `{"status": "ok"}`; model cards are owned by the hub organisation.
- `openai` (OpenAI's own API): an unknown parameter is a 400 `Unrecognized request argument
  supplied: NAME`; `response_format` json_schema is honoured; there is no
  `continue_final_message`, so a final assistant message is a closed turn.
- `vllm` (vLLM's `ChatCompletionRequest`): extra fields such as `top_k`, `continue_final_message`
  and `add_generation_prompt` (default true) are taken, and both true together is a 400
  ("Cannot set both"); `GET /version` answers; model cards are owned by `vllm`.

`answers` says what the model writes when it is not constrained (or ignores the schema):
`layout` (a LlavaGuard verdict in its trained layout, rationale included), `free` (sentences:
random weights), `prose` (words around a JSON object whose own words name the other rating),
`array` (the verdict inside a JSON array). A server that honours the schema answers a schema
instance whatever `answers` says.
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
import uuid
from typing import Any, Literal

from aiohttp import web
from fake_model import (
    LLAVAGUARD_CATEGORIES,
    NO_CATEGORY,
    VERDICT_TAIL,
    complete,
    name_of,
    plain_reply,
    positions,
    rng_for,
    sentence_words,
    top_logprobs,
    verdict_continuation,
    verdict_for,
)
from loopback import LoopbackServer
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming
from schema_instances import instance_for

Flavour = Literal["transformers-serve", "openai", "vllm"]
Answers = Literal["layout", "free", "prose", "array"]
# transformers serve: TransformersCompletionCreateParamsStreaming's keys
TRANSFORMERS_FIELDS = frozenset(CompletionCreateParamsStreaming.__mutable_keys__) | {
    "generation_config",
    "seed",
    "chat_template_kwargs",
}
OPENAI_FIELDS = frozenset(CompletionCreateParamsStreaming.__mutable_keys__)


class OpenAIStyleServer(LoopbackServer):
    name = "openai-style"

    def __init__(
        self,
        flavour: Flavour,
        *,
        answers: Answers | None = None,
        model: str = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf",
        seed: int = 0,
        port: int = 0,
    ) -> None:
        super().__init__(port=port)
        self.flavour = flavour
        self.honours_schema = flavour != "transformers-serve"
        self.answers: Answers = answers or "layout"
        self.model = model
        self.seed = seed
        self.bodies: list[dict[str, Any]] = []  # every chat body received
        self.statuses: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        if self.flavour == "vllm":
            app.router.add_get("/version", self._version)
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _health(self, request: web.Request) -> web.Response:
        if self.flavour == "transformers-serve":
            return web.json_response({"status": "ok"})
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.11.0"})

    async def _models(self, request: web.Request) -> web.Response:
        owner = {"transformers-serve": self.model.split("/")[0], "openai": "system"}
        card = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": owner.get(self.flavour, "vllm"),
        }
        return web.json_response({"object": "list", "data": [card]})

    def _refuse(self, body: dict[str, Any]) -> web.Response | None:
        if self.flavour == "transformers-serve":
            unexpected = set(body) - TRANSFORMERS_FIELDS
            if unexpected:
                detail = f"Unexpected fields in the request: {unexpected}"
                return web.json_response({"detail": detail}, status=422)
        elif self.flavour == "openai":
            for key in body:
                if key not in OPENAI_FIELDS:
                    error = {
                        "message": f"Unrecognized request argument supplied: {key}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                    return web.json_response({"error": error}, status=400)
        elif body.get("continue_final_message") and body.get("add_generation_prompt", True):
            message = (
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
            return web.json_response(
                {"object": "error", "message": message, "code": 400}, status=400
            )
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            self.bodies.append(body)
        response = self._refuse(body) or self._answer(body)
        with self._lock:
            self.statuses[response.status] += 1
        return response

    def _answer(self, body: dict[str, Any]) -> web.Response:
        messages = body["messages"]
        prompt = json.dumps(messages, sort_keys=True)
        rng = rng_for(self.seed, "content", prompt)
        last = messages[-1]
        continues = (
            self.flavour == "vllm"
            and body.get("continue_final_message")
            and last.get("role") == "assistant"
            and str(last.get("content", "")).endswith(VERDICT_TAIL)
        )
        verdict = None
        schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
        if continues:
            rating, p_safe, p_unsafe = verdict_for(self.seed, prompt)
            verdict = (p_safe, p_unsafe)
            text = verdict_continuation(rating, rng)
        elif schema is not None and self.honours_schema:
            text = json.dumps(instance_for(schema, rng), indent=4)
        else:
            text = self.unconstrained(rng)
        budget = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
        completion = complete(text, budget, verdict)
        logprobs = None
        if body.get("logprobs") and self.flavour != "transformers-serve":
            count = int(body.get("top_logprobs") or 0)
            probs_at = positions(self.seed, (prompt,), completion, count, [])
            names = dict(zip(completion.ids, completion.pieces, strict=True))
            logprobs = {
                "content": [
                    {
                        "token": piece,
                        "logprob": math.log(probs[token_id]),
                        "top_logprobs": [
                            {"token": name_of(t, names), "logprob": lp}
                            for t, lp in top_logprobs(probs, count)
                        ],
                    }
                    for piece, token_id, probs in zip(
                        completion.pieces, completion.ids, probs_at, strict=True
                    )
                ]
            }
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": logprobs,
            "finish_reason": "length" if completion.truncated else "stop",
        }
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [choice],
            }
        )

    def unconstrained(self, rng: Any) -> str:
        """What the model writes when nothing constrains it (see the module docstring)."""
        if self.answers == "free":
            return plain_reply(rng)
        rationale = sentence_words(rng, rng.randint(8, 20))
        if self.answers == "layout":
            rating = rng.choice(["Safe", "Unsafe"])
            return '{\n    "rating": "' + verdict_continuation(rating, rng)
        said = {"rating": "Safe", "category": NO_CATEGORY, "rationale": rationale}
        if self.answers == "array":
            return json.dumps([said], indent=4)
        other = LLAVAGUARD_CATEGORIES[1]
        return (
            f"The answer format is {json.dumps(said)}. "
            f"My assessment: this image is Unsafe ({other})."
        )
