"""Request and response bodies of the HTTP service (pydantic: they are the OpenAPI document).

Every request model forbids unknown keys, like the policy file format: a typo is an error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
)

from ..aggregate import DEFAULT_MAX_POST_IMAGES
from ..verdict import Action, Decision
from .settings import MAX_BATCH_ITEMS

DATA_URL_PATTERN = "^[Dd][Aa][Tt][Aa]:"
MAX_METADATA_DEPTH = 32
EXAMPLE_IMAGE = (  # a 1x1 white PNG
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+"
    "Av4N70a4AAAAAElFTkSuQmCC"
)
ModeName = Literal["full", "verdict", "score"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ------------------------------------------------------------------------------------
class ErrorDetail(_Model):
    """What went wrong; the shape of OpenAI's errors, on every endpoint."""

    message: str = Field(description="For people: what went wrong and what to change.")
    type: str = Field(
        description="invalid_request_error (4xx), rate_limit_error (429) or server_error (5xx)."
    )
    param: str | None = Field(
        default=None, description="The request field at fault, dotted (e.g. 'items.2.image')."
    )
    code: str = Field(description="Stable machine-readable code, e.g. 'model_not_found'.")
    request_id: str | None = Field(default=None, description="The X-Request-ID of the request.")


class ErrorResponse(_Model):
    """Every error answer: `{"error": {...}}`, never a stack trace."""

    error: ErrorDetail


# -- native assessment ---------------------------------------------------------------------------
DataUrl = Annotated[str, Field(pattern=DATA_URL_PATTERN)]


def _image_kind(value: Any) -> str:
    return "<images>" if isinstance(value, list) else "<image>"


class AssessRequest(_Model):
    """One image, video or post (a list of images) to judge: one Decision."""

    # Tags in <angle brackets> are dropped from error locations (errors.validation_message).
    image: Annotated[
        Annotated[DataUrl, Tag("<image>")]
        | Annotated[
            list[DataUrl],
            Field(min_length=1, max_length=DEFAULT_MAX_POST_IMAGES),
            Tag("<images>"),
        ],
        Discriminator(_image_kind),
    ] = Field(
        description="The image as a data URL: data:image/<type>;base64,<payload>; a video as "
        "data:video/<type>;base64,<payload> (its sampled frames judged, one verdict naming the "
        "deciding frame); or a list of image data URLs, one post judged as one item (docs/"
        "video.md). Remote URLs are never fetched.",
        examples=[EXAMPLE_IMAGE],
    )
    policy: str | None = Field(
        default=None, description="A loaded policy's id (GET /v1/policies); default: the first."
    )
    mode: ModeName | None = Field(
        default=None,
        description="full: rating, category, rationale; verdict: no rationale; score: P(Unsafe) "
        "only (backends that score). Default: the service's --mode.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Request metadata for the policy's post-processors (escalation rules "
        "match on it), merged over the service's --meta defaults; echoed in the Decision.",
    )
    shadow: str | None = Field(
        default=None,
        description="A loaded policy's id to judge the image against in shadow: its result "
        "comes back in the Decision's `shadow`, never enforced. Default: the service's "
        "--shadow policy, if any.",
    )

    @field_validator("metadata")
    @classmethod
    def _shallow(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_depth(value)
        return value


class AssessUpload(_Model):
    """The multipart/form-data form of POST /v1/assess (documentation only)."""

    image: bytes = Field(
        json_schema_extra={"format": "binary"},
        description="The image or video file (PNG, JPEG, MP4, WebM, ...); several `image` "
        "parts are one post, judged as one item.",
    )
    policy: str | None = Field(default=None, description="A loaded policy's id.")
    mode: ModeName | None = Field(default=None, description="full, verdict or score.")
    metadata: str | None = Field(
        default=None, description="Request metadata as the text of a JSON object."
    )
    shadow: str | None = Field(default=None, description="A loaded policy's id, in shadow.")


class BatchAssessRequest(_Model):
    """Several images, each with its own policy, mode and metadata."""

    items: list[AssessRequest] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class AssessResponse(_Model):
    decision: Decision = Field(description="The verdict and what the policy made of it.")


class BatchAssessResponse(_Model):
    decisions: list[Decision] = Field(
        description="One Decision per item, in order; an item whose image could not be "
        "decoded or assessed has `verdict.error` set."
    )


# -- policies and health -----------------------------------------------------------------------
class CategoryInfo(_Model):
    id: str
    name: str
    severity: str


class PolicyInfo(_Model):
    id: str = Field(description="The name to use as `model` or `policy`.")
    version: str
    description: str
    prompt_format: str
    hash: str = Field(description="The compiled policy's hash: it travels with every verdict.")
    default: bool = Field(description="Used when a request names no policy.")
    categories: list[CategoryInfo]
    modes: list[ModeName] = Field(description="The modes the backend can run.")


class PolicyList(_Model):
    object: Literal["list"] = "list"
    default: str
    data: list[PolicyInfo]


class Health(_Model):
    status: Literal["ok"] = "ok"


class Readiness(_Model):
    status: Literal["ready", "loading", "warming_up", "unavailable", "failed", "stopping"] = Field(
        description="`ready`: loaded, warmed up and the backend answers its health probe; "
        "`unavailable`: loaded but the probe fails (it may recover); `failed`: loading or "
        "warm-up failed (it will not recover)."
    )
    backend: str
    error: str | None = Field(
        default=None, description="Why the service is not ready (unavailable or failed)."
    )


# -- OpenAI-compatible moderation ----------------------------------------------------------------
class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageUrl(_Model):
    # The route checks the pattern itself, to say why remote URLs are refused (400).
    url: str = Field(
        description="A data URL (data:image/png;base64,...); remote URLs are never fetched.",
        json_schema_extra={"pattern": DATA_URL_PATTERN},
    )


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageUrl


def _part_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return (
        {"text": "<text>", "image_url": "<image_url>"}.get(kind) if isinstance(kind, str) else None
    )


def _input_kind(value: Any) -> str:
    if isinstance(value, str):
        return "<string>"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "<strings>"
    return "<parts>"


# Tags in <angle brackets> are dropped from error locations (errors.validation_message).
InputPart = Annotated[
    Annotated[TextPart, Tag("<text>")] | Annotated[ImagePart, Tag("<image_url>")],
    Discriminator(
        _part_kind,
        custom_error_type="invalid_part",
        custom_error_message="must be a part: {'type': 'text', ...} or {'type': 'image_url', ...}",
    ),
]


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema with its local $defs inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# What the service accepts, for the OpenAPI document: OpenAI's other input forms (a string, a
# list of strings, parts without an image) validate here but the route answers them with 400,
# saying why; a schema-valid input is one the service judges.
_IMAGE_PART = _inline(ImagePart)
INPUT_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_BATCH_ITEMS,
    "items": {"oneOf": [_inline(TextPart), _IMAGE_PART]},
    "contains": _IMAGE_PART,
}


