"""What SGLang accepts, and how it renders chats: request parsing for the loopback server.

Each rule follows SGLang 0.5.23's source (read from the wheel; the package is never imported):

- `/generate` (`python/sglang/api/v1/api_types.py`, `GenerateRequest`): unknown top-level keys
  are ignored (SGLang's router adds a dozen); `sampling_params` is strict (`SamplingParams`
  rejects unknown keys) and `max_new_tokens` defaults to 128; `text` may be a list.
- `/v1/chat/completions` (`srt/entrypoints/openai/protocol.py`, `ChatCompletionRequest`, a
  pydantic model that ignores unknown keys): `max_completion_tokens` or the deprecated
  `max_tokens` (`max_completion_tokens or max_tokens`); no `add_generation_prompt` field.
- Chat rendering (`srt/parser/conversation.py`, `generate_chat_conv`, `get_prompt`;
  `srt/entrypoints/openai/serving_chat.py`, `_apply_conversation_template`,
  `_apply_jinja_template`, `_handle_last_assistant_message`): with a conversation template
  (`--chat-template chatml-llava` …) a prefilled final assistant message is rendered closed and
  then a trailing stop string or separator is stripped only if the text ends with it, so CHATML
  (a message ends with `<|im_end|>\\n`) stays closed; with the model's HF (Jinja) template the
  prefill is cut off, the rest rendered with the generation prompt, and the prefill appended.
  Without `continue_final_message` a final assistant message starts a new turn (conversation
  templates) or becomes a user message (Jinja).

This module is deliberately separate from the client's `chat_templates.py`: a server that
reused the client's rendering would agree with the client's mistakes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from fake_model import MAX_MODEL_LEN
from PIL import Image
from schema_instances import is_int, is_number, validator


class Invalid(Exception):
    """A request the real server would reject (or that this fake refuses on purpose)."""


_DATA_URL_RE = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.DOTALL)


def decode_image(item: Any, where: str) -> bytes:
    """Decode one image (base64 or a data:image/...;base64, URL) for real; return its bytes."""
    if not isinstance(item, str) or not item:
        raise Invalid(f"{where} must be a base64 string or a data:image/...;base64, URL")
    if item.startswith("data:"):
        match = _DATA_URL_RE.fullmatch(item)
        if match is None:
            raise Invalid(
                f"{where}: a data URL must look like data:image/<format>;base64,<payload>"
            )
        payload = match.group(1)
    else:
        payload = item
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid(
            f"{where} is not valid base64 (this fake accepts inline images only)"
        ) from exc
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
    except Exception as exc:
        raise Invalid(f"{where} is not an image Pillow can decode ({exc})") from exc
    return raw


def check_keys(body: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Invalid(f"unknown field(s) in {where}: {', '.join(unknown)}")


def check_json_schema_object(schema: Any, where: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise Invalid(f"{where} must be a JSON Schema object")
    try:
        validator(schema)
    except jsonschema.SchemaError as exc:
        raise Invalid(f"{where} is not a valid JSON Schema: {exc.message}") from exc
    return schema


def _check_types(
    body: dict[str, Any], checks: dict[str, tuple[Callable[[Any], bool], str]]
) -> None:
    for key, (ok, wanted) in checks.items():
        if key in body and body[key] is not None and not ok(body[key]):
            raise Invalid(f"{key} must be {wanted}, got {body[key]!r}")


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(s, str) for s in value)
    )


# --------------------------------------------------------------------------------------------
# /generate
# --------------------------------------------------------------------------------------------

# api_types.SamplingParams, all of its keys: anything else is a 400
SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "stop",
        "stop_token_ids",
        "stop_regex",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "min_new_tokens",
        "n",
        "json_schema",
        "regex",
        "ebnf",
        "structural_tag",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "no_stop_trim",
        "stream_interval",
        "logit_bias",
        "sampling_seed",
        "custom_params",
        "beam_width",
        "watermark",
        "choice",
    }
)
DEFAULT_MAX_NEW_TOKENS = 128  # SamplingParams.max_new_tokens


@dataclass
class GenerateItem:
    text: str
    image: bytes | None
    params: dict[str, Any]
    schema: dict[str, Any] | None
    rid: str | None
    token_ids: list[int] | None
    top_logprobs_num: int

    @property
    def budget(self) -> int:
        value = self.params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        return MAX_MODEL_LEN if value is None else int(value)


@dataclass
class GenerateRequest:
    items: list[GenerateItem]
    batch: bool
    return_logprob: bool
    return_text: bool


def check_sampling(params: Any, where: str) -> dict[str, Any] | None:
    """Validate one sampling_params object as SamplingParams does; return the parsed
    json_schema, if any."""
    if not isinstance(params, dict):
        raise Invalid(f"{where} must be an object")
    check_keys(params, SAMPLING_KEYS, where)
    budget = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if budget is not None and (not is_int(budget) or budget < 0):
        raise Invalid(f"{where}.max_new_tokens must be an integer >= 0, got {budget!r}")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: is_int(v) and (v == -1 or v >= 1), "an integer, -1 or >= 1"),
        "min_p": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "frequency_penalty": (lambda v: is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "presence_penalty": (lambda v: is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "repetition_penalty": (lambda v: is_number(v) and 0 < v <= 2, "a number in (0, 2]"),
        "min_new_tokens": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "skip_special_tokens": (_boolean, "a boolean"),
        "spaces_between_special_tokens": (_boolean, "a boolean"),
        "ignore_eos": (_boolean, "a boolean"),
        "no_stop_trim": (_boolean, "a boolean"),
        "sampling_seed": (is_int, "an integer"),
        "n": (lambda v: is_int(v) and v == 1, "1 (this fake returns one sample per prompt)"),
        "stop": (_strings, "a string or a list of strings"),
        "stop_regex": (_strings, "a string or a list of strings"),
        "regex": (lambda v: isinstance(v, str), "a string"),
        "ebnf": (lambda v: isinstance(v, str), "a string"),
        "json_schema": (lambda v: isinstance(v, str), "a JSON string (json.dumps(schema))"),
    }
    _check_types(params, checks)
    if isinstance(params.get("json_schema"), dict):
        raise Invalid(f"{where}.json_schema must be a JSON string, not an object")
    constraints = [k for k in ("json_schema", "regex", "ebnf", "structural_tag") if params.get(k)]
    if len(constraints) > 1:
        raise Invalid(f"{where}: only one of json_schema, regex, ebnf, structural_tag may be set")
    for key in ("regex", "ebnf", "structural_tag", "choice", "beam_width"):
        if params.get(key):
            raise Invalid(f"{where}.{key} is not simulated by this fake server")
    if not params.get("json_schema"):
        return None
    try:
        schema = json.loads(params["json_schema"])
    except json.JSONDecodeError as exc:
        raise Invalid(f"{where}.json_schema is not valid JSON: {exc}") from exc
    return check_json_schema_object(schema, f"{where}.json_schema")


def _per_item(
    value: Any, size: int, batch: bool, ok: Callable[[Any], bool], what: str
) -> list[Any]:
    """A value given once for all texts, or (for a list of texts) one per text."""
    if ok(value):
        return [value] * size
    if batch and isinstance(value, list) and len(value) == size and all(ok(v) for v in value):
        return list(value)
    raise Invalid(f"{what} (or, for a list of texts, one per text)")


def parse_generate(body: Any, image_token: str) -> GenerateRequest:
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object")
    if body.get("input_ids") is not None:
        raise Invalid(
            "input_ids is not accepted by this fake: send the prompt as `text` "
            "(so the chat template and image token can be checked)"
        )
    text = body.get("text")
    if isinstance(text, str):
        texts, batch = [text], False
    elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        texts, batch = list(text), True
    else:
        raise Invalid("text must be a string or a non-empty list of strings")
    size = len(texts)
    if body.get("stream") not in (None, False):
        raise Invalid("stream must be false (streaming is not simulated)")
    if body.get("return_hidden_states") not in (None, False):
        raise Invalid("return_hidden_states is not simulated by this fake server")
    for key in ("return_logprob", "return_text_in_logprobs"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise Invalid(f"{key} must be a boolean")
    return_logprob = bool(body.get("return_logprob"))
    start = body.get("logprob_start_len")
    if start is not None and (not is_int(start) or start < -1):
        raise Invalid("logprob_start_len must be an integer >= -1")
    tops = _per_item(
        body.get("top_logprobs_num") or 0,
        size,
        batch,
        lambda v: is_int(v) and v >= 0,
        "top_logprobs_num must be an integer >= 0",
    )
    if any(tops) and not return_logprob:
        raise Invalid("top_logprobs_num requires return_logprob: true")
    modalities = body.get("modalities")
    if modalities is not None and not (
        isinstance(modalities, list)
        and all(m in ("image", "multi-images", "video") for m in modalities)
    ):
        raise Invalid("modalities must be a list of 'image', 'multi-images' or 'video'")

    token_ids: list[list[int] | None] = [None] * size
    if body.get("token_ids_logprob") is not None:
        if not return_logprob:
            raise Invalid("token_ids_logprob requires return_logprob: true")
        token_ids = _per_item(
            body["token_ids_logprob"],
            size,
            batch,
            lambda v: isinstance(v, list) and bool(v) and all(is_int(i) and i >= 0 for i in v),
            "token_ids_logprob must be a non-empty list of token ids",
        )
    rids: list[str | None] = [None] * size
    rid = body.get("rid")
    if rid is not None:
        if not batch and isinstance(rid, str):
            rids = [rid]
        elif batch and isinstance(rid, list) and len(rid) == size:
            rids = [str(r) for r in rid]
        else:
            raise Invalid("rid must be a string (or a list of strings, one per text)")
    raw_params = body.get("sampling_params") or {}
    if isinstance(raw_params, list) and not batch:
        raise Invalid("sampling_params must be an object for a single text")
    params_list = _per_item(
        raw_params, size, batch, lambda v: isinstance(v, dict), "sampling_params must be an object"
    )
    shared = isinstance(raw_params, dict)
    schemas = [
        check_sampling(p, "sampling_params" if shared else f"sampling_params[{i}]")
        for i, p in enumerate(params_list)
    ]
    images = _images(body.get("image_data"), texts, batch, image_token)
    items = [
        GenerateItem(
            texts[i], images[i], params_list[i], schemas[i], rids[i], token_ids[i], tops[i]
        )
        for i in range(size)
    ]
    return GenerateRequest(items, batch, return_logprob, bool(body.get("return_text_in_logprobs")))


def _images(raw: Any, texts: list[str], batch: bool, image_token: str) -> list[bytes | None]:
    """One image (or none) per text; the text must hold the model's image token as often as it
    has images (SGLang's multimodal processor expands each into the image's tokens)."""
    size = len(texts)
    images: list[bytes | None] = [None] * size
    if raw is not None:
        if not batch:
            if isinstance(raw, list):
                if len(raw) != 1:
                    raise Invalid("this fake takes one image per text")
                raw = raw[0]
            images = [decode_image(raw, "image_data")]
        else:
            if not isinstance(raw, list) or len(raw) != size:
                raise Invalid(f"for a list of {size} texts, image_data must be a list of {size}")
            images = [decode_image(img, f"image_data[{i}]") for i, img in enumerate(raw)]
    for i, (text, image) in enumerate(zip(texts, images, strict=True)):
        where = f"text[{i}]" if batch else "text"
        found = text.count(image_token)
        if image is not None and found != 1:
            raise Invalid(
                f"{where} contains the image token {image_token!r} {found} times, expected "
                "exactly once when image_data is given (wrong chat template?)"
            )
        if image is None and found:
            raise Invalid(f"{where} contains the image token {image_token!r} but no image_data")
    return images


# --------------------------------------------------------------------------------------------
# Conversation templates, as SGLang renders them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """A registered conversation template (conversation.py's fields and names)."""

    name: str
    sep_style: str  # "CHATML", "ADD_COLON_TWO", "ADD_NEW_LINE_SINGLE"
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    stop_str: tuple[str, ...]
    image_token: str

    def get_prompt(self, system_message: str, messages: list[tuple[str, str | None]]) -> str:
        system_prompt = self.system_template.format(system_message=system_message)
        if self.sep_style == "CHATML":
            ret = "" if system_prompt == "" else system_prompt + self.sep + "\n"
            for role, message in messages:
                ret += role + "\n" + message + self.sep + "\n" if message else role + "\n"
            return ret
        if self.sep_style == "ADD_NEW_LINE_SINGLE":
            ret = "" if (not system_message or system_prompt == "") else system_prompt + self.sep
            for role, message in messages:
                ret += role + "\n" + message + self.sep if message else role + "\n"
            return ret
        assert self.sep_style == "ADD_COLON_TWO"
        seps = [self.sep, self.sep2 or ""]
        ret = system_prompt + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        return ret


CONVERSATIONS = {
    c.name: c
    for c in (
        Conversation(
            "chatml-llava",
            "CHATML",
            "<|im_start|>system\n{system_message}",
            "You are a helpful assistant.",
            ("<|im_start|>user", "<|im_start|>assistant"),
            "<|im_end|>",
            None,
            ("<|endoftext|>", "<|im_end|>"),
            "<image>",
        ),
        Conversation(
            "vicuna_v1.1",
            "ADD_COLON_TWO",
            "{system_message}",
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions.",
            ("USER", "ASSISTANT"),
            " ",
            "</s>",
            (),
            "<image>",
        ),
        Conversation(
            "qwen2-vl",
            "ADD_NEW_LINE_SINGLE",
            "<|im_start|>system\n{system_message}",
            "You are a helpful assistant.",
            ("<|im_start|>user", "<|im_start|>assistant"),
            "<|im_end|>\n",
            None,
            ("<|im_end|>",),
            "<|vision_start|><|image_pad|><|vision_end|>",
        ),
    )
}
JINJA_IMAGE_TOKEN = "<image>"  # the HF template of the LlavaGuard -hf checkpoints


@dataclass
class Message:
    role: str
    parts: list[tuple[str, Any]] = field(default_factory=list)  # ("text", str) | ("image", bytes)
    plain: str | None = None  # string content

    def text(self) -> str:
        if self.plain is not None:
            return self.plain
        return "".join(value for kind, value in self.parts if kind == "text")


def render_chat(
    template: str | None, messages: list[Message], continue_final: bool
) -> tuple[str, list[bytes]]:
    """The prompt SGLang builds for these messages, and the images in order: with the named
    conversation template, or (None) with the model's HF template like the -hf checkpoints'."""
    images = [value for m in messages for kind, value in m.parts if kind == "image"]
    if template is None:
        return _render_jinja_like(messages, continue_final), images
    conv = CONVERSATIONS[template]
    system = conv.system_message
    turns: list[tuple[str, str | None]] = []
    token = conv.image_token + ("" if conv.name == "qwen2-vl" else "\n")
    for message in messages:
        if message.role == "system":
            system = message.text()
        elif message.role == "user":
            if message.plain is not None:
                turns.append((conv.roles[0], message.plain))
            else:
                content = "".join(
                    token if kind == "image" else value for kind, value in message.parts
                )
                turns.append((conv.roles[0], content))
        else:
            turns.append((conv.roles[1], message.text()))
    turns.append((conv.roles[1], None))  # generate_chat_conv's blank assistant turn
    if continue_final and messages and messages[-1].role == "assistant":
        turns.pop()
        prompt = conv.get_prompt(system, turns)
        for stop in conv.stop_str:
            if prompt.endswith(stop):
                prompt = prompt[: -len(stop)]
        if conv.sep and prompt.endswith(conv.sep):
            prompt = prompt[: -len(conv.sep)]
        if conv.sep2 and prompt.endswith(conv.sep2):
            prompt = prompt[: -len(conv.sep2)]
        return prompt, images
    return conv.get_prompt(system, turns), images


def _render_jinja_like(messages: list[Message], continue_final: bool) -> str:
    """SGLang's Jinja path with an HF template that has no default system turn
    (`<|im_start|>ROLE\\n` + image tokens and text + `<|im_end|>\\n`, then the generation
    prompt): a final assistant message is cut off and appended after the generation prompt when
    continuing, and turned into a user message otherwise (_handle_last_assistant_message)."""
    prefix = None
    if messages and messages[-1].role == "assistant":
        last = messages[-1]
        if continue_final and last.plain is not None:
            prefix, messages = last.plain, messages[:-1]
        elif last.plain is not None:
            messages = [*messages[:-1], Message("user", plain=last.plain)]
    text = ""
    for message in messages:
        body = (
            message.plain
            if message.plain is not None
            else "".join(
                JINJA_IMAGE_TOKEN + "\n" if kind == "image" else value
                for kind, value in message.parts
            )
        )
        text += f"<|im_start|>{message.role}\n{body}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    return text + (prefix or "")


# --------------------------------------------------------------------------------------------
# /v1/chat/completions
# --------------------------------------------------------------------------------------------

FLAT_SCHEMA_MESSAGE = (
    "response_format: the schema must be nested under json_schema, i.e. "
    '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}; a flat '
    '"schema" key is silently ignored by some servers (llama.cpp decodes unconstrained)'
)
# Known fields that are validated (SGLang has many more, all ignored here, as unknown keys are)
_CHAT_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "max_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "max_completion_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: is_int(v) and (v == -1 or v >= 1), "an integer, -1 or >= 1"),
    "n": (lambda v: is_int(v) and v == 1, "1 (this fake returns one choice)"),
    "seed": (is_int, "an integer"),
    "user": (lambda v: isinstance(v, str), "a string"),
    "stop": (_strings, "a string or a list of strings"),
    "logprobs": (_boolean, "a boolean"),
    "top_logprobs": (lambda v: is_int(v) and 0 <= v <= 20, "an integer in [0, 20]"),
    "continue_final_message": (_boolean, "a boolean"),
    "no_stop_trim": (_boolean, "a boolean"),
    "ignore_eos": (_boolean, "a boolean"),
    "skip_special_tokens": (_boolean, "a boolean"),
    "separate_reasoning": (_boolean, "a boolean"),
    "stream_reasoning": (_boolean, "a boolean"),
}


