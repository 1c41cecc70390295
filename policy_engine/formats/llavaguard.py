"""The LlavaGuard prompt formats: byte for byte what the public checkpoints were trained on.

Golden files: ../shared/reference/llavaguard/prompt_v1.2.txt, prompt_v1.0.txt and
policy_exception_texts_v2.txt (tests compare bytes).
"""

from __future__ import annotations

from ..policy import Category, ExceptionStatus, Policy
from ..types import Check
from .base import AnswerLayout, PromptFormat

PREAMBLE = (
    "Provide a safety assessment for the content provided by the user. Determine compliance or "
    "violation against our safety policy by reviewing the following policy categories:\n"
)
_STEP_1 = (
    '1. Select a safety "rating". This should be "Unsafe" if the content violates the safety '
    'policy; otherwise, it should be "Safe".\n'
)
_STEP_3_V12 = (
    '3. Provide a "rationale". Describe the user content and justify why it is considered safe or '
    "unsafe, referring to the specific policy category and its associated guidelines to "
    "illustrate any violations or compliance.\n"
)
_STEP_3_V10 = (
    '3. Provide a "rationale". Explain the reason why the content is considered safe or unsafe, '
    "referring to the description of the assigned policy category.\n"
)
_DECLARED = {
    ExceptionStatus.NON_VIOLATING: (
        "Category {id} is declared as non-violating. Therefore, we do not provide any "
        "restrictions for this category and allow any content of this category e.g.\n"
    ),
    ExceptionStatus.SENSITIVE: (
        "Category {id} is declared as sensitive. Therefore, we do not permit any content related "
        "to this category e.g.\n"
    ),
}


def guideline_text(policy: Policy, category: Category) -> str:
    """The body of one category block: its guidelines, or its exception declaration."""
    exception = policy.exception_for(category.id)
    if exception is not None:
        bullets = "".join(f" - {item}\n" for item in category.examples)
        return _DECLARED[exception.status].format(id=category.id) + bullets + " "
    text = ""
    if category.should_not:
        text += "Should not:\n" + "".join(f"- {item}\n" for item in category.should_not)
    if category.can:
        text += "Can:\n" + "".join(f"- {item}\n" for item in category.can)
    return text


class _LlavaGuardFormat(PromptFormat):
    blank_line_between_blocks = True
    step_3 = _STEP_3_V12

    def check(self, policy: Policy) -> list[Check]:
        if policy.output.extra_fields:
            return [
                (
                    ("output", "extra_fields"),
                    f"prompt format {self.name!r} cannot ask for extra fields: the LlavaGuard "
                    "weights were never trained on them; use prompt_format: generic",
                )
            ]
        return []

    def category_block(self, policy: Policy, category: Category) -> str:
        body = guideline_text(policy, category)
        exception = policy.exception_for(category.id) is not None
        separator = "\n" if (self.blank_line_between_blocks or exception) else ""
        return f"{category.label}: \n{body}{separator}"

    def render(self, policy: Policy) -> str:
        labels = [c.label for c in policy.categories] + [policy.none_category.label]
        template = "|".join(f'"{label}"' for label in labels)
        return (
            PREAMBLE
            + "".join(self.category_block(policy, c) for c in policy.categories)
            + "Assessment Steps:\n"
            + _STEP_1
            + '2. Assign a policy "category". If none of the policy categories are applicable, '
            f'select "{policy.none_category.label}".\n'
            + self.step_3
            + "To provide your assessment use the following json template:\n"
            + "{\n"
            + '    "rating": str<"Unsafe"|"Safe">,\n'
            + f'    "category": str<{template}>,\n'
            + '    "rationale": str,\n'
            + "}\n"
        )

    def layout(self, policy: Policy) -> AnswerLayout:
        return AnswerLayout(("rating", "category", "rationale"), indent=4)


class LlavaGuardV12(_LlavaGuardFormat):
    """LlavaGuard v1.1 / v1.2 checkpoints (OneVision, QwenGuard)."""

    name = "llavaguard-v1.2"
    description = "LlavaGuard v1.1/v1.2 and QwenGuard prompt, byte for byte"


class LlavaGuardV10(_LlavaGuardFormat):
    """LlavaGuard v1.0 checkpoints: no blank line between blocks, older step 3 wording."""

    name = "llavaguard-v1.0"
    description = "LlavaGuard v1.0 prompt, byte for byte"
    blank_line_between_blocks = False
    step_3 = _STEP_3_V10
