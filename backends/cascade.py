"""The `cascade` backend: a cheap first judge decides the clear cases, a second judge the rest.

The first judge gives P(Unsafe) for every image (typically a small model in score mode, or
any backend that scores). An image whose score is outside the declared band is decided there:
below the band Safe, above it Unsafe (and only if the first judge's own rating agrees). The
images inside the band (bounds included), and those the first judge failed on or gave no
score for, go to the second judge (full mode with a rationale, a larger model, a remote
server), in one batch. The verdict records every judge consulted and which one decided, and why
(`judges`, `decided_by`). Never a silent Safe: a failed first judge sends the image on (or is
the image's error, with `on_first_error: error`); a failed second judge is the image's error.

    policy-engine assess *.jpg -b cascade \\
        -o 'first={backend: transformers, mode: score, options: {model: small}}' \\
        -o 'second={backend: sglang, options: {url: "http://gpu:30000"}}' -o band=[0.1,0.9]

Details: docs/judges.md.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, field_validator

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Generation,
    JudgeVerdict,
    PluginHost,
    PolicyEngineError,
    Register,
    Verdict,
    hookimpl,
)

from .judges import CompositeBackend, CompositeOptions, JudgeSpec, answer, band_text, build_judge


class CascadeOptions(CompositeOptions):
    first: JudgeSpec = Field(description="The cheap judge: it must give P(Unsafe).")
    second: JudgeSpec = Field(description="The judge of the images inside the band.")
    band: tuple[float, float] = Field(
        default=(0.2, 0.8), description="[low, high]: the first judge decides outside it."
    )
    on_first_error: Literal["second", "error"] = Field(
        default="second", description="A first judge's error: ask the second judge, or error."
    )

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        low, high = band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("band is [low, high] with 0 <= low <= high <= 1")
        return band


class CascadeBackend(CompositeBackend):
    name = "cascade"
    description = "A cheap first judge decides clear cases, a second judge the uncertain ones"
    Options = CascadeOptions
    capabilities = Capabilities(images=True, batching=True, max_batch_size=64)
    options: CascadeOptions

    def __init__(self, *, host: PluginHost | None = None, **options: Any) -> None:
        super().__init__(host=host, **options)
        opts = self.options
        self.first = build_judge(opts.first.name or "first", opts.first, self.host)
        self.second = build_judge(opts.second.name or "second", opts.second, self.host)
        if self.first.name == self.second.name:
            raise PolicyEngineError(f"the cascade's two judges are both named {self.first.name!r}")
        self.judges = [self.first, self.second]
        self.derive_capabilities()

    def generate(self, batch: Batch) -> list[Generation]:
        low, high = self.options.band
        band = band_text(low, high)
        first, second = self.first, self.second
        started = time.perf_counter()
        firsts = first.run(batch, batch.images)
        first_share = (time.perf_counter() - started) / max(1, len(batch))
        answers: list[Generation | None] = [None] * len(batch)
        pending: list[tuple[int, str]] = []  # (index, why it goes to the second judge)
        for index, (_, verdict) in enumerate(firsts):
            timings = {f"judge:{first.name}": first_share}
            p = verdict.p_unsafe
            if verdict.error is not None:
                why = f"{first.name} failed ({verdict.error.message})"
                if self.options.on_first_error == "error":
                    answers[index] = Generation(
                        error=f"first judge {first.name!r} failed: {verdict.error.message}",
                        retryable=verdict.error.retryable,
                        model=verdict.model,
                        judges=[first.verdict(verdict, batch)],
                        timings=timings,
                    )
                    continue
                pending.append((index, why))
            elif p is None:
                pending.append((index, f"{first.name} gave no p_unsafe"))
            elif (p < low and verdict.rating == "Safe") or (
                p > high and verdict.rating == "Unsafe"
            ):
                side = "below" if p < low else "above"
                reason = f"{first.name}: p_unsafe {p:.3f} {side} band {band}"
                decider = first.verdict(verdict, batch, decided=True)
                answers[index] = self._decided(batch, decider, verdict, reason, [], timings)
            elif low <= p <= high:
                pending.append((index, f"{first.name}'s p_unsafe {p:.3f} inside band {band}"))
            else:
                pending.append(
                    (
                        index,
                        f"{first.name}'s rating {verdict.rating} disagrees with p_unsafe {p:.3f}",
                    )
                )
        if pending:
            images = [batch.images[i] for i, _ in pending]
            started = time.perf_counter()
            seconds = second.run(batch, images)
            second_share = (time.perf_counter() - started) / len(images)
            for (index, why), (generation, verdict) in zip(pending, seconds, strict=True):
                earlier = first.verdict(firsts[index][1], batch)
                timings = {
                    f"judge:{first.name}": first_share,
                    f"judge:{second.name}": second_share,
                }
                if verdict.error is not None:
                    answers[index] = Generation(
                        text=generation.text,
                        error=f"second judge {second.name!r} failed: {verdict.error.message}",
                        retryable=verdict.error.retryable,
                        model=verdict.model,
                        judges=[earlier, second.verdict(verdict, batch)],
                        timings=timings,
                    )
                    continue
                reason = f"{second.name}, because {why}"
                answers[index] = self._decided(
                    batch,
                    second.verdict(verdict, batch, decided=True),
                    verdict,
                    reason,
                    [earlier],
                    timings,
                )
        return [a if a is not None else Generation(error="cascade: no answer") for a in answers]

    def _decided(
        self,
        batch: Batch,
        decider: JudgeVerdict,
        verdict: Verdict,
        reason: str,
        before: list[JudgeVerdict],
        timings: dict[str, float],
    ) -> Generation:
        return answer(
            batch,
            verdict,
            rationale=verdict.rationale or f"Decided by {reason} (no rationale).",
            judges=[*before, decider],
            decided_by=reason,
            p_unsafe=verdict.p_unsafe,
            category_scores=verdict.category_scores,
            model=verdict.model,
            decoding=verdict.decoding,
            timings=timings,
        )


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(CascadeBackend)
