"""P(Unsafe) from the first answer token's top logprobs, for server backends.

Score mode prefills the answer up to the opening quote of the rating and asks the server for one
token with its top logprobs (token text and logprob). The tokens that start each rating's
continuation (`Safe",…` / `Unsafe",…`: the whole word, or a first piece such as `S` or `Un`)
carry that rating's probability; P(Unsafe) is the Unsafe share of the two.

The share is only evidence if the two ratings hold most of the probability. When the prefilled
assistant turn was closed instead of continued (SGLang's `--chat-template chatml-llava` does
this on the OpenAI path), or the chat template is wrong, the model is not about to write a
rating at all: the ratings hold a sliver of the mass (2e-5 was measured), and renormalising
that sliver gives a confident number from no evidence. Below `floor` the item is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policy_engine import CompiledPolicy, Generation

RATINGS = ("Safe", "Unsafe")
DEFAULT_FLOOR = 0.5
SCORE_DOC = "docs/sglang.md, 'Score mode'"


def rating_masses(compiled: CompiledPolicy, pairs: Sequence[tuple[str, float]]) -> list[float]:
    """The probability of each rating (Safe, Unsafe) among `pairs` of (token text, logprob):
    the tokens that start the rating's continuation."""
    masses = []
    for rating in RATINGS:
        continuation = compiled.continuation(rating)
        masses.append(
            sum(math.exp(lp) for tok, lp in pairs if tok and continuation.startswith(tok))
        )
    return masses


def score(
    compiled: CompiledPolicy, pairs: Sequence[tuple[str, float]], floor: float, model: str
) -> Generation:
    """P(Unsafe) from the first answer token's top logprobs, or an error when the two ratings
    hold less than `floor` of its probability (naming the likely cause)."""
    safe, unsafe = rating_masses(compiled, pairs)
    total = safe + unsafe
    if not total >= floor:  # also catches NaN
        seen = ", ".join(f"{tok!r}: {math.exp(lp):.2g}" for tok, lp in list(pairs)[:4])
        return Generation(
            error=f"the two ratings hold {total:.2g} of the first answer token's probability, "
            f"below the floor of {floor:g} (min_rating_mass): the model is not about to write "
            "a rating, so no P(Unsafe) is given. Most likely the prefilled assistant turn was "
            "closed instead of continued (SGLang's --chat-template chatml-llava does this on "
            "the openai transport), or the chat template is wrong; see "
            f"{SCORE_DOC} (the likeliest first tokens: {seen or 'none'})",
            model=model,
        )
    return Generation(p_unsafe=unsafe / total, model=model)
