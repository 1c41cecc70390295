"""The sglang backend's options (`-o KEY=VALUE`), validated when the backend is built."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import scores
from .http_client import normalize_url


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
    server: Literal["auto", "sglang", "vllm", "openai"] = Field(
        default="auto",
        description="What answers at url: auto asks its info routes; sglang and vllm take their "
        "extra fields (top_k, continue_final_message); openai: OpenAI's fields only.",
    )
    model: str | None = Field(
        default=None,
        description="Served model name (default: asked from the server); with launch, the "
        "checkpoint to serve.",
    )
    chat_template: str = Field(
        default="auto",
        description="native only: chatml-llava, vicuna_v1.1, qwen2-vl, a Jinja file or a "
        "checkpoint directory; auto: the server's, else from the served model's path.",
    )
    api_key_env: str = Field(
        default="POLICY_ENGINE_SGLANG_API_KEY",
        description="Environment variable that holds the API key (sent as a Bearer token).",
    )
    concurrency: int = Field(default=64, ge=1, le=4096, description="Requests in flight.")
    list_batch: int = Field(
        default=1,
        ge=1,
        le=256,
        description="native only: images per /generate call (one behind SGLang's router).",
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
    greedy: bool = Field(
        default=True,
        description="temperature 0 (the default): the same verdict every run. false: sample "
        "with temperature/top_p/top_k, LlavaGuard's published settings by default.",
    )
    temperature: float = Field(default=0.2, gt=0.0, description="Sampling only (greedy=false).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Sampling only.")
    top_k: int = Field(default=50, ge=0, description="0: off. Sent to SGLang and vLLM only.")
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
        default=20, ge=2, le=20, description="score mode: top logprobs of the first token to read."
    )
    min_rating_mass: float = Field(
        default=scores.DEFAULT_FLOOR,
        gt=0.0,
        le=1.0,
        description="score mode: the least share of the first answer token's probability the "
        "two ratings must hold; below it the item is an error (a closed assistant turn or a "
        "wrong chat template).",
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
