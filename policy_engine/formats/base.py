"""The prompt-format contract: a Policy in, the prompt text and the answer layout out."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..types import Check

if TYPE_CHECKING:
    from ..policy import Policy


@dataclass(frozen=True)
class AnswerLayout:
    """How an answer is laid out: key order and JSON indentation, as the model was trained."""

    keys: tuple[str, ...] = ("rating", "category", "rationale")
    indent: int | None = 4

    def dumps(self, answer: dict[str, Any]) -> str:
        """Render an answer exactly as the layout says (keys in layout order)."""
        ordered = {key: answer[key] for key in self.keys if key in answer}
        return json.dumps(ordered, indent=self.indent, ensure_ascii=False)

    def prefix(self) -> str:
        """The answer up to the opening quote of the rating, e.g. '{\\n    "rating": "'."""
        marker = "@@answer@@"
        text = self.dumps({self.keys[0]: marker})
        return text[: text.index(marker)]

    def for_keys(self, keys: tuple[str, ...]) -> AnswerLayout:
        return AnswerLayout(tuple(k for k in self.keys if k in keys), self.indent)


class PromptFormat(ABC):
    """Turns a Policy into the prompt text and the answer layout a model expects.

    Registered as a class; the host builds one instance per compile. `render` and `layout` must
    be pure: the same policy always gives the same bytes (the compiled hash covers them).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def check(self, policy: Policy) -> list[Check]:
        """Problems that make this policy unusable with this format (located in the policy)."""
        return []

    @abstractmethod
    def render(self, policy: Policy) -> str:
        """The prompt text the model reads after the image."""

    @abstractmethod
    def layout(self, policy: Policy) -> AnswerLayout:
        """The answer's keys in trained order and its indentation."""
