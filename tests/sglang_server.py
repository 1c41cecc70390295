"""A loopback stand-in for an SGLang server, for testing the SGLang client backend without a GPU.

It speaks SGLang's native API (`/generate`, `/tokenize`) and the OpenAI-compatible API
(`/v1/chat/completions`, `/v1/models`), answers the info routes SGLang's router probes
(`/health`, `/server_info`, `/get_server_info`, `/model_info`, `/get_model_info`), accepts
and rejects what SGLang 0.5.23 accepts and rejects (`sglang_protocol.py`: unknown top-level
keys ignored, `sampling_params` strict, list `text` accepted; chats rendered with the
configured template, so a prefilled assistant turn is continued or closed as SGLang would),
returns logprobs in SGLang's shapes, answers schema-valid replies from a toy model
(`fake_model.py`, `schema_instances.py`) and injects faults on demand. It can stand behind
SGLang's real router.

Two ways to run it:

* in a background thread, for pytest::

      with FakeSGLang() as fake:
          ...  # talk to fake.url
      fake.inject(Fault("503"), times=2)

* as a subprocess, for a benchmark or behind a router::

      python tests/sglang_server.py --port 0 --service-time 0.1 --max-running 64

  prints one line ``listening on http://127.0.0.1:PORT`` once ready and exits cleanly on
  SIGTERM/SIGINT.

`chat_template` is the server's `--chat-template`: a conversation template name
(`chatml-llava`, `vicuna_v1.1`, `qwen2-vl`) or None for the model's own HF template (which
continues a prefilled assistant message).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from aiohttp import web
from fake_model import (
    EOS_ID,
    IMAGE_PROMPT_TOKENS,
    MAX_MODEL_LEN,
    VERDICT_TAIL,
    Completion,
    complete,
    name_of,
    plain_reply,
    positions,
    rng_for,
    top_logprobs,
    toy_ids,
    verdict_continuation,
    verdict_for,
)
from loopback import HOST, LoopbackServer
from schema_instances import instance_for, validator
from sglang_protocol import (
    CONVERSATIONS,
    JINJA_IMAGE_TOKEN,
    Invalid,
    parse_chat,
    parse_generate,
    render_chat,
)

DEFAULT_TIMEOUT_HANG = 30.0
VERSION = "0.5.23"  # the SGLang release whose behaviour this follows

# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


FaultKind = Literal["500", "503", "429", "timeout", "drop", "malformed", "slow", "shape"]
FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))


@dataclass(frozen=True)
class Fault:
    """One injected failure, consumed by the next matching request (before validation): any
    POST when `path` is None, else the next request to `path` (a GET route too)."""

    kind: FaultKind
    path: str | None = None  # only requests to this path; None = any POST
    retry_after: float | None = None  # "429": Retry-After seconds (no header when None)
    delay: float = 0.0  # "slow": extra seconds; "timeout": hang time (0 means 30 s)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after must not be negative")


@dataclass
class Received:
    """One POST request that reached a handler."""

    path: str
    body: dict[str, Any] | list[Any] | None  # None when the body was not JSON (or a scalar)
    headers: dict[str, str]
    fault: str | None = None  # the injected fault kind, if one was consumed
    status: int = 0  # 0 while being handled, or when no reply was sent (timeout, drop)


def _retry_after_value(seconds: float) -> str:
    if float(seconds).is_integer():
        return str(int(seconds))
    return format(seconds, ".6f").rstrip("0").rstrip(".")


def _native_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


_OPENAI_ERROR_TYPES = {
    400: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def _openai_error(status: int, message: str) -> web.Response:
    body = {
        "object": "error",
        "message": message,
        "type": _OPENAI_ERROR_TYPES.get(status, "Error"),
        "code": status,
    }
    return web.json_response(body, status=status)


def _error_for(path: str, status: int, message: str) -> web.Response:
    if path.startswith("/v1/"):
        return _openai_error(status, message)
    return _native_error(status, message)


_Handler = Callable[[Any], Awaitable[web.StreamResponse]]


class FakeSGLang(LoopbackServer):
    """A fake SGLang server on 127.0.0.1 (see the module docstring)."""

    name = "fake-sglang"

    def __init__(
        self,
        *,
        model_path: str = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV",
        chat_template: str | None = None,
        image_token: str | None = None,
        api_key: str | None = None,
        service_time: float = 0.0,
        max_running: int = 64,
        seed: int = 0,
        port: int = 0,
    ) -> None:
        super().__init__(port=port)
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        if service_time < 0:
            raise ValueError("service_time must not be negative")
        if chat_template is not None and chat_template not in CONVERSATIONS:
            raise ValueError(f"unknown chat template {chat_template!r}")
        self.model_path = model_path
        self.chat_template = chat_template
        if image_token is None:
            image_token = (
                CONVERSATIONS[chat_template].image_token if chat_template else JINJA_IMAGE_TOKEN
            )
        self.image_token = image_token
        self.api_key = api_key
        self.service_time = service_time
        self.max_running = max_running
        self.seed = seed
        self.received: list[Received] = []
        self.prompts: list[str] = []  # the chat prompts as rendered, in order
        self.counts: collections.Counter[str] = collections.Counter()
        self.gets: collections.Counter[str] = collections.Counter()  # GET requests by path
        self.max_in_flight = 0
        self.max_busy_slots = 0  # the highest number of generation slots held at once
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._in_flight = 0
        self._busy = 0
        self._slots: asyncio.Semaphore | None = None

    # ---- public API -------------------------------------------------------------------------

    def inject(self, *faults: Fault, times: int = 1) -> None:
        """Queue faults, each `times` times in a row (inject(a, b, times=2) -> a a b b)."""
        if times < 0:
            raise ValueError("times must not be negative")
        with self._lock:
            for fault in faults:
                if not isinstance(fault, Fault):
                    raise TypeError(f"expected a Fault, got {fault!r}")
                self._faults.extend([fault] * times)

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        """Forget received requests, counts, the in-flight/slot maxima and pending faults."""
        with self._lock:
            self.received.clear()
            self.prompts.clear()
            self.counts.clear()
            self.gets.clear()
            self._faults.clear()
            self.max_in_flight = self._in_flight
            self.max_busy_slots = self._busy

    # ---- routes -----------------------------------------------------------------------------

    def middlewares(self) -> list[Any]:
        return [self._auth_middleware]

    def routes(self, app: web.Application) -> None:
        self._slots = asyncio.Semaphore(self.max_running)
        # http_server.py: /health and /health_generate share a handler, as do the deprecated
        # /get_* info routes and their successors; /tokenize is an alias of /v1/tokenize
        for path in ("/health", "/health_generate"):
            app.router.add_get(path, self._get(self._health))
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self._get(self._model_info))
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self._get(self._server_info))
        app.router.add_get("/v1/models", self._get(self._models))
        for path in ("/tokenize", "/v1/tokenize"):
            app.router.add_post(path, self._post(self._tokenize))
        app.router.add_post("/generate", self._post(self._generate))
        app.router.add_post("/v1/chat/completions", self._post(self._chat))

    # ---- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Like SGLang's API-key middleware: everything under /health stays open.
        if (
            self.api_key is not None
            and not request.path.startswith("/health")
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def _take_fault(self, path: str, *, post: bool = True) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if (fault.path is None and post) or fault.path == path:
                    del self._faults[index]
                    return fault
        return None

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        assert self._slots is not None
        async with self._slots:
            with self._lock:
                self._busy += 1
                self.max_busy_slots = max(self.max_busy_slots, self._busy)
            try:
                if self.service_time > 0:
                    await asyncio.sleep(self.service_time)
                yield
            finally:
                with self._lock:
                    self._busy -= 1

    def _get(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A GET route, counted, that a fault injected for its path can fail."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            with self._lock:
                self.gets[request.path] += 1
            fault = self._take_fault(request.path, post=False)
            if fault is not None:
                if fault.kind == "slow":
                    await asyncio.sleep(fault.delay)
                else:
                    response = await self._apply_fault(request, fault)
                    if response is None:
                        raise asyncio.CancelledError
                    return response
            return await handler(request)

        return wrapped

    def _post(self, handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await self._handle_post(request, handler)

        return wrapped

    async def _handle_post(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        parsed = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = False
        record = Received(
            request.path, body if isinstance(body, dict | list) else None, dict(request.headers)
        )
        task = asyncio.current_task()
        with self._lock:
            self.received.append(record)
            self.counts[request.path] += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if task is not None:
            self._tasks.add(task)
        try:
            fault = self._take_fault(request.path)
            response: web.StreamResponse | None = None
            if fault is not None:
                record.fault = fault.kind
            if fault is not None and fault.kind == "slow":
                await asyncio.sleep(fault.delay)
            elif fault is not None:
                response = await self._apply_fault(request, fault)
                if response is None:
                    # "timeout"/"drop": the connection is gone; make aiohttp write nothing.
                    raise asyncio.CancelledError
            if response is None:
                content_type = request.headers.get("Content-Type", "application/json")
                if not content_type.lower().startswith("application/json"):
                    response = _error_for(
                        request.path,
                        400,
                        f"Content-Type must be application/json, got {content_type!r}",
                    )
                elif not parsed:
                    response = _error_for(request.path, 400, "the request body is not valid JSON")
                else:
                    response = await handler(body)
            assert response is not None
            record.status = response.status
            return response
        finally:
            with self._lock:
                self._in_flight -= 1
            if task is not None:
                self._tasks.discard(task)

    async def _apply_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        path = request.path
        if fault.kind in ("500", "503"):
            return _error_for(path, int(fault.kind), f"injected fault: HTTP {fault.kind}")
        if fault.kind == "429":
            response = _error_for(path, 429, "injected fault: too many requests")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = _retry_after_value(fault.retry_after)
            return response
        if fault.kind == "malformed":
            return web.Response(
                status=200, body=b'{"text": "trunc', content_type="application/json"
            )
        if fault.kind == "shape":
            return web.json_response({"unexpected": True})
        if fault.kind == "timeout":
            await asyncio.sleep(fault.delay or DEFAULT_TIMEOUT_HANG)
        # "drop" (and the end of "timeout"): close the TCP connection without any reply.
        if request.transport is not None:
            request.transport.close()
        return None

    # ---- GET endpoints ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _model_info(self, request: web.Request) -> web.Response:
        # http_server.model_info, the fields a client reads
        return web.json_response(
            {
                "model_path": self.model_path,
                "served_model_name": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
                "has_image_understanding": True,
                "model_type": "llava",
            }
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        # http_server.server_info: the server arguments (a few), the version and the frontend
        return web.json_response(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "served_model_name": self.model_path,
                "chat_template": self.chat_template,
                "host": HOST,
                "port": int(self.url.rsplit(":", 1)[1]) if self.url else self.port,
                "tp_size": 1,
                "dp_size": 1,
                "context_length": MAX_MODEL_LEN,
                "max_running_requests": self.max_running,
                "version": VERSION,
                "frontend": "python",
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_path,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "sglang",
                        "root": self.model_path,
                        "max_model_len": MAX_MODEL_LEN,
                    }
                ],
            }
        )

    # ---- POST endpoints ---------------------------------------------------------------------

    async def _tokenize(self, body: Any) -> web.Response:
        # protocol.TokenizeRequest: unknown keys allowed
        try:
            if not isinstance(body, dict):
                raise Invalid("the request body must be a JSON object")
            prompt = body.get("prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise Invalid("add_special_tokens must be a boolean")
            if isinstance(prompt, str):
                tokens: Any = toy_ids(prompt, add_special_tokens=special)
                count: Any = len(tokens)
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                tokens = [toy_ids(p, add_special_tokens=special) for p in prompt]
                count = [len(t) for t in tokens]
            else:
                raise Invalid("prompt must be a string or a non-empty list of strings")
        except Invalid as exc:
            return _openai_error(400, str(exc))
        return web.json_response({"tokens": tokens, "count": count, "max_model_len": MAX_MODEL_LEN})

    def _answer(
        self, prompt: str, image: bytes, schema: dict[str, Any] | None, budget: int
    ) -> Completion:
        """What the toy model writes after `prompt`: a schema instance when constrained, the rest
        of a verdict at the rating position, sentences anywhere else."""
        rng = rng_for(self.seed, "content", prompt, image)
        verdict = None
        if schema is not None:
            try:
                instance = instance_for(schema, rng)
            except ValueError as exc:
                raise Invalid(f"cannot build a grammar for this json_schema: {exc}") from exc
            full = json.dumps(instance, indent=4)
            validator(schema).validate(json.loads(full))  # internal assertion
        elif prompt.endswith(VERDICT_TAIL):
            rating, p_safe, p_unsafe = verdict_for(self.seed, prompt, image)
            verdict = (p_safe, p_unsafe)
            full = verdict_continuation(rating, rng)
        else:
            full = plain_reply(rng)
        return complete(full, budget, verdict)

    async def _generate(self, body: Any) -> web.Response:
        started = time.perf_counter()
        try:
            request = parse_generate(body, self.image_token)
            items = [
                self._native_item(item, request.return_logprob, request.return_text)
                for item in request.items
            ]
        except Invalid as exc:
            return _native_error(400, str(exc))
        async with self._slot():
            pass
        latency = time.perf_counter() - started
        for item in items:
            item["meta_info"]["e2e_latency"] = latency
        return web.json_response(items if request.batch else items[0])

    def _native_item(self, item: Any, return_logprob: bool, return_text: bool) -> dict[str, Any]:
        image = item.image or b""
        completion = self._answer(item.text, image, item.schema, item.budget)
        finish: dict[str, Any] = (
            {"type": "length", "length": item.budget}
            if completion.truncated
            else {"type": "stop", "matched": EOS_ID}
        )
        prompt_tokens = 1 + len(toy_ids(item.text))
        if item.image is not None:
            prompt_tokens += IMAGE_PROMPT_TOKENS - 1
        meta: dict[str, Any] = {
            "id": item.rid or uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(completion.ids),
            "cached_tokens": 0,
            "e2e_latency": 0.0,
        }
        if return_logprob:
            # tokenizer_manager.add_logprob_to_meta_info: [logprob, token_id, text or None]
            # per output position; top logprobs only when top_logprobs_num > 0
            requested = item.token_ids or []
            probs_at = positions(
                self.seed, (item.text, image), completion, item.top_logprobs_num, requested
            )
            names = dict(zip(completion.ids, completion.pieces, strict=True))

            def entry(token_id: int, logprob: float) -> list[Any]:
                return [logprob, token_id, name_of(token_id, names) if return_text else None]

            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [
                entry(token_id, math.log(probs[token_id]))
                for token_id, probs in zip(completion.ids, probs_at, strict=True)
            ]
            meta["output_token_logprobs_length"] = len(completion.ids)
            if item.top_logprobs_num > 0:
                meta["input_top_logprobs"] = []
                meta["output_top_logprobs"] = [
                    [entry(t, lp) for t, lp in top_logprobs(probs, item.top_logprobs_num)]
                    for probs in probs_at
                ]
            if item.token_ids is not None:
                meta["input_token_ids_logprobs"] = []
                meta["output_token_ids_logprobs"] = [
                    [entry(t, math.log(probs[t])) for t in item.token_ids] for probs in probs_at
                ]
        return {"text": completion.text, "output_ids": completion.ids, "meta_info": meta}

    async def _chat(self, body: Any) -> web.Response:
        try:
            request = parse_chat(body)
            prompt, images = render_chat(
                self.chat_template, request.messages, request.continue_final
            )
            if prompt.count(self.image_token) != len(images):
                raise Invalid("the rendered prompt's image tokens do not match the images")
            image = b"".join(images)
            completion = self._answer(prompt, image, request.schema, request.budget)
        except Invalid as exc:
            return _openai_error(400, str(exc))
        with self._lock:
            self.prompts.append(prompt)
        async with self._slot():
            pass
        logprobs: dict[str, Any] | None = None
        if request.logprobs:
            probs_at = positions(self.seed, (prompt, image), completion, request.top_logprobs, [])
            names = dict(zip(completion.ids, completion.pieces, strict=True))

            def described(
                token_id: int, logprob: float, piece: str | None = None
            ) -> dict[str, Any]:
                token = piece if piece is not None else name_of(token_id, names)
                return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

            logprobs = {
                "content": [
                    {
                        **described(token_id, math.log(probs[token_id]), piece),
                        "top_logprobs": [
                            described(t, lp) for t, lp in top_logprobs(probs, request.top_logprobs)
                        ],
                    }
                    for piece, token_id, probs in zip(
                        completion.pieces, completion.ids, probs_at, strict=True
                    )
                ]
            }
        prompt_tokens = 1 + len(toy_ids(prompt)) + IMAGE_PROMPT_TOKENS * len(images)
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": logprobs,
                        "finish_reason": "length" if completion.truncated else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(completion.ids),
                    "total_tokens": prompt_tokens + len(completion.ids),
                },
            }
        )


@contextlib.contextmanager
def serve(**kwargs: Any) -> Iterator[FakeSGLang]:
    """`with serve(api_key="k") as fake: ...`: a started FakeSGLang, stopped on exit."""
    fake = FakeSGLang(**kwargs)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake SGLang server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--service-time", type=float, default=0.0)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model-path", default="AIML-TUDA/LlavaGuard-v1.2-0.5B-OV")
    parser.add_argument("--chat-template", default=None, choices=sorted(CONVERSATIONS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fake = FakeSGLang(
        model_path=args.model_path,
        chat_template=args.chat_template,
        api_key=args.api_key,
        service_time=args.service_time,
        max_running=args.max_running,
        seed=args.seed,
        port=args.port,
    )
    asyncio.run(fake.serve_until_signal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
