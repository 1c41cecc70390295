"""The `ensemble` backend: N judges answer every image, a declared rule combines them.

Judges are any registered backends (different checkpoints, different servers, or the same
model asked with different policies or modes). Rules:

- `majority`: Unsafe when at least half of the judges say Unsafe (a tie is Unsafe);
- `any_unsafe`: Unsafe when any judge says Unsafe;
- `mean`: Unsafe when the (weighted) mean of the judges' p_unsafe is >= `threshold`;
- `weighted`: Unsafe when the weight share of the judges saying Unsafe is >= `threshold`.

The rule's score (the Unsafe share of the votes, or the mean p_unsafe) is the verdict's
p_unsafe, so score mode rates by it too. Every judge's answer is kept in the verdict
(`judges`), with the rule's reason (`decided_by`).

Errors (`errors`): by default (`error`) a failed judge makes the image an error, unless the
outcome is Unsafe whatever that judge would have said (`any_unsafe` with an Unsafe from a
working judge, or an Unsafe majority the failed judges cannot overturn): never a Safe that a
failed judge might have contradicted. `robust` also decides a Safe that the failed judges cannot
overturn. `ignore` applies the rule to the judges that answered (an error only if none did). A
judge without p_unsafe counts as failed for `mean`. Details: docs/judges.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Generation,
    PluginHost,
    Register,
    Verdict,
    hookimpl,
)

from .judges import (
    CompositeBackend,
    CompositeOptions,
    Judge,
    JudgeSpec,
    answer,
    build_judge,
    judge_names,
)

Rule = Literal["majority", "any_unsafe", "mean", "weighted"]


class EnsembleJudge(JudgeSpec):
    weight: float = Field(default=1.0, gt=0.0, description="Its weight (rules mean, weighted).")


class EnsembleOptions(CompositeOptions):
    judges: list[EnsembleJudge] = Field(min_length=2, description="Two or more judges.")
    rule: Rule = "majority"
    threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Rules mean and weighted: Unsafe at >= this."
    )
    errors: Literal["error", "robust", "ignore"] = Field(
        default="error",
        description="error: a failed judge is the image's error unless the outcome is Unsafe "
        "whatever it says; robust: unless the outcome holds whatever it says; ignore: the rule "
        "over the judges that answered.",
    )


class _Vote:
    __slots__ = ("p", "unsafe", "weight")

    def __init__(self, weight: float, unsafe: bool, p: float) -> None:
        self.weight, self.unsafe, self.p = weight, unsafe, p


def rule_score(rule: Rule, votes: Sequence[_Vote]) -> float:
    """The rule's score over votes: an Unsafe share, or a (weighted) mean p_unsafe."""
    if rule == "any_unsafe":
        return 1.0 if any(v.unsafe for v in votes) else 0.0
    if rule == "majority":
        return sum(v.unsafe for v in votes) / len(votes)
    total = sum(v.weight for v in votes)
    if rule == "weighted":
        return sum(v.weight for v in votes if v.unsafe) / total
    return sum(v.weight * v.p for v in votes) / total


