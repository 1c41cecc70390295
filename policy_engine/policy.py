"""The policy file format: pydantic models, unknown keys rejected everywhere.

A `Policy` is the fully resolved form (after `extends`); `policy-engine schema` prints the JSON
Schema of `PolicyFile`, the form a file is written in, for editors.
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

DEFAULT_SEVERITY_LEVELS = ("low", "medium", "high", "critical")
BUILTIN_ACTIONS = ("allow", "block", "blur", "escalate", "flag", "human_review")
"""Actions with a meaning in the docs (docs/rules.md); others are declared under `actions:`."""
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


AudienceLevel = int | str
"""An audience level: an age (12) or a named tier ("teens")."""


class Audiences(_Strict):
    """The audience levels a policy can be compiled for (`NAME@LEVEL`, docs/policies.md)."""

    levels: list[AudienceLevel] = Field(
        min_length=1, description="The audience levels, youngest (most restricted) first."
    )
    written_for: AudienceLevel | None = Field(
        default=None,
        description="The level the policy's guidelines are written for (default: the last). "
        "At that level `NAME@LEVEL` renders the policy's own text.",
    )

    @field_validator("levels")
    @classmethod
    def _distinct(cls, value: list[AudienceLevel]) -> list[AudienceLevel]:
        names = [str(level) for level in value]
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
                raise ValueError(f"{name!r} is not a level name (letters, digits, _ . + -)")
        if len(set(names)) != len(names):
            raise ValueError("audience levels must not repeat")
        return value

    def names(self) -> str:
        return ", ".join(str(level) for level in self.levels)

    def index(self, level: AudienceLevel) -> int | None:
        """The position of a level (compared as text: `@12` names the level 12), or None."""
        names = [str(item) for item in self.levels]
        return names.index(str(level)) if str(level) in names else None

    @property
    def written_index(self) -> int:
        if self.written_for is None:
            return len(self.levels) - 1
        index = self.index(self.written_for)
        return len(self.levels) - 1 if index is None else index


class AudienceGroup(_Strict):
    """Guidelines first permitted at one audience level."""

    level: AudienceLevel = Field(description="A level of the policy's `audiences`.")
    guidelines: list[str] = Field(
        min_length=1, description="Guideline texts of the category, exactly as written."
    )


class Category(_Strict):
    """One policy category: what content of this kind should not and can show."""

    id: str = Field(description="Short identifier shown to the model, e.g. 'O4'.")
    name: str = Field(min_length=1, description="Human name, e.g. 'Nudity Content'.")
    severity: str = Field(default="medium", description="One of the policy's severity_levels.")
    should_not: list[str] = Field(
        default_factory=list, description="Guidelines: what content should not contain."
    )
    can: list[str] = Field(
        default_factory=list, description="Guidelines: what content can contain."
    )
    exception_examples: list[str] | None = Field(
        default=None,
        description=(
            "Bullets listed when an exception declares this category non-violating or "
            "sensitive. Default: should_not followed by can."
        ),
    )
    audience: list[AudienceGroup] | None = Field(
        default=None,
        description=(
            "Audience levels of guidelines: each entry names a level of the policy's "
            "`audiences` and the guidelines first permitted at that level. `NAME@LEVEL` "
            "prohibits them below it."
        ),
    )

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(
                "must start with a letter and hold only letters, digits, '_', '.', '-' "
                "(at most 32 characters)"
            )
        return value

    @property
    def label(self) -> str:
        """The label the model answers with, e.g. 'O4: Nudity Content'."""
        return f"{self.id}: {self.name}"

    def levels(self) -> dict[str, AudienceLevel]:
        """Guideline text -> the lowest audience level it is permitted for (annotated ones)."""
        return {text: group.level for group in self.audience or () for text in group.guidelines}

    @property
    def examples(self) -> list[str]:
        if self.exception_examples is not None:
            return list(self.exception_examples)
        return [*self.should_not, *self.can]


class NoneCategory(_Strict):
    """The category a model picks when none of the policy's categories applies."""

    id: str = "NA"
    name: str = "None applying"

    @property
    def label(self) -> str:
        return f"{self.id}: {self.name}"


class ExceptionStatus(StrEnum):
    NON_VIOLATING = "non-violating"
    SENSITIVE = "sensitive"


