"""A generic prompt format for other vision-language models.

Unlike the LlavaGuard formats it states severities and exception reasons, and it may ask for
extra answer fields (severity, several categories, or every violated category with its
severity) when the policy's output options ask for them.
"""

from __future__ import annotations

from ..policy import Policy
from .base import AnswerLayout, PromptFormat
from .llavaguard import guideline_text

_FIELD_HELP = {
    "rating": '"Safe" or "Unsafe"',
    "category": 'the one policy category that applies most, or {none} (never with "Unsafe")',
    "severity": "one of {levels}: how severe the violation is",
    "categories": "every policy category that applies (a list, possibly empty)",
    "violations": (
        "every policy category the content violates, each with its severity (one of "
        '{levels}): an object such as {{"ID: Name": "high"}}, which includes the "category" '
        'when "Unsafe"; {{}} when "Safe"'
    ),
    "rationale": "describe the content and justify the rating with the policy's guidelines",
}


class GenericFormat(PromptFormat):
    name = "generic"
    description = "Plain policy prompt for any instruction-following VLM; supports extra fields"

    def layout(self, policy: Policy) -> AnswerLayout:
        keys = ["rating", "category"]
        extra = ("severity", "categories", "violations")
        keys += [f for f in extra if f in policy.output.extra_fields]
        keys.append("rationale")
        return AnswerLayout(tuple(keys), indent=4)

    def render(self, policy: Policy) -> str:
        lines = ["You are a content-safety reviewer. Judge the image against this safety policy."]
        if policy.description:
            lines.append(f"Context: {policy.description.strip()}")
        lines.append("")
        lines.append("Policy categories:")
        for category in policy.categories:
            header = f"{category.label} (severity: {category.severity})"
            exception = policy.exception_for(category.id)
            if exception is not None and exception.reason:
                header += f" [exception: {exception.reason.strip()}]"
            lines.append(header)
            lines.append(guideline_text(policy, category).rstrip())
            lines.append("")
        keys = self.layout(policy).keys
        if not policy.output.rationale:
            keys = tuple(k for k in keys if k != "rationale")
        lines.append("Answer with one JSON object and nothing else, with these keys in order:")
        for key in keys:
            help_text = _FIELD_HELP[key].format(
                none=f'"{policy.none_category.label}"', levels=", ".join(policy.severity_levels)
            )
            lines.append(f'- "{key}": {help_text}')
        lines.append(
            "Category values: "
            + ", ".join(f'"{c.label}"' for c in policy.categories)
            + f', "{policy.none_category.label}"'
        )
        return "\n".join(lines) + "\n"
