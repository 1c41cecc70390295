"""The `sglang` backend: SGLang servers (and any OpenAI-compatible server) over HTTP.

    policy-engine assess photo.jpg -b sglang --url http://gpu-1:30000
    policy-engine assess *.jpg -b sglang --url http://gpu-1:30000 --url http://gpu-2:30000 \\
        --transport native --mode score

Two transports, both constrained to the compiled policy's JSON Schema:

- `openai` (default): `POST /v1/chat/completions`, the image as a base64 `image_url` part before
  the policy text, `response_format` in the nested `json_schema` form (llama.cpp decodes
  unconstrained when the schema is sent flat), an explicit token budget and `temperature`. The
  server applies its chat template. Serves SGLang, vLLM and other OpenAI-compatible servers;
  what else it sends depends on which one answers (`servers.identify`): `top_k` and
  `continue_final_message` only to SGLang and vLLM, never to a strict server that rejects
  unknown fields. Score mode prefills the answer prefix as an assistant message with
  `continue_final_message` and reads P(Unsafe) from the first token's `top_logprobs`.
- `native`: SGLang's `POST /generate`: `text` rendered here with SGLang's chat template
  (`chat_template`), `image_data`, `sampling_params` with `json_schema` (a JSON string) and an
  explicit `max_new_tokens` (SGLang's default of 128 truncates rationales); `list_batch` items
  per call where the endpoint takes lists (SGLang does, its router does not). Score mode sends
  the conversation with the answer prefix as the open assistant message and asks one token at
  temperature 1 with its top logprobs as text (`top_logprobs_num`, `return_text_in_logprobs`):
  no `/tokenize`, which SGLang's router lacks. SGLang computes returned logprobs after
  temperature and the grammar mask, so no grammar, top-p or top-k is sent there.

In both, the two ratings must hold at least `min_rating_mass` of the first token's probability,
or the item is an error (`scores.score`): a closed assistant turn or a wrong template would
otherwise give a confident P(Unsafe) from no evidence. A reply outside the schema is an error
that says the server seems to ignore the schema.

All HTTP runs on one event loop in a background thread owned by the backend
(`http_client.HttpClient`), so the sync and the async engine APIs share one connection pool and
one bound on requests in flight (`concurrency`, default 64). Every request retries connect
errors, timeouts, 429 (honouring Retry-After), 5xx and malformed replies with exponential backoff
and jitter, within a per-request `deadline`; one that finally fails becomes an error verdict for
its item only. The GETs at start are retried alike; a server that stays unreachable or answers
5xx is a `BackendError` (a fault), never a user error.
Several `url`s are balanced by least-in-flight (or round-robin); an endpoint that refuses
connections is rested for a while. `load()` checks every endpoint's `/health`; `health()` probes
them again, cheaply, for a service's readiness.

The API key is read from the environment variable named by `api_key_env`
(`POLICY_ENGINE_SGLANG_API_KEY`), never from options, and never appears in messages.

This module never imports the `sglang` package; `launch` starts `python -m sglang.launch_server`
as a subprocess on a machine where it is installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from policy_engine import (
    Backend,
    BackendError,
    BackendUnavailableError,
    Batch,
    Capabilities,
    CliFlag,
    CompiledPolicy,
    Generation,
    ImageError,
    Mode,
    PolicyEngineError,
    Register,
    hookimpl,
    parse_verdict,
)

if TYPE_CHECKING:
    from policy_engine import LoadedImage

from . import scores, servers
from .chat_templates import (
    TEMPLATES,
    ChatTemplate,
    JinjaTemplate,
    template_for,
)
from .http_client import BadReply, Failed, HttpClient, Settings
from .servers import ServerInfo
from .sglang_launch import Launcher
from .sglang_options import SGLangOptions

INSTALL_HINT = "pip install 'policy-engine[sglang]'"
# SGLang conversation templates under which its OpenAI path closes a prefilled assistant turn
SGLANG_CLOSES = frozenset(
    {"chatml"} | {name for name, t in TEMPLATES.items() if not t.sglang_continues()}
)
SCHEMA_FIX = (
    "use a server that constrains decoding to a JSON Schema, such as SGLang or vLLM "
    "(transformers serve does not); see docs/sglang.md, 'Servers'"
)
T = TypeVar("T")
logger = logging.getLogger(__name__)


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
        self.server = ServerInfo("openai")
        self.launcher: Launcher | None = None
        self.http: HttpClient | None = None
        self._lists = True  # whether /generate takes a list of texts here
        self._texts: dict[tuple[str, str], str] = {}
        self._warned: set[str] = set()

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
            if opts.launch:
                self._launcher().start(self.http)
            self.http.run(self.http.check_health())
            self.http.run(self._discover(self.http))
        except BaseException:
            self.release()
            raise

    def health(self) -> str | None:
        """None while at least one endpoint answers /health (a short probe, nothing retried),
        else why not. Callable from any thread but the backend's own event loop."""
        http = self.http
        if http is None or http.io is None:
            return "the sglang backend is not loaded"
        if threading.current_thread() is http.io.thread:
            raise RuntimeError("health() would wait on its own event loop")
        seconds = min(5.0, self.options.connect_timeout)
        try:
            return http.submit(http.probe(seconds)).result(timeout=seconds + 5)
        except (RuntimeError, FutureTimeout) as err:  # closed while probing
            return f"the sglang backend's HTTP client stopped ({type(err).__name__})"

    def release(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.launcher is not None:
            self.launcher.stop()

    async def _discover(self, http: HttpClient) -> None:
        """What answers (`server`), the served model's name (openai) and the chat template
        (native)."""
        opts = self.options
        if opts.server == "auto":
            self.server = await servers.identify(http)
        else:
            self.server = ServerInfo(opts.server, told_by=f"-o server={opts.server}")
        if opts.transport == "openai":
            if not self.model_name:
                self.model_name = await self._served_model(http)
            return
        if self.server.kind != "sglang":
            raise BackendUnavailableError(
                f"the native transport needs an SGLang server, and {self.urls[0]} is "
                f"{self.server.describe()}; use --transport openai (or -o server=sglang if it "
                "is SGLang)"
            )
        self.template = await self._native_template(http)
        if self.server.router:
            self._lists = False
            if opts.list_batch > 1:
                self._warn_once(
                    "lists",
                    f"list_batch={opts.list_batch} is not used: SGLang's router "
                    "takes one text per /generate, so each image travels alone (the router "
                    "spreads them)",
                )

    async def _served_model(self, http: HttpClient) -> str:
        if self.server.models:
            return self.server.models[0]
        reply = await servers.get(http, "/v1/models")
        cards = servers.model_cards(reply)
        if reply.status != 200:
            raise BackendUnavailableError(
                f"{reply.url}: HTTP {reply.status}{reply.said()}; is it an OpenAI-compatible "
                "server? Or pass the model name: -o model=NAME"
            )
        if not cards or "id" not in cards[0]:
            raise BackendUnavailableError(
                f"the server lists no model at {reply.url}; pass -o model=NAME"
            )
        return str(cards[0]["id"])

    async def _native_template(self, http: HttpClient) -> ChatTemplate | JinjaTemplate:
        """The chat template to render: the option's, else the one SGLang says it uses, else
        guessed from the model path (the option's, else /get_model_info's)."""
        opts = self.options
        if opts.chat_template != "auto":
            return template_for(opts.chat_template, None)
        if self.server.chat_template in TEMPLATES:
            return TEMPLATES[self.server.chat_template]
        model_path = self.model_name
        if not model_path:
            skip = (
                f"pass the chat template (-o chat_template=NAME: {', '.join(TEMPLATES)}) or the "
                "model path (-o model=PATH) to skip this look-up"
            )
            reply = await servers.get(http, "/get_model_info", skip)
            if reply.status != 200 or not isinstance(reply.body, dict):
                raise BackendUnavailableError(
                    f"{reply.url}: HTTP {reply.status}{reply.said()}; the native transport needs "
                    "an SGLang server; for others use --transport openai (or pass the model "
                    "path: -o model=PATH)"
                )
            model_path = str(reply.body.get("model_path") or "")
            self.model_name = model_path or "sglang"
        return template_for("auto", model_path)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s", message)

    def _where(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else f"the servers ({', '.join(self.urls)})"

    # -- launch ----------------------------------------------------------------------------
    def launch_command(self) -> list[str]:
        """The command `launch` runs (see sglang_launch.Launcher.command)."""
        return self._launcher().command()

    def _launcher(self) -> Launcher:
        if self.launcher is None:
            self.launcher = Launcher(self.options, self.urls[0])
        return self.launcher

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The launched server's process, while it runs."""
        return self.launcher.process if self.launcher is not None else None

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
        native = self.options.transport == "native"
        size = self.options.list_batch if native and self._lists else 1
        group: list[_Item] = []  # a batch holds one policy and one mode: no regrouping
        for item in items:
            try:
                item.image_url = self._image_url(item.request.image)
            except (ImageError, ValueError) as err:
                item.result = Generation(error=str(err), model=self.model_name)
                continue
            group.append(item)
            if len(group) >= size:
                yield group
                group = []
        if group:
            yield group

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
        answers, scored = await asyncio.gather(
            self._answers(group),
            self._answers(score_group) if scoring else asyncio.sleep(0, result=None),
        )
        seconds = time.perf_counter() - started
        for at, (item, result) in enumerate(zip(group, answers, strict=True)):
            result.timings.setdefault("http", seconds)
            if scored is not None and result.error is None:
                result = _with_score(result, scored[at])
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

    def sampling(self, *, top_k: bool = True) -> dict[str, Any]:
        """Temperature, top-p and (where the server takes it) top-k as LlavaGuard's README sets
        them, or greedy."""
        opts = self.options
        if opts.greedy:
            return {"temperature": 0.0}
        params: dict[str, Any] = {"temperature": opts.temperature, "top_p": opts.top_p}
        if opts.top_k and top_k:
            params["top_k"] = opts.top_k
        return params

    def decoding(self) -> dict[str, Any]:
        """How answers are decoded, as verdicts record it."""
        opts = self.options
        if opts.greedy:
            return {"method": "greedy"}
        return {"method": "sampling", **self.sampling()}

    def _in_schema(self, request: Request, text: str, field: str) -> Generation:
        """The reply as it came when it is a verdict in the policy's schema; otherwise an error
        that says the server seems to ignore the schema (`field`), with the fix: a server that
        constrains decoding never answers outside it."""
        verdict = parse_verdict(text, request.compiled, mode=request.mode)
        if verdict.ok:
            return Generation(text=text, model=self.model_name, decoding=self.decoding())
        hint = (
            f"the reply is not in the policy's JSON Schema, so {self._where()} seems to ignore "
            f"{field}; {SCHEMA_FIX}"
        )
        self._warn_once("schema", hint)
        # the engine reads the text (leniently, if asked); when it cannot, the hint says why
        return Generation(text=text, hint=hint, model=self.model_name, decoding=self.decoding())

    def _truncated(self, text: str, budget: int) -> Generation:
        return Generation(
            text=text,
            error=f"the answer was cut at the token budget ({budget} tokens); raise max_new_tokens",
            model=self.model_name,
        )

    # -- openai transport ------------------------------------------------------------------
    def openai_body(self, request: Request, image_url: str) -> dict[str, Any]:
        """The /v1/chat/completions body for one request: OpenAI's fields, and SGLang's or
        vLLM's extras only where they answer."""
        compiled, mode = request.compiled, request.mode
        kind = self.server.kind
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": compiled.prompt},
        ]
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": content}],
        }
        # max_tokens is deprecated in favour of max_completion_tokens (SGLang, vLLM, OpenAI);
        # other servers may know only max_tokens
        budget_key = "max_tokens" if kind == "openai" else "max_completion_tokens"
        if mode == "score":
            prefix = compiled.layout_for(mode).prefix()
            body["messages"].append({"role": "assistant", "content": prefix})
            body |= {
                budget_key: 1,
                "temperature": 1.0,
                "top_p": 1.0,
                "logprobs": True,
                "top_logprobs": self.options.top_logprobs,
            }
            if kind in ("sglang", "vllm"):
                body["continue_final_message"] = True
            if kind == "vllm":  # vLLM refuses it beside continue_final_message unless false
                body["add_generation_prompt"] = False
            return body
        body[budget_key] = self.budget(request)
        body |= self.sampling(top_k=kind in ("sglang", "vllm"))
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": "verdict",
                "schema": compiled.schema_for(mode),
                "strict": True,
            },
        }
        return body

    def cannot_continue(self) -> str | None:
        """Why score mode cannot work over the openai transport here (None: it can): the server
        must continue a prefilled assistant message."""
        info = self.server
        if info.kind == "openai":
            return (
                f"score mode needs a server that continues a prefilled assistant message "
                f"(continue_final_message), and {self._where()} is {info.describe()}: OpenAI's "
                "API has no such field. Use SGLang or vLLM (-o server=sglang|vllm if it is "
                "one), or --mode full/verdict without score_answers"
            )
        template = info.chat_template
        if info.kind == "sglang" and template in SGLANG_CLOSES:
            return (
                f"{self._where()} runs SGLang with --chat-template {template}, which closes a "
                "prefilled assistant message instead of continuing it (a message ends with "
                "'<|im_end|>\\n', and SGLang strips only a trailing stop string), so the model "
                "would not write the rating. Use --transport native, or relaunch SGLang with "
                f"the template's Jinja twin: python -m policy_engine.backends.chat_templates "
                f"{template} > {template}.jinja, then --chat-template {template}.jinja "
                "(docs/sglang.md, 'Score mode')"
            )
        return None

    async def _openai(self, item: _Item) -> Generation:
        request = item.request
        if request.mode == "score":
            refusal = self.cannot_continue()
            if refusal is not None:
                self._warn_once("score", refusal)
                return Generation(error=refusal, model=self.model_name)
        body = self.openai_body(request, item.image_url)
        budget = body.get("max_tokens", body.get("max_completion_tokens", 0))

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
                return self._score(request, pairs)
            if finish == "length":
                return self._truncated(str(text), budget)
            return self._in_schema(request, str(text), "response_format")

        return await self._post("/v1/chat/completions", body, parse)

    def _score(self, request: Request, pairs: list[tuple[str, float]]) -> Generation:
        return scores.score(request.compiled, pairs, self.options.min_rating_mass, self.model_name)

    # -- native transport ------------------------------------------------------------------
    def native_text(self, request: Request) -> str:
        """The text for /generate: SGLang's chat template around the image token and the
        policy; in score mode the answer prefix as the open assistant message."""
        compiled, mode = request.compiled, request.mode
        key = (compiled.hash, mode)
        if key not in self._texts:
            assert self.template is not None
            if mode == "score":
                prefix = compiled.layout_for(mode).prefix()
                self._texts[key] = self.template.continued(compiled.prompt, prefix)
            else:
                self._texts[key] = self.template.render(compiled.prompt)
        return self._texts[key]

    def native_body(self, items: Sequence[_Item]) -> dict[str, Any]:
        """The /generate body for a group (one item: plain values; several: lists)."""
        request = items[0].request
        text = self.native_text(request)
        body: dict[str, Any] = {}
        if request.mode == "score":
            body["sampling_params"] = {"max_new_tokens": 1, "temperature": 1.0}
            body["return_logprob"] = True
            body["top_logprobs_num"] = self.options.top_logprobs
            body["return_text_in_logprobs"] = True
        else:
            params = {"max_new_tokens": self.budget(request), **self.sampling()}
            params["json_schema"] = json.dumps(request.compiled.schema_for(request.mode))
            body["sampling_params"] = params
        if len(items) == 1:
            body["text"] = text
            body["image_data"] = items[0].image_url
        else:
            body["text"] = [text] * len(items)
            body["image_data"] = [item.image_url for item in items]
        return body

    async def _native(self, items: list[_Item]) -> list[Generation]:
        if len(items) > 1 and not self._lists:
            return await self._one_by_one(items)
        request = items[0].request
        body = self.native_body(items)

        def parse(payload: Any) -> list[Generation]:
            answers = payload if len(items) > 1 else [payload]
            if not isinstance(answers, list) or len(answers) != len(items):
                raise BadReply(f"expected {len(items)} answers")
            return [self._native_answer(request, body, a) for a in answers]

        try:
            return await self._post("/generate", body, parse)
        except Failed as err:
            if len(items) == 1 or err.status != 422:
                raise
        # a proxy that takes one text per call (SGLang's router answers 422 to a list)
        self._lists = False
        self._warn_once(
            "lists",
            f"{self._where()} refuses a list of texts on /generate (HTTP 422, as "
            "SGLang's router does); sending one image per request",
        )
        return await self._one_by_one(items)

    async def _one_by_one(self, items: list[_Item]) -> list[Generation]:
        found = await asyncio.gather(*(self._answers([item]) for item in items))
        return [answers[0] for answers in found]

    def _native_answer(self, request: Request, body: dict[str, Any], answer: Any) -> Generation:
        try:
            text = str(answer["text"])
            meta = answer["meta_info"]
            finish = (meta.get("finish_reason") or {}).get("type")
        except (KeyError, TypeError, AttributeError) as err:
            raise BadReply(f"answer without text or meta_info ({err})") from None
        if request.mode == "score":
            try:
                top = meta["output_top_logprobs"][0]
                pairs = [(entry[2], float(entry[0])) for entry in top if entry[0] is not None]
            except (KeyError, IndexError, TypeError, ValueError):
                raise BadReply("score answer without meta_info.output_top_logprobs") from None
            if any(not isinstance(tok, str) for tok, _ in pairs):
                raise BadReply("score answer without token texts (return_text_in_logprobs)")
            return self._score(request, pairs)
        if finish == "length":
            return self._truncated(text, body["sampling_params"]["max_new_tokens"])
        return self._in_schema(request, text, "sampling_params.json_schema")

    # -- HTTP with retries -----------------------------------------------------------------
    async def _post(self, path: str, body: Any, parse: Callable[[Any], T]) -> T:
        return await self._require_http().post(path, body, parse)


# -- helpers ---------------------------------------------------------------------------------
def _with_score(answer: Generation, score: Generation) -> Generation:
    """The answer with its P(Unsafe) from a score_answers request; when that request failed,
    the item is an error (a rule that reads P(Unsafe) must not silently skip it)."""
    if score.error is None:
        answer.p_unsafe = score.p_unsafe
        return answer
    return Generation(
        text=answer.text,
        error=f"score_answers: the answer came, but its P(Unsafe) did not: {score.error}",
        retryable=score.retryable,
        model=answer.model,
        timings=answer.timings,
    )


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(SGLangBackend)