class CategoryException(_Strict):
    """A context-specific exception: a category declared non-violating or sensitive."""

    status: ExceptionStatus = Field(
        description="non-violating: allow any content of the category; sensitive: permit none."
    )
    reason: str | None = Field(default=None, description="Why this context makes the exception.")


class OutputOptions(_Strict):
    """What the model is asked to answer, and how much it may write."""

    rationale: bool = Field(default=True, description="Ask for a rationale.")
    max_new_tokens: int = Field(default=500, ge=16, le=8192, description="Token budget.")
    rationale_max_chars: int = Field(
        default=2000, ge=1, le=100_000, description="Upper bound on the rationale's length."
    )
    extra_fields: list[str] = Field(
        default_factory=list,
        description=(
            "Extra answer fields for formats that support them ('severity', 'categories', "
            "'violations': every violated category with its severity). "
            "The LlavaGuard formats support none: their weights were never trained on them."
        ),
    )

    @field_validator("extra_fields")
    @classmethod
    def _known_fields(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ("severity", "categories", "violations"):
                raise ValueError(
                    f"unknown extra field {name!r}; known: categories, severity, violations"
                )
        if len(set(value)) != len(value):
            raise ValueError("extra fields must not repeat")
        if "violations" in value and len(value) > 1:
            raise ValueError(
                "'violations' lists every violated category with its severity: it replaces "
                "'categories' and 'severity', so ask for it alone"
            )
        return value


class PostprocessStep(_Strict):
    """One post-processor in the policy's ordered chain, with its parameters."""

    name: str = Field(min_length=1, description="A registered post-processor name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its parameters.")
    id: str | None = Field(default=None, description="Optional label shown in traces.")
    shadow: bool | None = Field(
        default=None,
        description="Run in shadow: what the step would do is recorded under the Decision's "
        "`shadow`, never enforced (docs/shadow.md).",
    )

    @field_validator("shadow")
    @classmethod
    def _live_is_absent(cls, value: bool | None) -> bool | None:
        """`shadow: false` means what leaving it out means (and hashes alike)."""
        return value or None

    # (post-processor class, its validated params), set once when a host checks the policy
    _bound: tuple[type, BaseModel] | None = PrivateAttr(default=None)

    def bind(self, cls: type, params: BaseModel) -> None:
        """Remember the validated params (the loader's check), so an engine does not validate
        them again."""
        self._bound = (cls, params)

    def bound_params(self, cls: type) -> BaseModel | None:
        """The params validated for `cls` at load, or None."""
        return self._bound[1] if self._bound is not None and self._bound[0] is cls else None


class FailurePolicy(_Strict):
    """What happens to a Decision when one of its post-processors raises.

    The verdict is never lost and the error is always in the trace. `fail-closed` (the default)
    also adds an action, by default routing the item to human review; `fail-open` adds nothing,
    so the Decision carries whatever the other post-processors decided.
    """

    mode: Literal["fail-closed", "fail-open"] = "fail-closed"
    action: str = Field(default="human_review", min_length=1)
    queue: str | None = "postprocess-failures"
    priority: str | None = None


class VideoOptions(_Strict):
    """How a video's frames are sampled for judging (docs/video.md)."""

    fps: float = Field(default=1.0, gt=0, le=60, description="Frames judged per second of video.")
    max_frames: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="At most this many frames per video; a longer video is sampled more "
        "sparsely so the frames span all of it.",
    )
    scene_change: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Also judge a frame whose mean pixel difference from the last judged frame "
        "exceeds this fraction (0..1); None: sample by time only.",
    )


class AggregationOptions(_Strict):
    """How the verdicts of an item's parts (a video's frames, a post's images) become one."""

    rule: Literal["any-unsafe", "k-of-n", "max-score"] = Field(
        default="any-unsafe",
        description="any-unsafe: Unsafe when any part is; k-of-n: Unsafe when at least k parts "
        "have P(Unsafe) >= threshold; max-score: Unsafe when the highest P(Unsafe) >= threshold.",
    )
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="P(Unsafe) threshold.")
    k: int = Field(default=1, ge=1, description="Parts needed over the threshold (k-of-n).")


