"""The toy model behind the loopback servers: a tokenizer, text, verdicts and logprobs.

Everything is deterministic: a toy tokenizer (`toy_tokens`, `toy_ids`) and random generators
seeded from the request's text, its image bytes and the server's seed (`rng_for`). At the rating
position (a prompt that ends with `VERDICT_TAIL`) the model puts most of its probability on
"Safe" and "Unsafe"; anywhere else (a closed assistant turn, a plain prompt) it writes sentences
and the ratings hold little.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

BOS_ID = 1
EOS_ID = 151645  # <|im_end|> of Qwen-based checkpoints such as LlavaGuard-v1.2-0.5B-OV
MAX_MODEL_LEN = 32768
IMAGE_PROMPT_TOKENS = 729  # what one image costs in prompt tokens (27 x 27 SigLIP patches)
# A prefill that ends like this asks for the rating of a LlavaGuard verdict next.
VERDICT_TAIL = '"rating": "'
LLAVAGUARD_CATEGORIES = (
    "O1: Hate, Humiliation, Harassment",
    "O2: Violence, Harm, or Cruelty",
    "O3: Sexual Content",
    "O4: Nudity Content",
    "O5: Criminal Planning",
    "O6: Weapons or Substance Abuse",
    "O7: Self-Harm",
    "O8: Animal Cruelty",
    "O9: Disasters or Emergencies",
)
NO_CATEGORY = "NA: None applying"

# --------------------------------------------------------------------------------------------
# Toy tokenizer
# --------------------------------------------------------------------------------------------

_PIECE_RE = re.compile(r"\w+|[^\w\s]|\s+")


def toy_tokens(text: str) -> list[str]:
    """Split `text` into toy tokens: words, single punctuation characters and whitespace runs.

    The pieces always join back to `text` (`Safe",` -> `Safe`, `"`, `,`).
    """
    return _PIECE_RE.findall(text)


def toy_id(piece: str) -> int:
    """The toy token id of one piece (ids 0..99 are reserved; BOS is 1)."""
    return zlib.crc32(piece.encode("utf-8")) % 50000 + 100


def toy_ids(text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Toy token ids of `text`; with `add_special_tokens` the BOS id 1 comes first."""
    ids = list(_cached_ids(text))
    return [BOS_ID, *ids] if add_special_tokens else ids


@functools.lru_cache(maxsize=64)
def _cached_ids(text: str) -> tuple[int, ...]:
    """Every request of a run repeats the same long prompt: tokenize it once."""
    return tuple(toy_id(piece) for piece in toy_tokens(text))


SAFE_ID = toy_id("Safe")
UNSAFE_ID = toy_id("Unsafe")
# Alternatives offered in top-logprob lists; the first four are what a real model puts next to
# "Safe"/"Unsafe" at the rating position.
ALT_PIECES = (
    "S",
    "Un",
    "{",
    " ",
    "the",
    ".",
    ",",
    "\n",
    "a",
    "is",
    "image",
    "of",
    "and",
    '"',
    "to",
    "in",
    "no",
    "with",
    "The",
    ":",
)
NAMES: dict[int, str] = {toy_id(p): p for p in (*ALT_PIECES, "Safe", "Unsafe")}
NAMES[BOS_ID] = "<s>"
NAMES[EOS_ID] = "<|im_end|>"


def alternatives(count: int) -> list[int]:
    """At least `count` distinct candidate ids, with names registered in NAMES."""
    ids = [toy_id(p) for p in ALT_PIECES]
    extra = 0
    while len(ids) < count:
        piece = f"alt{extra}"
        extra += 1
        ids.append(toy_id(piece))
        NAMES.setdefault(ids[-1], piece)
    return ids


def name_of(token_id: int, local: dict[int, str] | None = None) -> str:
    if local is not None and token_id in local:
        return local[token_id]
    return NAMES.get(token_id, f"<id:{token_id}>")


# --------------------------------------------------------------------------------------------
# Text and schema-instance generation
# --------------------------------------------------------------------------------------------

VOCABULARY = (
    "the image shows a person an object scene with outdoor indoor setting that contains no "
    "visible weapons violence nudity or harmful content people are standing near building "
    "street table and there is nothing suggesting danger abuse crime self harm the picture "
    "depicts ordinary everyday activity in public space context background lighting colors "
    "appear natural while subject seems calm friendly relaxed overall composition does not "
    "violate policy guidelines regarding hate harassment cruelty animals disasters emergencies"
)
WORDS = tuple(VOCABULARY.split())