class ModerationRequest(_Model):
    """OpenAI's moderation request. Only images are judged: see docs/serve.md."""

    input: Annotated[
        Annotated[str, Tag("<string>")]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_ITEMS), Tag("<strings>")]
        | Annotated[
            list[InputPart], Field(min_length=1, max_length=MAX_BATCH_ITEMS), Tag("<parts>")
        ],
        Discriminator(_input_kind),
        WithJsonSchema(INPUT_SCHEMA),
    ] = Field(
        description="A list of parts (text and image_url), at least one an image: one result. "
        "Text alone (a string, a list of strings) is answered with 400: this service judges "
        "images; text parts are not judged.",
        examples=[[{"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}}]],
    )
    model: str | None = Field(
        default=None, description="A loaded policy's id; default: the service's first policy."
    )
    shadow: str | None = Field(
        default=None,
        description="policy-engine extension: a loaded policy's id judged in shadow; its "
        "answer is in `policy_engine.shadow`, never enforced.",
    )


class ImageJudgement(_Model):
    """One image's verdict inside a moderation result."""

    rating: Literal["Safe", "Unsafe"]
    category_id: str | None = None
    category_name: str | None = None
    p_unsafe: float | None = None
    actions: list[Action] = Field(default_factory=list)


class ShadowImage(_Model):
    """One image's shadow result: what the shadow decided, never enforced."""

    rating: Literal["Safe", "Unsafe"] | None = Field(
        default=None, description="None when the shadow could not judge the image."
    )
    category_id: str | None = None
    p_unsafe: float | None = None
    actions: list[Action] = Field(default_factory=list)
    error: str | None = None


class ModerationShadow(_Model):
    """What a step or policy in shadow would have answered for this input (not enforced)."""

    kind: Literal["step", "policy"]
    source: str = Field(description="The shadow step's id or the shadow policy's id.")
    flagged: bool = Field(description="Whether the shadow would have flagged the input.")
    categories: list[str] = Field(description="The category ids it would have flagged.")
    policy_id: str | None = None
    policy_version: str | None = None
    policy_hash: str | None = None
    images: list[ShadowImage] = Field(description="One per image part, in input order.")


class ModerationExtension(ImageJudgement):
    """policy-engine's own view of a result: the deciding image's verdict, every image's, and
    the policy that judged them."""

    policy_id: str
    policy_version: str
    policy_hash: str
    images: list[ImageJudgement] = Field(description="One per image part, in input order.")
    shadow: list[ModerationShadow] | None = Field(
        default=None,
        description="Steps or policies in shadow: what they would have answered. The result's "
        "flagged, categories and actions are the live policy's.",
    )


class ModerationResult(_Model):
    flagged: bool
    categories: dict[str, bool] = Field(description="Keyed by the policy's category ids.")
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["image"]]]
    policy_engine: ModerationExtension


class ModerationResponse(_Model):
    id: str = Field(description="modr-<hex>")
    model: str = Field(description="The id of the policy that judged the input.")
    results: list[ModerationResult]


def check_depth(value: Any, limit: int = MAX_METADATA_DEPTH) -> None:
    """ValueError when JSON `value` nests deeper than `limit` (cheap, iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"nested more than {limit} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
