"""A Decision on screen: the summary first (rating, category, severity, P(unsafe), actions),
pinned above the details (model, metadata, rationale, rule trace), which scroll. A long
rationale never pushes what the policy decided off an 80x24 screen.

Final values (`decision.rating`, `category_id`, `severity`) are shown; when a post-processor
overrode the model, what the model said follows in muted text.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Static

from policy_engine import Decision

Parts = list[str | tuple[str, str]]


def render_summary(decision: Decision) -> Content:
    """What the policy decided: the final rating, category, severity, P(unsafe), actions."""
    verdict = decision.verdict
    parts: Parts = []
    if verdict.error is not None:
        parts += [
            ("Error", "bold $text-error"),
            f" ({verdict.error.kind}): {verdict.error.message}",
        ]
    else:
        style = "bold $text-error" if decision.rating == "Unsafe" else "bold $text-success"
        parts.append((decision.rating or "?", style))
        if decision.category_id:  # none in mode score without category scores
            parts.append(f"  {decision.category_id}: {decision.category_name}")
        if decision.severity:
            parts.append(f"  severity {decision.severity}")
        if decision.overrides:
            said = f"{verdict.rating} {verdict.category_id or ''}".rstrip()
            parts.append((f"  (the model said {said})", "$text-muted"))
    if verdict.p_unsafe is not None:
        parts.append(f"  P(unsafe) {verdict.p_unsafe:.3f}")
    parts.append(("\nActions", "bold"))
    for action in decision.actions:
        params = " ".join(_pairs(action.params))
        parts += ["\n  ", (action.name, "bold"), f" {params}" if params else ""]
        parts.append((f"  (by {action.by})", "$text-muted"))
    if not decision.actions:
        parts.append(("\n  none", "$text-muted"))
    return Content.assemble(*parts)


def render_details(decision: Decision) -> Content:
    """Why: the model (a random-weights model in warning colours), the request metadata, the
    rationale and the post-processors' trace."""
    verdict = decision.verdict
    parts: Parts = []
    if verdict.model:
        random = "random weights" in verdict.model
        parts += [
            ("model ", "$text-muted"),
            (verdict.model, "bold $text-warning" if random else ""),
        ]
        if random:
            parts.append((": its verdicts are meaningless", "$text-warning"))
        parts.append("\n")
    if decision.metadata:
        parts += [("metadata ", "$text-muted"), " ".join(_pairs(decision.metadata)), "\n"]
    if verdict.rationale:
        parts += [("rationale ", "$text-muted"), verdict.rationale, "\n"]
    parts.append(("Trace", "bold"))
    for entry in decision.trace:
        parts += ["\n  ", (f"{entry.step}: ", "$text-muted")]
        parts.append((entry.message, "$text-error") if entry.error else entry.message)
    if not decision.trace:
        parts.append(("\n  none", "$text-muted"))
    return Content.assemble(*parts)


def render_decision(decision: Decision) -> Content:
    """A Decision as one readable text: the summary, then the details."""
    return Content.assemble(render_summary(decision), "\n", render_details(decision))


def _pairs(values: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


class DecisionView(Vertical):
    """The summary (`#decision-summary`, always in view) over the scrolling details
    (`#decision-details`)."""

    DEFAULT_CSS = """
    DecisionView { height: 1fr; }
    DecisionView #decision-summary { height: auto; max-height: 50%; padding: 0 1; }
    DecisionView #decision-scroll { height: 1fr; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield Static("", id="decision-summary")
        with VerticalScroll(id="decision-scroll"):
            yield Static("", id="decision-details")

    def show(self, decision: Decision | None) -> None:
        summary = self.query_one("#decision-summary", Static)
        details = self.query_one("#decision-details", Static)
        if decision is None:
            summary.update("")
            details.update("")
            return
        summary.update(render_summary(decision))
        details.update(render_details(decision))
        self.query_one("#decision-scroll", VerticalScroll).scroll_home(animate=False)

    @property
    def text(self) -> str:
        """Everything shown, as plain text (summary, a newline, details; empty when blank)."""
        summary = str(self.query_one("#decision-summary", Static).render())
        details = str(self.query_one("#decision-details", Static).render())
        return f"{summary}\n{details}" if summary or details else ""