class GivenVerdict(_Strict):
    """The verdict a test case assumes instead of asking a model: the policy's post-processing
    is tested on it, with any backend (or none)."""

    rating: Literal["Safe", "Unsafe"]
    category: str | None = Field(
        default=None, description="A category id; default: the none-applying one."
    )
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    category_scores: dict[str, float] | None = None
    severity: str | None = Field(
        default=None, description="The model's severity; default: the category's in the policy."
    )


class PolicyTest(_Strict):
    """A test case the policy carries: an image (or a given verdict) and what the policy should
    decide for it.

    `policy-engine test POLICY` runs them; a relative image path is relative to the file that
    declares the test. Test cases are not part of the policy's meaning: they do not change its
    hash."""

    name: str | None = Field(default=None, description="What the case is about.")
    image: str | None = Field(
        default=None,
        min_length=1,
        description="An image path (relative to this file) or a data: URL, judged by the "
        "backend. Not with `given`.",
    )
    given: GivenVerdict | None = Field(
        default=None,
        description="The verdict to assume instead of judging an image: tests the "
        "post-processing chain without a model.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Request metadata, as post-processors see it."
    )
    rating: Literal["Safe", "Unsafe"] | None = Field(default=None, description="Expected rating.")
    category: str | None = Field(default=None, description="Expected category id.")
    actions: list[str] | None = Field(
        default=None, description="Expected action names, exactly (in any order); [] for none."
    )

    @model_validator(mode="after")
    def _expects_something(self) -> PolicyTest:
        if self.rating is None and self.category is None and self.actions is None:
            raise ValueError("a test needs an expectation: rating, category or actions")
        if (self.image is None) == (self.given is None):
            raise ValueError("a test needs an image to judge or a given verdict (one of them)")
        return self