def sentence_words(rng: random.Random, count: int) -> str:
    """`count` words grouped into capitalised sentences of 6..14 words, each ending in '.'."""
    sentences: list[str] = []
    left = count
    while left > 0:
        size = min(left, rng.randint(6, 14))
        words = [rng.choice(WORDS) for _ in range(size)]
        words[0] = words[0].capitalize()
        if size >= 8 and rng.random() < 0.4:
            words[size // 2] += ","
        sentences.append(" ".join(words) + ".")
        left -= size
    return " ".join(sentences)


def plain_reply(rng: random.Random) -> str:
    """A short free-text reply (8..15 words), used when no schema constrains the output."""
    return sentence_words(rng, rng.randint(8, 15))


def rng_for(seed: int, *parts: str | bytes) -> random.Random:
    digest = hashlib.sha256(str(seed).encode())
    for part in parts:
        digest.update(b"\x00")
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
    return random.Random(int.from_bytes(digest.digest()[:8], "big"))


# --------------------------------------------------------------------------------------------
# Completions and logprobs
# --------------------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    pieces: list[str]
    ids: list[int]
    truncated: bool
    verdict: tuple[float, float] | None  # (p(Safe), p(Unsafe)) at the first position


def complete(full: str, budget: int, verdict: tuple[float, float] | None) -> Completion:
    pieces = toy_tokens(full)
    truncated = len(pieces) > budget
    if truncated:
        pieces = pieces[:budget]
    return Completion("".join(pieces), pieces, [toy_id(p) for p in pieces], truncated, verdict)


def verdict_for(seed: int, *parts: str | bytes) -> tuple[str, float, float]:
    """The rating a fake model gives, with p(Safe) and p(Unsafe) that vary per request."""
    rng = rng_for(seed, "verdict", *parts)
    share = rng.uniform(0.03, 0.97)
    mass = rng.uniform(0.95, 0.99)
    p_safe, p_unsafe = mass * share, mass * (1.0 - share)
    return ("Safe" if p_safe >= p_unsafe else "Unsafe"), p_safe, p_unsafe


def verdict_continuation(rating: str, rng: random.Random) -> str:
    """What follows `"rating": "` in a LlavaGuard verdict serialised with indent=4."""
    category = NO_CATEGORY if rating == "Safe" else rng.choice(LLAVAGUARD_CATEGORIES)
    rationale = sentence_words(rng, rng.randint(50, 80))
    return f'{rating}",\n    "category": "{category}",\n    "rationale": "{rationale}"\n}}'


def position_probs(
    rng: random.Random,
    chosen: int,
    fixed: dict[int, float] | None,
    candidates: Sequence[int],
    requested: Sequence[int],
) -> dict[int, float]:
    """Token probabilities at one output position: all positive, summing to at most 1, with
    the chosen (and any fixed) tokens ranked above every other candidate."""
    probs: dict[int, float] = dict(fixed or {})
    if chosen not in probs:
        probs[chosen] = rng.uniform(0.55, 0.98)
    rest = [i for i in dict.fromkeys([*candidates, *requested]) if i not in probs]
    if rest:
        room = (1.0 - sum(probs.values())) * rng.uniform(0.5, 0.95)
        room = min(room, min(probs.values()) * 0.9)
        # Candidates keep their order (the weight decays faster than its random factor can
        # make up), so "S", "Un", "{", " " come right after Safe/Unsafe at the rating.
        ranked = set(candidates)
        weights = [
            rng.uniform(0.5, 1.0) * 0.45**index if token_id in ranked else rng.uniform(0.05, 0.5)
            for index, token_id in enumerate(rest)
        ]
        total = sum(weights)
        for token_id, weight in zip(rest, weights, strict=True):
            probs[token_id] = room * weight / total
    return probs


def positions(
    seed: int,
    parts: Sequence[str | bytes],
    completion: Completion,
    top: int,
    requested: Sequence[int],
) -> list[dict[int, float]]:
    rng = rng_for(seed, "logprobs", *parts)
    candidates = alternatives(top + 2)
    result = []
    for index, token_id in enumerate(completion.ids):
        fixed = None
        if index == 0 and completion.verdict is not None:
            fixed = {SAFE_ID: completion.verdict[0], UNSAFE_ID: completion.verdict[1]}
        result.append(position_probs(rng, token_id, fixed, candidates, requested))
    return result


def top_logprobs(probs: dict[int, float], count: int) -> list[tuple[int, float]]:
    ranked = sorted(probs.items(), key=lambda item: -item[1])
    return [(token_id, math.log(p)) for token_id, p in ranked[:count]]
