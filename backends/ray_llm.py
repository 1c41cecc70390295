"""Engines inside Ray: the preprocess and postprocess of a `ray.data.llm` processor.

    from ray.data.llm import vLLMEngineProcessorConfig
    from policy_engine.backends.ray_llm import build_llm_processor

    config = vLLMEngineProcessorConfig(model_source="AIML-TUDA/LlavaGuard-v1.2-7B-OV-hf", ...)
    judge = build_llm_processor("llavaguard", config)
    judged = judge(ray.data.from_items([{"id": "a", "image": b"..."}]))

`llm_processor_steps` builds, from one compiled policy, the two row functions Ray's
`build_processor` takes: `preprocess` turns a row (`id`, `image`) into what the processor's
stages read, exactly what the sglang backend sends (the image part first, then the compiled
prompt; greedy; the compiled answer schema as structured output), and `postprocess` reads the
stage's answer with the engine's strict reply reader (`parse_verdict`), runs the policy's
post-processors (`Engine.decide`) and returns the verdict columns (`COLUMNS`). A reply outside
the schema, an engine or HTTP error and an undecodable image are error rows (`rating` None,
`error` set), never a Safe.

Row contracts (Ray 2.60, `ray/llm/_internal/batch/stages`):

- vLLM engine: `messages` (rendered by the chat-template stage; images are read by the
  prepare-multimodal stage, which is off by default) and `sampling_params`, whose
  `structured_outputs` dict becomes vLLM's `StructuredOutputsParams` (`json`: the schema, sent
  as a JSON string so Arrow never rewrites it). Output: `generated_text`; with
  `should_continue_on_error` a failed row carries `__inference_error__`.
- SGLang engine: `prompt` (from the chat-template stage) and `sampling_params` (`json_schema`
  a JSON string, as SGLang takes it). Ray 2.60's stage passes only the prompt and the sampling
  params to `Engine.async_generate`: no image reaches the model, so `build_llm_processor`
  refuses it (the row still carries `image_data` for a Ray that passes it on).
- HTTP: `payload`, POSTed as JSON; output `http_response`, the reply's JSON body.

Ray is imported only inside functions; this module imports without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Decision,
    Engine,
    Generation,
    LoadedImage,
    Mode,
    Policy,
    PolicyEngineError,
    Verdict,
    load_policy,
    parse_verdict,
)

from .servers import ServerInfo, ServerKind
from .sglang import Request, SGLangBackend

EngineKind = Literal["vllm", "sglang", "http"]
Row = dict[str, Any]
# The columns postprocess returns besides the id column, in this order.
COLUMNS = (
    "rating",
    "category",
    "p_unsafe",
    "actions",
    "error",
    "policy_id",
    "policy_hash",
    "model",
    "decoding",
)
ERROR_KEY = "__inference_error__"  # Ray's marker of a failed row: its stages pass it through
IMAGE_ERROR = "policy-engine image: "  # how preprocess marks an image it could not decode
GREEDY = {"method": "greedy"}
log = logging.getLogger(__name__)


class _Images(Backend):
    """Hands the engine's decoded image back to the caller: `preprocess` decodes through the
    Engine (the same checks, limits and RGB conversion as every backend gets)."""

    name = "ray-llm-images"
    capabilities = Capabilities(images=True)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[LoadedImage] = []

    def generate(self, batch: Batch) -> list[Generation]:
        self.seen = list(batch.images)
        return [Generation(error="not a model") for _ in batch.images]


class _Steps:
    """What preprocess and postprocess share: the policy, the request builder, the engine."""

    def __init__(
        self,
        policy: Policy,
        engine: EngineKind,
        model: str,
        mode: Mode,
        server: ServerKind,
        id_column: str,
        image_column: str,
        image_format: str,
        max_new_tokens: int | None,
    ) -> None:
        if engine not in ("vllm", "sglang", "http"):
            raise PolicyEngineError(f"ray_llm: engine must be vllm, sglang or http, not {engine!r}")
        if mode == "score":
            raise PolicyEngineError(
                "ray_llm: mode 'score' needs logprobs that ray.data.llm's stages do not hand "
                "back in one shape; use mode full or verdict"
            )
        self.policy, self.engine_kind, self.model, self.mode = policy, engine, model, mode
        self.server: ServerKind = "vllm" if engine == "vllm" else server
        self.id_column, self.image_column = id_column, image_column
        self.image_format, self.max_new_tokens = image_format, max_new_tokens
        self._state: tuple[Engine, _Images, SGLangBackend] | None = None
        self.state()  # a bad policy, mode or option fails here, in the caller

    def __getstate__(self) -> dict[str, Any]:  # Ray pickles the steps to its workers
        return {k: v for k, v in self.__dict__.items() if k != "_state"} | {"_state": None}

    def state(self) -> tuple[Engine, _Images, SGLangBackend]:
        """The engine (decoding, post-processors), its image hand-back and the sglang backend
        whose request builders this reuses; built once per process."""
        if self._state is None:
            images = _Images()
            engine = Engine(self.policy, images, mode=self.mode)
            options: dict[str, Any] = {"url": ["http://ray-data-llm.invalid"], "greedy": True}
            options |= {"server": self.server, "model": self.model or None}
            options |= {"image_format": self.image_format, "max_new_tokens": self.max_new_tokens}
            builder = SGLangBackend(**options)
            builder.server = ServerInfo(self.server, told_by="ray_llm")
            builder.model_name = self.model
            self._state = (engine, images, builder)
        return self._state


class Preprocess(_Steps):
    """A row (`id_column`, `image_column`) -> the row the processor's first stage reads."""

    def __call__(self, row: Row) -> Row:
        engine, images, builder = self.state()
        # every row carries Ray's error marker: Arrow fills a key missing from some rows with
        # null, and Ray's stages skip any row whose marker is not exactly ""
        out: Row = {self.id_column: row.get(self.id_column), ERROR_KEY: ""}
        source = _image(row.get(self.image_column))
        verdict = engine.warm_up(source) if source is not None else None
        if verdict is None or (verdict.error is not None and verdict.error.kind == "image"):
            why = verdict.error.message if verdict and verdict.error else "no image in the row"
            return out | {ERROR_KEY: IMAGE_ERROR + why}
        image = images.seen[0]
        request = Request(image, engine.compiled, self.mode, self.max_new_tokens)
        try:
            url = image.to_data_url(self.image_format)
        except (ValueError, PolicyEngineError) as err:
            return out | {ERROR_KEY: IMAGE_ERROR + str(err)}
        body = builder.openai_body(request, url)
        if self.engine_kind == "http":
            return out | {"payload": body}
        schema = json.dumps(engine.compiled.schema_for(self.mode))
        sampling: dict[str, Any] = dict(builder.sampling(top_k=False))
        if self.engine_kind == "vllm":
            sampling |= {
                "max_tokens": builder.budget(request),
                "structured_outputs": {"json": schema},
            }
            return out | {"messages": body["messages"], "sampling_params": sampling}
        sampling |= {"max_new_tokens": builder.budget(request), "json_schema": schema}
        return out | {"messages": body["messages"], "sampling_params": sampling, "image_data": url}


