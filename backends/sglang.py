"""The `sglang` backend: SGLang servers (and any OpenAI-compatible server) over HTTP.

    policy-engine assess photo.jpg -b sglang --url http://gpu-1:30000
    policy-engine assess *.jpg -b sglang --url http://gpu-1:30000 --url http://gpu-2:30000 \\
        --transport native --mode score

Two transports, both constrained to the compiled policy's JSON Schema:

- `openai` (default): `POST /v1/chat/completions`, the image as a base64 `image_url` part before
  the policy text, `response_format` in the nested `json_schema` form (llama.cpp decodes
  unconstrained when the schema is sent flat), explicit `max_tokens` and `temperature`. The
  server applies its chat template. Serves SGLang, vLLM and other OpenAI-compatible servers.
  Score mode prefills the answer prefix as an assistant message with `continue_final_message`
  and reads P(Unsafe) from the first token's `top_logprobs`.
- `native`: SGLang's `POST /generate`: `text` rendered here with the model's chat template
  (`chat_template`), `image_data`, `sampling_params` with `json_schema` (a JSON string) and an
  explicit `max_new_tokens` (SGLang's default of 128 truncates rationales); `list_batch` items
  per call. Score mode is one decode step at temperature 1 after the forced answer prefix, with
  `token_ids_logprob` for the first tokens of "Safe" and "Unsafe" (looked up once via
  `/tokenize`): SGLang computes returned logprobs after temperature and the grammar mask, so no
  grammar, top-p or top-k is sent there.

All HTTP runs on one event loop in a background thread owned by the backend
(`http_client.HttpClient`), so the sync and the async engine APIs share one connection pool and
one bound on requests in flight (`concurrency`, default 64). Every request retries connect
errors, timeouts, 429 (honouring Retry-After), 5xx and malformed replies with exponential backoff
and jitter, within a per-request `deadline`; one that finally fails becomes an error verdict for
its item only.
Several `url`s are balanced by least-in-flight (or round-robin); an endpoint that refuses
connections is rested for a while. `load()` checks every endpoint's `/health`.

The API key is read from the environment variable named by `api_key_env`
(`POLICY_ENGINE_SGLANG_API_KEY`), never from options, and never appears in messages.

This module never imports the `sglang` package; `launch` starts `python -m sglang.launch_server`
as a subprocess on a machine where it is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    CliFlag,
    Generation,
    Mode,
    Register,
    hookimpl,
)
from policy_engine.compiler import CompiledPolicy
from policy_engine.errors import (
    BackendError,
    BackendUnavailableError,
    ImageError,
    PolicyEngineError,
)
from policy_engine.images import LoadedImage

from .chat_templates import TEMPLATES, ChatTemplate, JinjaTemplate, guess_template, template_for
from .http_client import BadReply, Failed, HttpClient, Settings, normalize_url

INSTALL_HINT = "pip install 'policy-engine[sglang]'"
DEFAULT_LAUNCH_MODEL = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV"
T = TypeVar("T")


# -- options ---------------------------------------------------------------------------------
class SGLangOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: list[str] = Field(
        default_factory=list,
        description="Server URL(s): several are balanced; a router URL is one. "
        "Comma-separated or a list.",
    )
    transport: Literal["openai", "native"] = Field(
        default="openai",
        description="openai: /v1/chat/completions (SGLang, vLLM, ...); native: SGLang /generate.",
    )
    model: str | None = Field(
        default=None,
        description="Served model name (default: asked from the server); with launch, the "
        "checkpoint to serve.",
    )
    chat_template: str = Field(
        default="auto",
        description="native only: chatml-llava, vicuna_v1.1, qwen2-vl, a Jinja file or a "
        "checkpoint directory; auto: from the served model's path.",
    )
    api_key_env: str = Field(
        default="POLICY_ENGINE_SGLANG_API_KEY",
        description="Environment variable that holds the API key (sent as a Bearer token).",
    )
    concurrency: int = Field(default=64, ge=1, le=4096, description="Requests in flight.")
    list_batch: int = Field(
        default=1, ge=1, le=256, description="native only: images per /generate call."
    )
    balance: Literal["least-in-flight", "round-robin"] = "least-in-flight"
    timeout: float = Field(default=120.0, gt=0, description="Seconds per attempt.")
    connect_timeout: float = Field(default=10.0, gt=0)
    deadline: float = Field(
        default=600.0, gt=0, description="Seconds per request, all attempts included."
    )
    retries: int = Field(default=5, ge=0, description="Attempts after the first.")
    backoff: float = Field(default=0.5, ge=0, description="First retry delay (doubles).")
    backoff_max: float = Field(default=20.0, ge=0)
    greedy: bool = Field(default=False, description="temperature 0: reproducible audits.")
    temperature: float = Field(default=0.2, gt=0.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=50, ge=0, description="0: off.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Token budget; default: the policy's (500)."
    )
    image_format: Literal["PNG", "JPEG", "WEBP"] = Field(
        default="PNG", description="How images travel (PNG: lossless)."
    )
    max_side: int | None = Field(
        default=None,
        ge=16,
        description="Shrink images whose longer side exceeds this before sending (aspect kept): "
        "less bandwidth for photos the server's processor would shrink anyway.",
    )
    top_logprobs: int = Field(
        default=20, ge=2, le=20, description="openai score mode: top logprobs to read."
    )
    score_answers: bool = Field(
        default=False,
        description="full/verdict: also ask P(Unsafe) (one 1-token request per image, sent "
        "alongside; SGLang reuses the cached prompt) for rules and thresholds that use it.",
    )
    launch: bool = Field(
        default=False, description="Start `python -m sglang.launch_server` (needs sglang, a GPU)."
    )
    launch_port: int = Field(default=30000, ge=1, le=65535)
    launch_command: str | None = Field(
        default=None,
        description="Replaces the launch command; {python}, {model}, {port} are filled in.",
    )
    launch_timeout: float = Field(default=900.0, gt=0)

    @field_validator("url", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("url")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return [normalize_url(url) for url in value]


@dataclass(frozen=True)
class Request:
    """One image of a batch, with the batch's policy, mode and budget."""

    image: LoadedImage
    compiled: CompiledPolicy
    mode: Mode
    max_new_tokens: int | None = None


