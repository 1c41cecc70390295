"""Shadow mode: what a step or a policy would decide, recorded next to the enforced Decision.

A step marked `shadow: true` runs on a copy of the Decision, followed by the live steps after
it (so the result is the Decision the policy would make with that step live); a shadow policy
judges the same item with its own prompt and chain. Either lands in `Decision.shadow` as a
`ShadowResult`; the Decision's own rating, category and actions stay those of the live
policy's live steps. See docs/shadow.md.

A shadow policy that asks the model exactly what the live policy asks (same prompt format and
text, same answer fields and layout, same token budget) needs no second backend call: the live
answer is read again under the shadow policy (`same_request`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compiler import CompiledPolicy
from .policy import Policy
from .verdict import Decision, ShadowResult, Verdict

if TYPE_CHECKING:
    from .backend import Batch, Generation
    from .engine import Engine
    from .items import Prepared as _Prepared

__all__ = [
    "agenerate",
    "beside",
    "generate",
    "policy_result",
    "request_key",
    "restamp",
    "same_request",
    "step_result",
]


def request_key(compiled: CompiledPolicy) -> str:
    """What a backend is asked for a compiled policy (the prompt and the answer's form), as one
    string: equal keys mean equal backend requests for the same image and mode."""
    return json.dumps(
        {
            "format": compiled.prompt_format,
            "prompt": compiled.prompt,
            "fields": compiled.fields,
            "layout": [list(compiled.layout.keys), compiled.layout.indent],
            "max_new_tokens": compiled.max_new_tokens,
        },
        sort_keys=True,
        ensure_ascii=False,
    )


def same_request(live: CompiledPolicy, shadow: CompiledPolicy) -> bool:
    """Whether the backend's answer for `live` is also its answer for `shadow`."""
    return live is shadow or request_key(live) == request_key(shadow)


def restamp(verdict: Verdict, compiled: CompiledPolicy) -> Verdict:
    """`verdict` as given under another policy (a verdict with no backend answer behind it:
    `Engine.decide`, an image that could not be read)."""
    policy = compiled.policy
    update: dict[str, Any] = {
        "policy_id": policy.id,
        "policy_version": policy.version,
        "policy_hash": compiled.hash,
    }
    return verdict.model_copy(update=update)


def beside(engine: Engine, shadow: Policy | str | Path | Engine) -> tuple[Engine, bool]:
    """The shadow policy's engine (on `engine`'s backend, in its mode, unless an Engine is
    given) and whether it reads `engine`'s answers instead of asking the backend itself."""
    from .engine import Engine

    if not isinstance(shadow, Engine):
        shadow = Engine(
            shadow,
            engine.backend,
            mode=engine.mode,
            batch_size=engine.batch_size,
            max_new_tokens=engine.max_new_tokens,
            score_threshold=engine.score_threshold,
            max_pixels=engine.max_pixels,
            host=engine.host,
            lenient=engine.lenient,
        )
    reuses = (
        shadow.backend is engine.backend
        and shadow.mode == engine.mode
        and shadow.max_new_tokens == engine.max_new_tokens
        and shadow.score_threshold == engine.score_threshold
        and shadow.lenient == engine.lenient
        and same_request(engine.compiled, shadow.compiled)
    )
    return shadow, reuses


def step_result(engine: Engine, decision: Decision, index: int, failed: list[str]) -> ShadowResult:
    """The Decision as it would be with step `index` live: the step, then the live steps
    after it, on a copy (`failed`: the live steps that failed before it); the live Decision is
    not touched."""
    branch = decision.model_copy(
        update={
            "overrides": list(decision.overrides),
            "actions": list(decision.actions),
            "trace": list(decision.trace),
            "shadow": None,
        }
    )
    mark = len(branch.trace)
    step_id, processor = engine.chain[index]
    branch_failed = list(failed)
    if not engine._run_step(branch, step_id, processor):
        branch_failed.append(step_id)
    engine._run_steps(branch, index + 1, branch_failed, shadows=False)
    return ShadowResult.of(branch, "step", step_id, trace_from=mark)


def policy_result(
    engine: Engine,
    verdict: Verdict,
    metadata: dict[str, Any],
    generations: list[Generation] | None,
    prepared: _Prepared | None,
) -> ShadowResult:
    """The shadow policy's Decision on the item `engine` judged: the live answers read under
    it when it asks the same (`engine.shadow_reuses`), else its own backend answers (no answer
    at all, for a given verdict or an unreadable image: the live verdict, restamped), read,
    calibrated and aggregated (a video, a post) by the shadow policy's own rules; its chain
    without its own shadow steps, and no observers (the live Decision carries it)."""
    shadow = engine.shadow
    assert shadow is not None
    reused = generations is None or engine.shadow_reuses
    if not reused and prepared is not None:
        if prepared.shadow_generations is None:  # a caller that did not generate them
            generate(engine, [prepared])
        generations = prepared.shadow_generations
    if generations is None or prepared is None:
        shadow_verdict = restamp(verdict, shadow.compiled)
    else:
        shadow_verdict = shadow._item_verdict(prepared, generations)
    branch = Decision(verdict=shadow_verdict, metadata=metadata)
    shadow._run_steps(branch, 0, [], shadows=False)
    return ShadowResult.of(
        branch,
        "policy",
        shadow.policy.id,
        policy_id=shadow.policy.id,
        policy_version=shadow.policy.version,
        policy_hash=shadow.compiled.hash,
        reused_answer=reused,
    )


def _batch(engine: Engine, prepared: list[_Prepared]) -> Batch | None:
    """The batch the shadow policy must judge itself (None: nothing to ask)."""
    if engine.shadow is None or engine.shadow_reuses:
        return None
    return engine.shadow._batch([p for p in prepared if p.images])


def generate(engine: Engine, prepared: list[_Prepared]) -> None:
    """The shadow policy's own answers for `prepared`, kept on them (blocking)."""
    batch = _batch(engine, prepared)
    if batch is not None:
        assert engine.shadow is not None
        _keep(prepared, engine.shadow._generate(batch))


async def agenerate(engine: Engine, prepared: list[_Prepared]) -> None:
    """Async twin of `generate`."""
    batch = _batch(engine, prepared)
    if batch is None:
        return
    shadow = engine.shadow
    assert shadow is not None
    _keep(prepared, await shadow._agenerate(batch))  # a fault: the shadow result's error


def _keep(prepared: list[_Prepared], generations: list[Generation]) -> None:
    answers = iter(generations)
    for item in prepared:
        if item.images:
            item.shadow_generations = [next(answers) for _ in item.images]
