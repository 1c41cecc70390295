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
from typing import Any

from .compiler import CompiledPolicy
from .verdict import Verdict

__all__ = ["request_key", "restamp", "same_request"]


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