def _requests(batch: Batch) -> list[Request]:
    return [Request(image, batch.compiled, batch.mode, batch.max_new_tokens) for image in batch]


@dataclass
class _Item:
    request: Request
    index: int
    image_url: str = ""
    result: Generation | None = None
    started: float = field(default_factory=time.perf_counter)


# -- the backend -----------------------------------------------------------------------------
class SGLangBackend(Backend):
    name = "sglang"
    description = "SGLang / OpenAI-compatible servers over HTTP, schema-constrained, concurrent"
    Options = SGLangOptions
    capabilities = Capabilities(
        images=True,
        json_schema=True,
        scores=True,
        batching=True,
        max_batch_size=64,
        concurrent=True,
    )
    install_hint = INSTALL_HINT
    cli_flags = (
        CliFlag(
            "--model",
            "model",
            short="-m",
            help="Served model name; with --launch, the checkpoint to serve.",
        ),
        CliFlag(
            "--url",
            "url",
            multiple=True,
            metavar="URL",
            help="Server URL (repeatable: several servers are balanced).",
        ),
        CliFlag(
            "--transport",
            "transport",
            choices=("openai", "native"),
            help="openai (/v1/chat/completions) or native (SGLang /generate).",
        ),
        CliFlag(
            "--launch",
            "launch",
            is_flag=True,
            help="Start an SGLang server for --model first (needs sglang and a GPU).",
        ),
    )
    options: SGLangOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not self.options.url and not self.options.launch:
            raise PolicyEngineError(
                "backend 'sglang': no server URL; pass --url URL (or -o url=URL), or --launch"
            )
        # an engine batch is one wave of `concurrency` requests; the engine keeps the next wave
        # queued behind it, so at most about three waves of decoded images are in memory
        self.capabilities = replace(self.capabilities, max_batch_size=self.options.concurrency)
        self.urls = self.options.url or [f"http://127.0.0.1:{self.options.launch_port}"]
        self.model_name = self.options.model or ""
        self.template: ChatTemplate | JinjaTemplate | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.http: HttpClient | None = None
        self._tokenize_lock: asyncio.Lock | None = None
        self._rating_ids: dict[str, tuple[int, int]] = {}
        self._texts: dict[tuple[str, str], str] = {}
        self._log_path: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise BackendUnavailableError(
                f"the sglang backend needs aiohttp: {INSTALL_HINT}"
            ) from None
        opts = self.options
        settings = Settings(
            concurrency=opts.concurrency,
            timeout=opts.timeout,
            connect_timeout=opts.connect_timeout,
            deadline=opts.deadline,
            retries=opts.retries,
            backoff=opts.backoff,
            backoff_max=opts.backoff_max,
            balance=opts.balance,
            api_key_env=opts.api_key_env,
            server="SGLang server",
        )
        self.http = HttpClient(self.urls, settings)
        try:
            self.http.open()
            self._tokenize_lock = self.http.run(_new_lock())
            if opts.launch:
                self._launch(self.http)
            self.http.run(self.http.check_health())
            self.http.run(self._discover(self.http))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.process is not None:
            _terminate(self.process)
            self.process = None

    async def _discover(self, http: HttpClient) -> None:
        """The served model's name (openai) and chat template (native)."""
        opts = self.options
        if opts.transport == "openai":
            if not self.model_name:
                info = await http.get_json(
                    "/v1/models",
                    "is it an OpenAI-compatible server? Or pass the model name: -o model=NAME",
                )
                try:
                    self.model_name = str(info["data"][0]["id"])
                except (KeyError, IndexError, TypeError):
                    raise BackendUnavailableError(
                        "the server lists no model at /v1/models; pass -o model=NAME"
                    ) from None
            return
        model_path = self.model_name
        if not model_path:
            info = await http.get_json(
                "/get_model_info",
                "the native transport needs an SGLang server; for others use --transport "
                "openai (or pass the model path: -o model=PATH)",
            )
            model_path = str(info.get("model_path") or "") if isinstance(info, dict) else ""
            self.model_name = model_path or "sglang"
        self.template = template_for(opts.chat_template, model_path)

    # -- launch ----------------------------------------------------------------------------
    def launch_command(self) -> list[str]:
        """The command `launch` runs (SGLang's server, or `launch_command`)."""
        opts = self.options
        model = opts.model or DEFAULT_LAUNCH_MODEL
        port = urllib.parse.urlsplit(self.urls[0]).port or opts.launch_port
        if opts.launch_command:
            text = opts.launch_command.format(python=sys.executable, model=model, port=port)
            return shlex.split(text)
        if importlib.util.find_spec("sglang") is None:
            raise BackendUnavailableError(
                "--launch needs the sglang package, which runs on a GPU machine: "
                "pip install 'sglang[all]' there, or start a server yourself and pass --url"
            )
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        template = opts.chat_template if opts.chat_template in TEMPLATES else guess_template(model)
        if template:
            command += ["--chat-template", template]
        return command

    def _launch(self, http: HttpClient) -> None:
        command = self.launch_command()
        handle, name = tempfile.mkstemp(prefix="policy-engine-sglang-", suffix=".log")
        self._log_path = Path(name)
        print(
            f"policy-engine: starting {shlex.join(command)} (log: {name})",
            file=sys.stderr,
        )
        try:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as err:
            raise BackendUnavailableError(f"cannot start {command[0]}: {err.strerror}") from None
        finally:
            os.close(handle)
        http.run(self._await_launch(http))

    async def _await_launch(self, http: HttpClient) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.options.launch_timeout
        url = self.urls[0] + "/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendUnavailableError(
                    f"the launched server exited with status {self.process.returncode}: "
                    f"{_tail(self._log_path)}"
                )
            if await http.healthy(http.pool.endpoints[0]) is None:
                return
            await asyncio.sleep(0.5)
        raise BackendUnavailableError(
            f"the launched server did not answer {url} within {self.options.launch_timeout:g}s"
        )

    # -- generation ------------------------------------------------------------------------
    def generate(self, batch: Batch) -> list[Generation]:
        requests = _requests(batch)
        if not requests:
            return []
        http = self._require_http()
        items = [_Item(r, i) for i, r in enumerate(requests)]
        for future in self._submit_groups(http, items):
            future.result()
        return [item.result or Generation(error="no answer") for item in items]

    async def agenerate(self, batch: Batch) -> list[Generation]:
        requests = _requests(batch)
        if not requests:
            return []
        http = self._require_http()
        items = [_Item(r, i) for i, r in enumerate(requests)]
        futures = await asyncio.to_thread(self._submit_groups, http, items)
        await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
        return [item.result or Generation(error="no answer") for item in items]

    def _require_http(self) -> HttpClient:
        if self.http is None:
            raise BackendError("the sglang backend was used before load()")
        return self.http

    def _submit_groups(self, http: HttpClient, items: list[_Item]) -> list[Future[None]]:
        """Encode the images here and start each group's request as soon as it is ready."""
        return [http.submit(self._run_group(group)) for group in self._encoded_groups(items)]

    def _encoded_groups(self, items: list[_Item]) -> Iterator[list[_Item]]:
        """Encode images one by one and yield the groups that travel together (one item, or a
        native list batch of the same policy and mode), so early groups start while later
        images are still being encoded."""
        size = self.options.list_batch if self.options.transport == "native" else 1
        open_groups: dict[tuple[str, str], list[_Item]] = {}
        for item in items:
            try:
                item.image_url = self._image_url(item.request.image)
            except (ImageError, ValueError) as err:
                item.result = Generation(error=str(err), model=self.model_name)
                continue
            key = (item.request.compiled.hash, item.request.mode)
            group = open_groups.setdefault(key, [])
            group.append(item)
            if len(group) >= size:
                yield open_groups.pop(key)
        yield from open_groups.values()

    def _image_url(self, image: LoadedImage) -> str:
        """The image as it travels: shrunk to `max_side` when larger, as a data URL."""
        limit = self.options.max_side
        if limit is not None and max(image.image.size) > limit:
            from PIL import Image

            smaller = image.image.copy()
            smaller.thumbnail((limit, limit), Image.Resampling.LANCZOS)
            image = replace(image, image=smaller)
        return image.to_data_url(self.options.image_format)

    async def _run_group(self, group: list[_Item]) -> None:
        started = time.perf_counter()
        scoring = self.options.score_answers and group[0].request.mode != "score"
        score_group = [_Item(replace(i.request, mode="score"), i.index, i.image_url) for i in group]
        answers, scores = await asyncio.gather(
            self._answers(group),
            self._answers(score_group) if scoring else asyncio.sleep(0, result=None),
        )
        seconds = time.perf_counter() - started
        for at, (item, result) in enumerate(zip(group, answers, strict=True)):
            result.timings.setdefault("http", seconds)
            if scores is not None and result.error is None and scores[at].error is None:
                result.p_unsafe = scores[at].p_unsafe  # a failed score leaves the answer as it is
            item.result = result

    async def _answers(self, group: list[_Item]) -> list[Generation]:
        """The group's answers (one per item); a request that finally failed is each item's
        error."""
        try:
            if self.options.transport == "openai":
                return [await self._openai(group[0])]
            return await self._native(group)
        except Failed as err:
            return [
                Generation(error=err.message, retryable=err.retryable, model=self.model_name)
                for _ in group
            ]

    def budget(self, request: Request) -> int:
        return (
            self.options.max_new_tokens or request.max_new_tokens or request.compiled.max_new_tokens
        )

    def sampling(self) -> dict[str, Any]:
        """Temperature, top-p and top-k as LlavaGuard's README sets them (or greedy)."""
        opts = self.options
        if opts.greedy:
            return {"temperature": 0.0}
        params: dict[str, Any] = {"temperature": opts.temperature, "top_p": opts.top_p}
        if opts.top_k:
            params["top_k"] = opts.top_k
        return params

    # -- openai transport ------------------------------------------------------------------
    def openai_body(self, request: Request, image_url: str) -> dict[str, Any]:
        """The /v1/chat/completions body for one request."""
        compiled, mode = request.compiled, request.mode
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": compiled.prompt},
        ]
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": content}],
        }
        if mode == "score":
            prefix = compiled.layout_for(mode).prefix()
            body["messages"].append({"role": "assistant", "content": prefix})
            body |= {
                "continue_final_message": True,
                "add_generation_prompt": False,
                "max_tokens": 1,
                "temperature": 1.0,
                "top_p": 1.0,
                "logprobs": True,
                "top_logprobs": self.options.top_logprobs,
            }
            return body
        body["max_tokens"] = self.budget(request)
        body |= self.sampling()
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": "verdict",
                "schema": compiled.schema_for(mode),
                "strict": True,
            },
        }
        return body

    async def _openai(self, item: _Item) -> Generation:
        request = item.request
        body = self.openai_body(request, item.image_url)

        def parse(payload: Any) -> Generation:
            try:
                choice = payload["choices"][0]
                text = choice["message"]["content"] or ""
                finish = choice.get("finish_reason")
                logprobs = choice.get("logprobs")
            except (KeyError, IndexError, TypeError) as err:
                raise BadReply(f"reply without choices[0].message.content ({err})") from None
            if request.mode == "score":
                try:
                    top = logprobs["content"][0]["top_logprobs"]
                    pairs = [(str(t["token"]), float(t["logprob"])) for t in top]
                except (KeyError, IndexError, TypeError, ValueError):
                    raise BadReply("score reply without logprobs.content[0].top_logprobs") from None
                return self._openai_score(request.compiled, pairs)
            if finish == "length":
                return self._truncated(text, body["max_tokens"])
            return Generation(text=str(text), model=self.model_name)

        return await self._post("/v1/chat/completions", body, parse)

    def _openai_score(self, compiled: CompiledPolicy, pairs: list[tuple[str, float]]) -> Generation:
        """P(Unsafe) from the first answer token's top logprobs: the mass of tokens that start
        each rating's continuation, renormalised over the two."""
        mass = []
        for rating in ("Safe", "Unsafe"):
            continuation = compiled.continuation(rating)
            mass.append(
                sum(math.exp(lp) for tok, lp in pairs if tok and continuation.startswith(tok))
            )
        total = mass[0] + mass[1]
        if total <= 0.0:
            seen = ", ".join(repr(t) for t, _ in pairs[:5])
            return Generation(
                error="neither rating is among the first token's top logprobs "
                f"({seen}); does the server continue a prefilled assistant message "
                "(continue_final_message)?",
                model=self.model_name,
            )
        return Generation(p_unsafe=mass[1] / total, model=self.model_name)

    # -- native transport ------------------------------------------------------------------
    def native_text(self, compiled: CompiledPolicy, mode: str) -> str:
        """The prompt text for /generate: the chat template around image token and policy;
        in score mode the answer prefix follows."""
        key = (compiled.hash, mode)
        if key not in self._texts:
            assert self.template is not None
            text = self.template.render(compiled.prompt)
            if mode == "score":
                text += compiled.layout_for("score").prefix()
            self._texts[key] = text
        return self._texts[key]

    def native_body(self, items: Sequence[_Item], rating_ids: tuple[int, int] | None) -> Any:
        """The /generate body for a group (one item: plain values; several: lists)."""
        request = items[0].request
        compiled, mode = request.compiled, request.mode
        text = self.native_text(compiled, mode)
        body: dict[str, Any] = {}
        if mode == "score":
            assert rating_ids is not None
            body["sampling_params"] = {"max_new_tokens": 1, "temperature": 1.0}
            body["return_logprob"] = True
            body["token_ids_logprob"] = list(rating_ids)
        else:
            params = {"max_new_tokens": self.budget(request), **self.sampling()}
            params["json_schema"] = json.dumps(compiled.schema_for(mode))
            body["sampling_params"] = params
        if len(items) == 1:
            body["text"] = text
            body["image_data"] = items[0].image_url
        else:
            body["text"] = [text] * len(items)
            body["image_data"] = [item.image_url for item in items]
            if mode == "score":
                body["token_ids_logprob"] = [list(rating_ids or ())] * len(items)
        return body

    async def _native(self, items: list[_Item]) -> list[Generation]:
        request = items[0].request
        rating_ids = None
        if request.mode == "score":
            rating_ids = await self.rating_ids(request.compiled)
        body = self.native_body(items, rating_ids)

        def parse(payload: Any) -> list[Generation]:
            answers = payload if len(items) > 1 else [payload]
            if not isinstance(answers, list) or len(answers) != len(items):
                raise BadReply(f"expected {len(items)} answers")
            return [self._native_answer(request, body, a, rating_ids) for a in answers]

        return await self._post("/generate", body, parse)

    def _native_answer(
        self, request: Request, body: dict[str, Any], answer: Any, rating_ids: Any
    ) -> Generation:
        try:
            text = str(answer["text"])
            meta = answer["meta_info"]
            finish = (meta.get("finish_reason") or {}).get("type")
        except (KeyError, TypeError, AttributeError) as err:
            raise BadReply(f"answer without text or meta_info ({err})") from None
        if request.mode == "score":
            try:
                step = meta["output_token_ids_logprobs"][0]
                found = {int(entry[1]): entry[0] for entry in step}
                safe, unsafe = (found[rating_ids[0]], found[rating_ids[1]])
            except (KeyError, IndexError, TypeError, ValueError):
                raise BadReply("score answer without output_token_ids_logprobs") from None
            return _two_way(safe, unsafe, self.model_name)
        if finish == "length":
            return self._truncated(text, body["sampling_params"]["max_new_tokens"])
        return Generation(text=text, model=self.model_name)

    async def rating_ids(self, compiled: CompiledPolicy) -> tuple[int, int]:
        """The first token ids of "Safe" and "Unsafe" where the model writes the rating,
        from the server's tokenizer (`/tokenize`), once per policy."""
        assert self._tokenize_lock is not None
        async with self._tokenize_lock:  # one lookup, however many requests wait for it
            if compiled.hash not in self._rating_ids:
                self._rating_ids[compiled.hash] = await self._lookup_rating_ids(compiled)
        return self._rating_ids[compiled.hash]

    async def _lookup_rating_ids(self, compiled: CompiledPolicy) -> tuple[int, int]:
        firsts = []
        for rating in ("Safe", "Unsafe"):
            body = {"prompt": compiled.continuation(rating), "add_special_tokens": False}

            def parse(payload: Any) -> int:
                try:
                    return int(payload["tokens"][0])
                except (KeyError, IndexError, TypeError, ValueError):
                    raise BadReply("/tokenize reply without tokens") from None

            firsts.append(await self._post("/tokenize", body, parse))
        if firsts[0] == firsts[1]:
            raise Failed(
                "the server's tokenizer starts 'Safe' and 'Unsafe' with the same token; "
                "score mode cannot tell them apart",
                retryable=False,
            )
        return (firsts[0], firsts[1])

    def _truncated(self, text: str, budget: int) -> Generation:
        return Generation(
            text=text,
            error=f"the answer was cut at the token budget ({budget} tokens); raise max_new_tokens",
            model=self.model_name,
        )

    # -- HTTP with retries -----------------------------------------------------------------
    async def _post(self, path: str, body: Any, parse: Callable[[Any], T]) -> T:
        return await self._require_http().post(path, body, parse)


# -- helpers ---------------------------------------------------------------------------------
def _two_way(safe: Any, unsafe: Any, model: str) -> Generation:
    """P(Unsafe) from the two ratings' logprobs, renormalised over the two."""
    try:
        ls, lu = float(safe), float(unsafe)
    except (TypeError, ValueError):
        return Generation(error="the server gave no logprob for a rating token", model=model)
    top = max(ls, lu)
    if top == -math.inf or math.isnan(top):
        return Generation(error="both ratings have probability 0 at the rating step", model=model)
    es, eu = math.exp(ls - top), math.exp(lu - top)
    return Generation(p_unsafe=eu / (es + eu), model=model)


def _tail(path: Path | None, lines: int = 5) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(empty log)"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _new_lock() -> asyncio.Lock:
    """A lock made on the loop that will use it."""
    return asyncio.Lock()


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(SGLangBackend)