class Postprocess(_Steps):
    """The stage's output row -> the id column and the verdict columns (`COLUMNS`)."""

    def __call__(self, row: Row) -> Row:
        engine = self.state()[0]
        verdict = self.verdict(row)
        decision = engine.decide(verdict)
        return {self.id_column: row.get(self.id_column)} | columns(decision)

    def verdict(self, row: Row) -> Verdict:
        compiled = self.state()[0].compiled
        source = None if row.get(self.id_column) is None else str(row.get(self.id_column))
        failed = str(row.get(ERROR_KEY) or "")
        if failed.startswith(IMAGE_ERROR):
            return self._error("image", failed.removeprefix(IMAGE_ERROR), source)
        if failed:
            return self._error("backend", f"{self.engine_kind} engine: {failed}", source)
        text, model, problem = self._answer(row)
        if problem is not None:
            return self._error("backend", problem, source, raw=text, model=model)
        return parse_verdict(
            text or "", compiled, mode=self.mode, model=model, decoding=GREEDY, source=source
        )

    def _answer(self, row: Row) -> tuple[str | None, str, str | None]:
        """(reply text, model, why there is no usable reply or None)."""
        model = self.model
        if self.engine_kind != "http":
            text = row.get("generated_text")
            if not isinstance(text, str):
                return None, model, "the engine stage gave no generated_text"
            return text, model, None
        body = row.get("http_response")
        if isinstance(body, str):  # a body Arrow kept as text
            try:
                body = json.loads(body)
            except ValueError:
                return body, model, "the server's reply is not JSON"
        if not isinstance(body, dict):
            return None, model, "the HTTP stage gave no http_response"
        model = str(body.get("model") or model)
        if body.get("error") is not None or body.get("object") == "error":
            error = body.get("error")
            said = error.get("message") if isinstance(error, dict) else error or body.get("message")
            return None, model, f"the server answered an error: {said}"
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            return None, model, f"reply without choices[0].message.content ({err})"
        if not isinstance(text, str):
            return None, model, "reply without text in choices[0].message.content"
        if choice.get("finish_reason") == "length":
            return text, model, "the answer was cut at the token budget; raise max_new_tokens"
        return text, model, None

    def _error(
        self,
        kind: Literal["image", "backend"],
        message: str,
        source: str | None,
        *,
        raw: str | None = None,
        model: str | None = None,
    ) -> Verdict:
        compiled = self.state()[0].compiled
        return Verdict(
            rating=None,
            error={"kind": kind, "message": message},
            raw=raw,
            policy_id=compiled.policy.id,
            policy_version=compiled.policy.version,
            policy_hash=compiled.hash,
            model=model or self.model or None,
            decoding=GREEDY,
            source=source,
        )


