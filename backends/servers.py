"""What speaks at a URL: SGLang (a server or its router), vLLM, or another OpenAI-style server.

The answer decides what the backend may send. OpenAI's chat API has no `top_k`, no
`continue_final_message`; strict servers (`transformers serve`) answer 422 to any field they do
not know, so only SGLang and vLLM get those. SGLang's ChatCompletionRequest has no
`add_generation_prompt` (it would be ignored); vLLM wants it false beside
`continue_final_message`. SGLang's router takes one `text` per `/generate` and has no
`/tokenize`.

How each tells itself apart (read from the servers' sources):

- SGLang: `GET /server_info` (`/get_server_info` before 0.5) answers its server arguments,
  among them `version` and `chat_template` (`srt/entrypoints/http_server.py`); its model cards
  say `owned_by: "sglang"`.
- SGLang's router (sglang-router 0.3): `/server_info` is 404; `GET /get_server_info` answers its
  own `{"router_manager": true, "workers_count": N, ...}`; `/v1/models` lists a model `unknown`
  owned by `local`.
- vLLM: `GET /version` answers `{"version": ...}`; its model cards say `owned_by: "vllm"`.
- anything else is treated as an OpenAI-compatible server that accepts OpenAI's fields only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from policy_engine import BackendError, BackendUnavailableError

from .http_client import Failed, HttpClient, Reply

ServerKind = Literal["sglang", "vllm", "openai"]


@dataclass(frozen=True)
class ServerInfo:
    kind: ServerKind
    router: bool = False  # SGLang's router: one text per /generate, no /tokenize
    chat_template: str | None = None  # SGLang's --chat-template, when it said (None: HF's)
    told_by: str = ""  # how we know, for messages
    models: list[str] = field(default_factory=list)  # /v1/models, when it was read

    def describe(self) -> str:
        name = {"sglang": "SGLang", "vllm": "vLLM", "openai": "an OpenAI-compatible server"}
        what = "SGLang's router" if self.router else name[self.kind]
        return f"{what} ({self.told_by})" if self.told_by else what


async def get(http: HttpClient, path: str, hint: str = "") -> Reply:
    """A start-up GET, retried like a POST: a fault (5xx, unreachable) that outlasts the
    retries is a BackendError (that says `hint`); a refused API key is the user's to fix."""
    try:
        reply = await http.get(path)
    except Failed as err:
        raise BackendError(f"{err.message}{'; ' + hint if hint else ''}", retryable=True) from None
    if reply.status in (401, 403):
        raise BackendUnavailableError(
            f"{reply.url}: HTTP {reply.status}{reply.said()}: the server refused the credentials "
            f"(API key from ${http.settings.api_key_env})"
        )
    return reply


async def identify(http: HttpClient) -> ServerInfo:
    """Ask the server's info routes what it is (see the module docstring)."""
    for path in ("/server_info", "/get_server_info"):
        reply = await get(http, path)
        if reply.status == 200 and isinstance(reply.body, dict):
            body: dict[str, Any] = reply.body
            if body.get("router_manager"):
                return ServerInfo("sglang", router=True, told_by=f"GET {path}")
            if "vllm_config" in body:  # vLLM's dev-mode /server_info
                return ServerInfo("vllm", told_by=f"GET {path}")
            if "version" in body or "model_path" in body:
                template = body.get("chat_template")
                return ServerInfo(
                    "sglang",
                    chat_template=template if isinstance(template, str) and template else None,
                    told_by=f"GET {path}",
                )
    version = await get(http, "/version")
    if version.status == 200 and isinstance(version.body, dict) and "version" in version.body:
        return ServerInfo("vllm", told_by="GET /version")
    models = await get(http, "/v1/models")
    owners = {str(card.get("owned_by")) for card in model_cards(models)}
    names = [str(card["id"]) for card in model_cards(models) if "id" in card]
    if "vllm" in owners:
        return ServerInfo("vllm", told_by="/v1/models: owned_by vllm", models=names)
    if "sglang" in owners:
        return ServerInfo("sglang", told_by="/v1/models: owned_by sglang", models=names)
    told = "no SGLang or vLLM info route answered"
    return ServerInfo("openai", told_by=told, models=names if models.status == 200 else [])


def model_cards(reply: Reply) -> list[dict[str, Any]]:
    if reply.status != 200 or not isinstance(reply.body, dict):
        return []
    data = reply.body.get("data")
    return [card for card in data if isinstance(card, dict)] if isinstance(data, list) else []