@dataclass
class ChatRequest:
    model: str
    budget: int
    schema: dict[str, Any] | None
    logprobs: bool
    top_logprobs: int
    messages: list[Message]
    continue_final: bool


def parse_response_format(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise Invalid("response_format must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind != "json_schema":
        raise Invalid("response_format.type must be 'json_schema' or 'text' here")
    if "schema" in value:
        raise Invalid(FLAT_SCHEMA_MESSAGE)
    inner = value.get("json_schema")
    if not isinstance(inner, dict):
        raise Invalid(
            'response_format.json_schema must be an object {"name": ..., "schema": {...}}'
        )
    if not isinstance(inner.get("name"), str) or not inner["name"]:
        raise Invalid("response_format.json_schema.name is required (a non-empty string)")
    if "strict" in inner and not isinstance(inner["strict"], bool):
        raise Invalid("response_format.json_schema.strict must be a boolean")
    if "schema" not in inner:
        raise Invalid("response_format.json_schema.schema is required")
    return check_json_schema_object(inner["schema"], "response_format.json_schema.schema")


def parse_chat(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object")
    _check_types(body, _CHAT_CHECKS)
    if body.get("stream") not in (None, False):
        raise Invalid("stream must be false (streaming is not simulated)")
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise Invalid("top_logprobs requires logprobs: true")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages must be a non-empty list")
    budget = body.get("max_completion_tokens") or body.get("max_tokens") or MAX_MODEL_LEN
    schema = None
    if body.get("response_format") is not None:
        schema = parse_response_format(body["response_format"])
    return ChatRequest(
        model=str(body.get("model") or "default"),
        budget=budget,
        schema=schema,
        logprobs=bool(body.get("logprobs")),
        top_logprobs=int(body.get("top_logprobs") or 0),
        messages=[_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
        continue_final=bool(body.get("continue_final_message")),
    )


def _message(raw: Any, where: str) -> Message:
    if not isinstance(raw, dict):
        raise Invalid(f"{where} must be an object")
    role = raw.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise Invalid(f"{where}.role must be 'system', 'user' or 'assistant' here, got {role!r}")
    content = raw.get("content")
    if isinstance(content, str):
        return Message(role, plain=content)
    if not isinstance(content, list) or not content:
        raise Invalid(f"{where}.content must be a string or a non-empty list of parts")
    message = Message(role)
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            message.parts.append(("text", part["text"]))
        elif kind == "image_url" and role == "user":
            image_url = part.get("image_url")
            if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
                raise Invalid(f'{at}.image_url must be {{"url": "data:image/...;base64,..."}}')
            if not image_url["url"].startswith("data:image/"):
                raise Invalid(f"{at}.image_url.url must be a data:image/...;base64, URL here")
            message.parts.append(("image", decode_image(image_url["url"], f"{at}.image_url.url")))
        else:
            raise Invalid(f"{at}: a {role} message takes text parts (and user messages images)")
    return message