def columns(decision: Decision) -> Row:
    """The verdict columns of a Decision (final rating and category after post-processing)."""
    verdict = decision.verdict
    error = verdict.error
    return {
        "rating": decision.rating,
        "category": decision.category_id,
        "p_unsafe": verdict.p_unsafe,
        "actions": [action.name for action in decision.actions],
        "error": f"{error.kind}: {error.message}" if error else None,
        "policy_id": verdict.policy_id,
        "policy_hash": verdict.policy_hash,
        "model": verdict.model,
        "decoding": json.dumps(verdict.decoding) if verdict.decoding else None,
    }


def _image(value: Any) -> Any:
    """A cell as the engine reads images: paths and bytes as they are, HF image structs
    ({bytes, path}), and the pixel arrays `ray.data.read_images` yields."""
    if value is None:
        return None
    if isinstance(value, dict):
        return bytes(value["bytes"]) if value.get("bytes") else (value.get("path") or None)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if hasattr(value, "__array_interface__"):  # numpy pixels
        from PIL import Image

        return Image.fromarray(value)
    return value


def _policy(policy: Policy | str | Path) -> Policy:
    return policy if isinstance(policy, Policy) else load_policy(policy)


def llm_processor_steps(
    policy: Policy | str | Path,
    *,
    engine: EngineKind,
    model: str = "",
    mode: Mode = "full",
    server: ServerKind = "openai",
    id_column: str = "id",
    image_column: str = "image",
    image_format: Literal["PNG", "JPEG", "WEBP"] = "PNG",
    max_new_tokens: int | None = None,
) -> tuple[Callable[[Row], Row], Callable[[Row], Row]]:
    """(preprocess, postprocess) for `ray.data.llm.build_processor` with the `engine` kind's
    config, from one compiled policy. `model` is recorded in the verdicts (for `http`, also
    the `model` field of the request; the reply's model wins when it names one). `server` is
    what answers the HTTP processor (`sglang` and `vllm` take `max_completion_tokens`, others
    `max_tokens`). Rows need `id_column` and `image_column` (paths readable by the workers,
    encoded bytes, HF image structs or pixel arrays)."""
    the_policy = _policy(policy)
    args = (the_policy, engine, model, mode, server, id_column, image_column, image_format)
    return Preprocess(*args, max_new_tokens), Postprocess(*args, max_new_tokens)


class VerdictProcessor:
    """A `ray.data.llm` processor whose every row, failed ones included, ends as the id and
    verdict columns: Ray's processor runs with an identity postprocess (Ray hands failed rows
    past a postprocess), then `postprocess` maps each row."""

    def __init__(self, processor: Any, postprocess: Callable[[Row], Row]) -> None:
        self.processor = processor
        self.postprocess = postprocess

    def __call__(self, dataset: Any) -> Any:
        return self.processor(dataset).map(self.postprocess)


def build_llm_processor(
    policy: Policy | str | Path,
    config: Any,
    *,
    model: str | None = None,
    mode: Mode = "full",
    server: ServerKind = "openai",
    id_column: str = "id",
    image_column: str = "image",
    **kwargs: Any,
) -> VerdictProcessor:
    """`ray.data.llm.build_processor(config, ...)` with this policy's steps; the engine kind
    comes from the config's type. For vLLM, turns the prepare-multimodal stage on (images reach
    the model only through it) and `should_continue_on_error` (a failed row is an error row,
    not a failed job). Refuses the SGLang engine processor while Ray's SGLang stage drops
    images. `kwargs` go to `llm_processor_steps`."""
    try:
        from ray.data.llm import (
            HttpRequestProcessorConfig,
            SGLangEngineProcessorConfig,
            build_processor,
            vLLMEngineProcessorConfig,
        )
    except ImportError:
        raise PolicyEngineError(
            "build_llm_processor needs ray.data.llm: pip install 'ray[data,llm]'"
        ) from None
    engine: EngineKind
    if isinstance(config, HttpRequestProcessorConfig):
        engine = "http"
    elif isinstance(config, vLLMEngineProcessorConfig):
        engine = "vllm"
        update: dict[str, Any] = {"should_continue_on_error": True}
        if config.prepare_multimodal_stage is False:
            update["prepare_multimodal_stage"] = True
        config = config.model_copy(update=update)
    elif isinstance(config, SGLangEngineProcessorConfig):
        raise PolicyEngineError(
            "ray.data.llm's SGLang engine stage passes only the prompt and sampling params to "
            "SGLang (no image_data), so the model would judge the policy text without the "
            "image; run an SGLang server and use HttpRequestProcessorConfig (docs/scale.md)"
        )
    else:
        raise PolicyEngineError(
            f"build_llm_processor: unsupported config {type(config).__name__}; use "
            "vLLMEngineProcessorConfig or HttpRequestProcessorConfig"
        )
    name = model if model is not None else str(getattr(config, "model_source", "") or "")
    pre, post = llm_processor_steps(
        policy,
        engine=engine,
        model=name,
        mode=mode,
        server=server,
        id_column=id_column,
        image_column=image_column,
        **kwargs,
    )
    return VerdictProcessor(build_processor(config, preprocess=pre), post)