class EnsembleBackend(CompositeBackend):
    name = "ensemble"
    description = "Several judges on every image, combined by a declared rule"
    Options = EnsembleOptions
    capabilities = Capabilities(images=True, batching=True, max_batch_size=64)
    options: EnsembleOptions

    def __init__(self, *, host: PluginHost | None = None, **options: Any) -> None:
        super().__init__(host=host, **options)
        specs = self.options.judges
        names = judge_names(specs, [s.backend for s in specs])
        self.judges = [build_judge(n, s, self.host) for n, s in zip(names, specs, strict=True)]
        self.weights = [s.weight for s in specs]
        self.derive_capabilities()

    @property
    def cut(self) -> float:
        return self.options.threshold if self.options.rule in ("mean", "weighted") else 0.5

    def generate(self, batch: Batch) -> list[Generation]:
        def timed(judge: Judge) -> tuple[list[tuple[Generation, Verdict]], float]:
            started = time.perf_counter()
            results = judge.run(batch, batch.images)
            return results, (time.perf_counter() - started) / max(1, len(batch))

        if self.capabilities.concurrent:
            with ThreadPoolExecutor(len(self.judges)) as pool:
                runs = list(pool.map(timed, self.judges))
        else:
            runs = [timed(judge) for judge in self.judges]
        timings = {
            f"judge:{j.name}": share for j, (_, share) in zip(self.judges, runs, strict=True)
        }
        return [
            self._combine(batch, [run[index][1] for run, _ in runs], timings)
            for index in range(len(batch))
        ]

    def _combine(
        self, batch: Batch, verdicts: list[Verdict], timings: dict[str, float]
    ) -> Generation:
        opts = self.options
        rule, cut = opts.rule, self.cut
        working: list[tuple[int, _Vote]] = []
        unknown: list[int] = []
        for index, verdict in enumerate(verdicts):
            if verdict.error is not None or (rule == "mean" and verdict.p_unsafe is None):
                unknown.append(index)
                continue
            p = verdict.p_unsafe if verdict.p_unsafe is not None else 0.0
            working.append((index, _Vote(self.weights[index], verdict.unsafe, p)))
        failed = [self.judges[i].name for i in unknown]
        votes = [v for _, v in working]
        model = "ensemble(" + ", ".join(dict.fromkeys(str(v.model) for v in verdicts)) + ")"
        decoding: dict[str, Any] = {"method": "ensemble", "rule": rule}  # judges': in `judges`
        note = ""
        if unknown and opts.errors in ("error", "robust"):
            lo = rule_score(rule, [*votes, *(_Vote(self.weights[i], False, 0.0) for i in unknown)])
            hi = rule_score(rule, [*votes, *(_Vote(self.weights[i], True, 1.0) for i in unknown)])
            holds = lo >= cut if opts.errors == "error" else (lo >= cut) == (hi >= cut)
            if not holds:
                return self._error(
                    batch,
                    verdicts,
                    f"ensemble {rule}: judge(s) {', '.join(failed)} failed and could change "
                    f"the outcome ({self._why(verdicts, unknown)})",
                    model,
                    timings,
                )
            note = f"; {', '.join(failed)} failed, the outcome holds whatever they say"
        elif unknown:
            note = f"; ignoring {', '.join(failed)} (failed)"
        if not votes:
            return self._error(
                batch,
                verdicts,
                f"ensemble {rule}: no judge answered ({self._why(verdicts, unknown)})",
                model,
                timings,
            )
        score = rule_score(rule, votes)
        outcome = "Unsafe" if score >= cut else "Safe"
        reason = self._reason(rule, votes, score, cut) + note
        agreeing = [i for i, v in working if v.unsafe == (outcome == "Unsafe")]
        judges = [
            j.verdict(v, batch, decided=i in agreeing)
            for i, (j, v) in enumerate(zip(self.judges, verdicts, strict=True))
        ]
        representative = self._representative(batch, verdicts, working, outcome)
        rationale = representative.rationale if representative.rating == outcome else None
        return answer(
            batch,
            representative.model_copy(update={"rating": outcome}),
            rationale=rationale or f"Decided by {reason}.",
            judges=judges,
            decided_by=reason,
            p_unsafe=score,
            category_scores=_mean_scores([verdicts[i].category_scores for i, _ in working]),
            model=model,
            decoding=decoding,
            timings=timings,
        )

    def _representative(
        self, batch: Batch, verdicts: list[Verdict], working: list[tuple[int, _Vote]], outcome: str
    ) -> Verdict:
        """The judge answer the combined one is written from: for Unsafe, the first judge naming
        the category with most weight among the Unsafe judges (of the batch's policy); for Safe,
        the first Safe judge; else the first working judge (its rating is then overridden)."""
        policy = batch.compiled.policy
        if outcome == "Unsafe":
            weight: dict[str, float] = {}
            for index, vote in working:
                category = verdicts[index].category_id
                if vote.unsafe and category is not None and category != policy.none_category.id:
                    weight[category] = weight.get(category, 0.0) + vote.weight
            order = [c.id for c in policy.categories]
            known = [c for c in weight if c in order]
            if known:
                best = max(known, key=lambda c: (weight[c], -order.index(c)))
                return next(verdicts[i] for i, _ in working if verdicts[i].category_id == best)
            for index, vote in working:
                if vote.unsafe:
                    return verdicts[index]
        else:
            for index, vote in working:
                if not vote.unsafe:
                    return verdicts[index]
        return verdicts[working[0][0]]

    def _reason(self, rule: Rule, votes: Sequence[_Vote], score: float, cut: float) -> str:
        unsafe = sum(v.unsafe for v in votes)
        if rule == "mean":
            side = ">=" if score >= cut else "<"
            return f"ensemble mean: p_unsafe {score:.3f} {side} {cut:g} over {len(votes)} judges"
        if rule == "weighted":
            side = ">=" if score >= cut else "<"
            return f"ensemble weighted: Unsafe weight share {score:.3f} {side} {cut:g}"
        return f"ensemble {rule.replace('_', ' ')}: {unsafe} of {len(votes)} judges Unsafe"

    def _why(self, verdicts: list[Verdict], unknown: list[int]) -> str:
        parts = []
        for index in unknown:
            error = verdicts[index].error
            parts.append(f"{self.judges[index].name}: {error.message if error else 'no p_unsafe'}")
        return "; ".join(parts)

    def _error(
        self,
        batch: Batch,
        verdicts: list[Verdict],
        message: str,
        model: str,
        timings: dict[str, float],
    ) -> Generation:
        retryable = any(v.error is not None and v.error.retryable for v in verdicts)
        return Generation(
            error=message,
            retryable=retryable,
            model=model,
            judges=[j.verdict(v, batch) for j, v in zip(self.judges, verdicts, strict=True)],
            timings=timings,
        )


def _mean_scores(all_scores: list[dict[str, float] | None]) -> dict[str, float] | None:
    present = [s for s in all_scores if s]
    if not present:
        return None
    keys = dict.fromkeys(k for s in present for k in s)
    return {k: sum(s.get(k, 0.0) for s in present) / len(present) for k in keys}


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(EnsembleBackend)
