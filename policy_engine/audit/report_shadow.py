"""The report's comparison of shadow and live decisions (docs/shadow.md): per step or policy
that ran in shadow, how many rows it agreed with the live decision on (same final rating, same
set of actions), how the ratings moved, and the rows where it differed (the first
`SHADOW_EXAMPLES` of each, in input order).

`ShadowComparison.add(row)` reads one results row (its Decision keeps `shadow`); `to_dict` is
the JSON form, `text_lines` and `html_section` the rendered forms. Only the standard library
and policy_engine are imported here.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .report_data import percent
from .store import ResultRow

__all__ = ["SHADOW_EXAMPLES", "ShadowComparison", "ShadowDifference", "ShadowSource"]

SHADOW_EXAMPLES = 50
"""Rows where shadow and live differ kept per shadow source."""


@dataclass(frozen=True)
class ShadowDifference:
    """One row where the shadow's decision is not the live one."""

    id: str
    source: str
    live_rating: str | None
    live_actions: tuple[str, ...]
    shadow_rating: str | None
    shadow_actions: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "live": {"rating": self.live_rating, "actions": list(self.live_actions)},
            "shadow": {"rating": self.shadow_rating, "actions": list(self.shadow_actions)},
        }


@dataclass
class ShadowSource:
    """One step or policy that ran in shadow, compared with the live decisions."""

    kind: str
    source: str
    policy_hash: str | None = None
    compared: int = 0
    agree: int = 0
    live_flagged: int = 0
    shadow_flagged: int = 0
    ratings: Counter[str] = field(default_factory=Counter)  # "LIVE -> SHADOW" when they differ
    differences: list[ShadowDifference] = field(default_factory=list)

    @property
    def label(self) -> str:
        """`step ID`, or `policy ID HASH` (shortened): a resumed audit may have run two
        versions of a shadow policy, compared apart."""
        short = f" {self.policy_hash[:19]}" if self.policy_hash else ""
        return f"{self.kind} {self.source}{short}"

    @property
    def differ(self) -> int:
        return self.compared - self.agree

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "policy_hash": self.policy_hash,
            "compared": self.compared,
            "agree": self.agree,
            "differ": self.differ,
            "live_flagged": self.live_flagged,
            "shadow_flagged": self.shadow_flagged,
            "rating_changes": dict(self.ratings),
            "differences": [d.to_dict() for d in self.differences],
        }


def _flagged(rating: object, actions: tuple[str, ...]) -> bool:
    """The service's `flagged`: Unsafe, or any action but allow."""
    return rating == "Unsafe" or any(a != "allow" for a in actions)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _names(actions: object) -> tuple[str, ...]:
    if not isinstance(actions, list):
        return ()
    return tuple(str(a.get("name")) for a in actions if isinstance(a, dict))


@dataclass
class ShadowComparison:
    """Shadow vs live over a results file, per shadow source (in order of appearance)."""

    examples: int = SHADOW_EXAMPLES
    rows: int = 0  # rows that carry a shadow result
    sources: dict[str, ShadowSource] = field(default_factory=dict)

    def add(self, row: ResultRow) -> None:
        results = row.decision.get("shadow")
        if not isinstance(results, list) or not results:
            return
        self.rows += 1
        live_actions = tuple(row.actions)
        for result in results:
            if not isinstance(result, dict):
                continue
            kind, name = str(result.get("kind")), str(result.get("source"))
            digest = result.get("policy_hash")
            key = f"{kind}:{name}:{digest}"
            entry = self.sources.get(key)
            if entry is None:
                entry = self.sources[key] = ShadowSource(kind, name, _str_or_none(digest))
            rating = result.get("rating")
            actions = _names(result.get("actions"))
            entry.compared += 1
            entry.live_flagged += _flagged(row.rating, live_actions)
            entry.shadow_flagged += _flagged(rating, actions)
            if rating == row.rating and set(actions) == set(live_actions):
                entry.agree += 1
                continue
            if rating != row.rating:
                entry.ratings[f"{row.rating or 'error'} -> {rating or 'error'}"] += 1
            if len(entry.differences) < self.examples:
                entry.differences.append(
                    ShadowDifference(
                        row.id,
                        row.source,
                        row.rating,
                        live_actions,
                        None if rating is None else str(rating),
                        actions,
                    )
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "examples_per_source": self.examples,
            "sources": [s.to_dict() for s in self.sources.values()],
        }

    def text_lines(self, clean: Any = str) -> list[str]:
        """The text report's section (`clean` makes data safe for a terminal line)."""
        if not self.sources:
            return []
        lines = [f"Shadow vs live ({self.rows} rows with a shadow result; never enforced)"]
        for s in self.sources.values():
            lines.append(
                f"  {clean(s.label)}: {s.compared} compared, {s.agree} agree "
                f"({percent(s.agree, s.compared)}), {s.differ} differ; flagged live "
                f"{s.live_flagged}, shadow {s.shadow_flagged}"
            )
            for change, count in s.ratings.most_common():
                lines.append(f"    rating {clean(change)}: {count}")
            if s.differences:
                lines.append(
                    "    differences (id: live rating [actions] => shadow rating [actions])"
                )
            for d in s.differences:
                live = f"{d.live_rating or 'error'} [{', '.join(d.live_actions)}]"
                shadow = f"{d.shadow_rating or 'error'} [{', '.join(d.shadow_actions)}]"
                lines.append(f"    {clean(d.id)}: {clean(live)} => {clean(shadow)}")
            if s.differ > len(s.differences):
                lines.append(f"    ... {s.differ - len(s.differences)} more")
        return [*lines, ""]

    def html_section(self) -> str:
        """The HTML report's section (empty when no row ran anything in shadow)."""
        if not self.sources:
            return ""
        parts = [
            '<section id="shadow"><h2>Shadow vs live</h2>',
            f"<p>{self.rows} rows carry a shadow result: what a step or policy in shadow "
            "would have decided. It was recorded, never enforced; agreement means the same "
            "final rating and the same actions.</p>",
        ]
        for s in self.sources.values():
            changes = ", ".join(f"{_e(k)}: {v}" for k, v in s.ratings.most_common())
            parts.append(
                f"<h3>{_e(s.label)}</h3>"
                + (f"<p><code>{_e(s.policy_hash)}</code></p>" if s.policy_hash else "")
                + f"<p>{s.compared} compared, {s.agree} agree "
                f"({percent(s.agree, s.compared)}), {s.differ} differ; flagged live "
                f"{s.live_flagged}, shadow {s.shadow_flagged}"
                + (f"; ratings {changes}" if changes else "")
                + "</p>"
            )
            if not s.differences:
                continue
            rows = "".join(
                f"<tr><td><code>{_e(d.id)}</code></td><td>{_e(d.live_rating or 'error')}</td>"
                f"<td>{_actions(d.live_actions)}</td>"
                f"<td>{_e(d.shadow_rating or 'error')}</td>"
                f"<td>{_actions(d.shadow_actions)}</td></tr>"
                for d in s.differences
            )
            more = s.differ - len(s.differences)
            parts.append(
                "<table><thead><tr><th>Row</th><th>Live rating</th><th>Live actions</th>"
                "<th>Shadow rating</th><th>Shadow actions</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>" + (f"<p>… {more} more</p>" if more > 0 else "")
            )
        parts.append("</section>")
        return "".join(parts)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _actions(names: tuple[str, ...]) -> str:
    return _e(", ".join(names)) if names else "(none)"