class Policy(_Strict):
    """A resolved, validated policy. Build one with `policy_engine.load_policy`."""

    id: str = Field(min_length=1, description="Stable identifier, e.g. 'llavaguard'.")
    version: str = Field(default="1", description="The policy's own version.")
    description: str = Field(default="", description="What the policy is for.")
    prompt_format: str = Field(
        default="llavaguard-v1.2", description="A registered prompt format name."
    )
    severity_levels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SEVERITY_LEVELS),
        min_length=1,
        description="The severity scale, lowest first.",
    )
    categories: list[Category] = Field(min_length=1, description="The policy categories, in order.")
    none_category: NoneCategory = Field(default_factory=NoneCategory)
    exceptions: dict[str, CategoryException] = Field(
        default_factory=dict, description="Exceptions keyed by category id."
    )
    output: OutputOptions = Field(default_factory=OutputOptions)
    postprocess: list[PostprocessStep] = Field(
        default_factory=list, description="Post-processors, applied in this order."
    )
    postprocess_failure: FailurePolicy = Field(
        default_factory=FailurePolicy,
        description="What a post-processor that raises does to the Decision.",
    )
    actions: list[str] = Field(
        default_factory=list,
        description="Custom action names this policy's steps may add, besides the built-in "
        "allow, block, blur, escalate, flag, human_review. An undeclared name is an error.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata.")
    tests: list[PolicyTest] = Field(
        default_factory=list, description="Test cases for `policy-engine test`."
    )
    audiences: Audiences | None = Field(
        default=None,
        description="Audience levels this policy can be compiled for (`NAME@LEVEL`); "
        "categories give guidelines levels under `audience`.",
    )
    calibration: str | None = Field(
        default=None,
        description="A calibration file (`policy-engine calibrate`) mapping P(Unsafe), "
        "relative to this policy file; fitted for one model, prompt and mode.",
    )
    video: VideoOptions | None = Field(
        default=None, description="How videos are sampled (default: 1 frame/s, at most 32)."
    )
    aggregation: AggregationOptions | None = Field(
        default=None,
        description="How frames or a post's images make one verdict (default: any-unsafe).",
    )

    @field_validator("actions")
    @classmethod
    def _action_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
                raise ValueError(
                    f"{name!r} is not an action name (one word: letters, digits, _ . -)"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Policy:
        if info.context and info.context.get("partial"):
            return self  # the loader checks a policy with broken parts left out
        problems = self.problems()
        if problems:
            raise LocatedValueError(problems)
        return self

    def problems(self) -> list[tuple[str, str]]:
        """Every inconsistency between the policy's parts, as (dotted path, message)."""
        found: list[tuple[str, str]] = []
        seen: set[str] = set()
        for index, category in enumerate(self.categories):
            if category.id in seen:
                found.append((f"categories.{index}.id", f"duplicate category id {category.id!r}"))
            seen.add(category.id)
            if category.severity not in self.severity_levels:
                found.append(
                    (
                        f"categories.{index}.severity",
                        f"{category.severity!r} is not a severity level; "
                        f"levels: {', '.join(self.severity_levels)}",
                    )
                )
        if self.none_category.id in seen:
            found.append(("none_category.id", f"{self.none_category.id!r} is a category id"))
        for key in self.exceptions:
            if key not in seen:
                found.append(
                    (
                        f"exceptions.{key}",
                        f"unknown category {key!r}; categories: {', '.join(sorted(seen))}",
                    )
                )
        # Test cases are checked against the policy when they run (`policy-engine test`), not
        # here: a policy that extends another inherits its cases, and may remove a category
        # one of them names; that case fails, the policy still loads.
        for index, name in enumerate(self.actions):
            if name in BUILTIN_ACTIONS:
                found.append((f"actions.{index}", f"{name!r} is a built-in action: omit it"))
        failure = self.postprocess_failure.action
        if failure not in self.known_actions():
            found.append(("postprocess_failure.action", self.unknown_action(failure)))
        found += _audience_problems(self)
        return found

    def known_actions(self) -> list[str]:
        """The action names this policy's steps may add: the built-in ones and the custom
        ones it declares under `actions`."""
        return [*BUILTIN_ACTIONS, *self.actions]

    def unknown_action(self, name: str) -> str:
        """The message for an action name the policy does not know."""
        declared = f"; declared: {', '.join(self.actions)}" if self.actions else ""
        close = difflib.get_close_matches(name, self.known_actions(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"unknown action {name!r}{hint}; built-in: {', '.join(BUILTIN_ACTIONS)}{declared}; "
            "declare a custom action under `actions:`"
        )

    def category(self, category_id: str) -> Category:
        for category in self.categories:
            if category.id == category_id:
                return category
        raise KeyError(category_id)

    def exception_for(self, category_id: str) -> CategoryException | None:
        return self.exceptions.get(category_id)


def _audience_problems(policy: Policy) -> list[tuple[str, str]]:
    from .audience import audience_problems  # the audience module builds on this one

    return audience_problems(policy)


class LocatedValueError(ValueError):
    """Model-level checks that know which field each is about (mapped back to YAML lines)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems
        self.path, self.message = problems[0]


class CategoryPatch(_Strict):
    """A category entry in a file that `extends` another: override fields, add, or remove."""

    id: str
    name: str | None = None
    severity: str | None = None
    should_not: list[str] | None = None
    can: list[str] | None = None
    exception_examples: list[str] | None = None
    audience: list[AudienceGroup] | None = None
    remove: bool = Field(default=False, description="Remove the inherited category with this id.")


class ExceptionPatch(_Strict):
    status: ExceptionStatus | None = Field(
        default=None, description="non-violating, sensitive, or null to drop an inherited one."
    )
    reason: str | None = None


class PolicyFile(_Strict):
    """The file format. With `extends`, every field is optional and overlays the parent."""

    extends: str | None = Field(
        default=None, description="A shipped policy name or a path (relative to this file)."
    )
    id: str | None = None
    version: str | None = None
    description: str | None = None
    prompt_format: str | None = None
    severity_levels: list[str] | None = None
    categories: list[CategoryPatch] | None = None
    none_category: NoneCategory | None = None
    exceptions: dict[str, ExceptionPatch | None] | None = None
    output: OutputOptions | None = None
    postprocess: list[PostprocessStep] | None = None
    postprocess_failure: FailurePolicy | None = None
    actions: list[str] | None = None
    metadata: dict[str, Any] | None = None
    tests: list[PolicyTest] | None = None
    audiences: Audiences | None = None
    calibration: str | None = None
    video: VideoOptions | None = None
    aggregation: AggregationOptions | None = None
