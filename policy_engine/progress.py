"""One progress line for every command that judges many images (assess, audit, eval, test).

A tqdm bar on stderr, updated per item: done/total, percentage, rate, ETA, and running counts
(Safe, Unsafe, errors, the commonest categories). Off by default unless stderr is a terminal;
when off, counts are still kept. The total may be unknown at first and set later (an audit
counts its source in the background).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .verdict import Decision


class Progress:
    """`with Progress(total, enabled=...) as bar: bar.update(decision)`."""

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool,
        description: str = "",
        stream: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        self.enabled = enabled
        self.ratings: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.errors = 0
        self.done = 0
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=description or None,
                unit="img",
                file=stream or sys.stderr,
                dynamic_ncols=True,
                mininterval=0.2,
                leave=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_total(self, total: int | None) -> None:
        if self._bar is not None and total is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, decision: Decision | None = None, count: int = 1) -> None:
        """One item (or `count`) done; with its Decision, the counts follow it."""
        self.done += count
        if decision is not None:
            if decision.verdict.ok:
                self.ratings[decision.rating or "?"] += 1
                if decision.rating == "Unsafe" and decision.category_id:
                    self.categories[decision.category_id] += 1
            else:
                self.errors += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self.summary(), refresh=False)
            self._bar.update(count)

    def summary(self) -> str:
        """'Safe 12 Unsafe 3 errors 1 | O2:2 O7:1'."""
        counts = " ".join(f"{k} {v:,}" for k, v in sorted(self.ratings.items()))
        if self.errors:
            counts = f"{counts} errors {self.errors:,}".strip()
        top = " ".join(f"{k}:{v:,}" for k, v in self.categories.most_common(5))
        return " | ".join(part for part in (counts, top) if part)

    def note(self, message: str) -> None:
        """A line above the bar (a bar that is off prints nothing)."""
        if self._bar is not None:
            self._bar.write(message, file=self._bar.fp)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def wanted(flag: bool | None, stream: TextIO | None = None) -> bool:
    """--progress / --no-progress, or (unset) whether stderr is a terminal."""
    if flag is not None:
        return flag
    return (stream or sys.stderr).isatty()
