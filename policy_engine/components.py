"""Base classes for what plugins register: prompt formats, post-processors, backends.

Each registered class has a `name`, a nested pydantic `Params`/`Options` model with
`extra="forbid"` (a typo in a config is an error, not a no-op) and cheap construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import PolicyEngineError

if TYPE_CHECKING:
    from .compiler import AnswerLayout, CompiledPolicy
    from .images import LoadedImage
    from .policy import Policy
    from .verdict import Decision

Mode = Literal["full", "verdict", "score"]
MODES: tuple[Mode, ...] = ("full", "verdict", "score")


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


_PLAIN = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def plain_message(item: Any) -> str:
    """One pydantic error item in plain words ("must be an integer"), for users' messages."""
    kind = item["type"]
    if kind in _PLAIN:
        return _PLAIN[kind]
    ctx = item.get("ctx") or {}
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    message: str = item["msg"]
    if kind == "value_error":  # a validator's own words
        return message.removeprefix("Value error, ")
    return message.replace("Input should be", "must be").replace("String should", "must")


def one_line(err: ValidationError) -> str:
    """A pydantic error as one readable line: 'option x: message; option y: message'."""
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "options"
        unknown = item["type"] == "extra_forbidden"
        message = "unknown option" if unknown else plain_message(item)
        parts.append(f"option {where}: {message}")
    return "; ".join(parts)


Check = tuple[tuple[str | int, ...], str]
"""A semantic problem: (location relative to the checked object, message)."""


def unknown_categories(
    policy: Policy, found: Iterable[tuple[tuple[str | int, ...], str]]
) -> list[Check]:
    """A Check for each (location, category id) that is not one of the policy's ids (the
    none-applying one included), worded alike for every post-processor."""
    known = [c.id for c in policy.categories] + [policy.none_category.id]
    listing = ", ".join(sorted(known))
    return [
        (where, f"unknown category {category!r}; categories: {listing}")
        for where, category in found
        if category not in known
    ]


class PromptFormat:
    """Turns a Policy into the prompt text and the answer layout a model expects."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def check(self, policy: Policy) -> list[Check]:
        """Problems that make this policy unusable with this format (located in the policy)."""
        return []

    def render(self, policy: Policy) -> str:
        raise NotImplementedError

    def layout(self, policy: Policy) -> AnswerLayout:
        raise NotImplementedError


class PostProcessor:
    """Turns a Verdict into a moderation Decision step by step.

    Constructed once per compiled policy with validated `params`; `__call__` may add actions and
    trace entries to the Decision it is given (in place). Raising records a plugin error in the
    Decision; it never loses the verdict.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, policy: Policy) -> None:
        self.params = params
        self.policy = policy

    @classmethod
    def check(cls, params: BaseModel, policy: Policy) -> list[Check]:
        """Problems of these params against the policy (unknown categories, …)."""
        return []

    def __call__(self, decision: Decision, context: dict[str, Any]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the engine adapts to these, never to a backend's name."""

    images: bool = True
    json_schema: bool = False  # constrains decoding to the verdict schema
    scores: bool = False  # can give P(unsafe) from token logits (mode "score")
    batching: bool = False  # generate() profits from several requests at once
    max_batch_size: int = 1
    concurrent: bool = False  # overlapping generate() calls help (a remote server): the engine
    # keeps the next batch in flight while the last one's stragglers finish


@dataclass
class Request:
    """One image to judge against one compiled policy."""

    image: LoadedImage
    compiled: CompiledPolicy
    mode: Mode = "full"
    metadata: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None  # None: the policy's budget
    decode_seconds: float = 0.0  # time spent decoding the image, reported in the verdict


@dataclass
class Generation:
    """A backend's raw answer to one Request (or its failure)."""

    text: str = ""
    p_unsafe: float | None = None
    category_scores: dict[str, float] | None = None
    model: str | None = None
    error: str | None = None  # a per-item failure: becomes an error verdict
    retryable: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class Backend:
    """An inference backend: cheap construction (validate options), heavy `load()`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoParams
    capabilities: Capabilities = Capabilities()  # per class; an instance may refine it
    install_hint: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options.model_validate(options)
        except ValidationError as err:
            raise PolicyEngineError(f"backend {self.name!r}: {one_line(err)}") from None
        self.loaded = False

    def load(self) -> None:
        """Import heavy libraries, load weights, open connections. The engine calls it once."""

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Answer each request, in order. A per-item failure is a Generation with `error`."""
        raise NotImplementedError

    def health(self) -> str | None:
        """After `load()`: None when the backend can answer now, else one line saying why not
        (a server that stopped answering). Cheap enough to probe every few seconds; `serve`
        caches it for `/readyz`. In-process backends keep the default: always healthy."""
        return None

    async def agenerate(self, requests: Sequence[Request]) -> list[Generation]:
        """Async twin; the default runs `generate` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.generate, requests)

    def close(self) -> None:
        """Release resources."""
