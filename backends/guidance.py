"""Constrained decoding for HF transformers with llguidance: grammar cache and logits processor.

Imported only from `TransformersBackend.load()` (it imports torch and llguidance at the top).

llguidance compiles our layout grammar (`policy_engine.grammar`) against a tokenizer in a few
milliseconds and gives, per step, a bitmask of the tokens that keep the answer valid. It ships no
HF `LogitsProcessor`, so `GrammarProcessor` is the glue: consume each row's last token, fill the
row's bitmask, set disallowed logits to -inf. Its masking is plain torch (llguidance's own torch
helper uses `torch.compile`, 4-7 s on its first CPU call).

Two more things happen in the processor, both at fixed steps:
- step 0 is the rating (the prompt ends with the layout's prefix `{\\n    "rating": "`): the
  raw logits there give P(Unsafe), and the step is restricted to the first tokens of "Safe" and
  "Unsafe", so that a greedy rating always agrees with that score;
- near the end of the token budget, tokens that close the answer are preferred, so a weak model
  that rambles still ends with valid JSON instead of being cut off mid-string.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from policy_engine import CompiledPolicy, Mode, answer_grammar

CLOSING_CHARS = frozenset('"}]\n ,')
"""Characters of the bytes that end an answer in the trained layouts (`"\n}`, `"\n    ]`)."""
ENDING_CHARS = frozenset('"}]\n')
"""A closing token must hold one of these (a lone space or comma continues a string)."""

RESERVE_TOKENS = 8
"""Steps before the budget ends from which closing tokens are preferred."""


@dataclass
class GuidedTokenizer:
    """A HF tokenizer wrapped for llguidance, with what the processor needs precomputed."""

    ll: LLTokenizer
    fingerprint: str
    vocab_size: int
    quote: torch.Tensor  # bool[vocab]: closing tokens that start by ending a string, and EOS
    closing: torch.Tensor  # bool[vocab]: tokens made only of closing characters, and EOS
    eos: torch.Tensor  # bool[vocab]: the end-of-answer tokens


_tokenizers: dict[tuple[str, int, tuple[int, ...]], GuidedTokenizer] = {}
_tokenizers_lock = threading.Lock()


def guided_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> GuidedTokenizer:
    """Wrap (once per tokenizer content, vocab size and EOS ids) a fast HF tokenizer."""
    serialized = hf_tokenizer.backend_tokenizer.to_str()
    fingerprint = hashlib.sha256(serialized.encode("utf-8")).hexdigest()[:16]
    key = (fingerprint, vocab_size, tuple(eos_ids))
    with _tokenizers_lock:
        if key in _tokenizers:
            return _tokenizers[key]
    ll = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
    closing = torch.zeros(vocab_size, dtype=torch.bool)
    quote = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(min(vocab_size, len(hf_tokenizer))):
        if ll.is_special_token(token_id):
            continue
        text = ll.decode_str([token_id])
        if text and set(text) <= CLOSING_CHARS and set(text) & ENDING_CHARS:
            closing[token_id] = True
            quote[token_id] = text.startswith('"')
    eos = torch.zeros(vocab_size, dtype=torch.bool)
    eos[eos_ids] = True
    guided = GuidedTokenizer(ll, fingerprint, vocab_size, quote | eos, closing | eos, eos)
    with _tokenizers_lock:
        _tokenizers[key] = guided
    return guided


@dataclass
class CacheInfo:
    hits: int = 0
    misses: int = 0
    size: int = 0


_CACHE_SIZE = 64
_grammars: OrderedDict[tuple[str, str, str], LLMatcher] = OrderedDict()
_grammars_lock = threading.Lock()
_info = CacheInfo()


def grammar_cache_info() -> CacheInfo:
    """Hits and misses of the compiled-grammar cache (keyed by policy hash, mode, tokenizer)."""
    with _grammars_lock:
        return CacheInfo(_info.hits, _info.misses, len(_grammars))


def clear_grammar_cache() -> None:
    with _grammars_lock:
        _grammars.clear()
        _info.hits = _info.misses = 0


def matcher_for(compiled: CompiledPolicy, mode: Mode, tokenizer: GuidedTokenizer) -> LLMatcher:
    """A fresh matcher for the answer after the layout's prefix; the grammar compiles once."""
    key = (compiled.hash, mode, tokenizer.fingerprint)
    with _grammars_lock:
        template = _grammars.get(key)
        if template is not None:
            _grammars.move_to_end(key)
            _info.hits += 1
            return template.deep_copy()
        _info.misses += 1
    lark = answer_grammar(compiled, mode, after_prefix=True)
    template = LLMatcher(tokenizer.ll, LLMatcher.grammar_from_lark(lark), log_level=0)
    if template.is_error():  # our own grammar: a bug, not a user error
        raise RuntimeError(f"answer grammar does not compile: {template.get_error()}")
    with _grammars_lock:
        _grammars[key] = template
        while len(_grammars) > _CACHE_SIZE:
            _grammars.popitem(last=False)
    return template.deep_copy()


def minimum_budget(compiled: CompiledPolicy, mode: Mode) -> int:
    """The fewest new tokens that always leave room for a complete answer.

    The answer's fixed parts (layout, rating, category labels, severity, category list) are
    bounded: at worst one token per byte of their longest form. Past them only the rationale
    is free, and the processor closes it within the reserve. A smaller budget could cut an
    answer off inside a label, so the backend raises budgets below this floor.
    """
    schema = compiled.fields_for(mode)
    worst: dict[str, Any] = {"rating": "Unsafe", "rationale": ""}
    for key, prop in schema.items():
        if "enum" in prop:
            worst[key] = max(prop["enum"], key=lambda v: len(json.dumps(v).encode("utf-8")))
        elif prop.get("type") == "array":
            worst[key] = list(prop.get("items", {}).get("enum", []))
    text = compiled.layout_for(mode).dumps(worst)
    return len(text.encode("utf-8")) + 2 * RESERVE_TOKENS


_SHIFTS = torch.arange(32, dtype=torch.int32)


def _allowed(bitmask: np.ndarray[Any, Any], vocab: int) -> torch.Tensor:
    """bool[rows, vocab] from llguidance's int32 bitmask (bit j of word i: token 32*i + j)."""
    words = torch.from_numpy(bitmask)
    bits = (words.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].bool()


class GrammarProcessor:
    """A transformers LogitsProcessor that keeps every row of a batch on its answer grammar.

    `matchers[i]` follows row i (None: unconstrained row). `rating_tokens` are the first tokens
    of "Safe" and "Unsafe" after the prefix; step 0 records `p_unsafe[i]` from them.
    """

    def __init__(
        self,
        matchers: list[LLMatcher | None],
        tokenizer: GuidedTokenizer | None,
        rating_tokens: tuple[int, int],
        budget: int,
    ) -> None:
        self.matchers = matchers
        self.tokenizer = tokenizer
        self.rating_tokens = rating_tokens
        self.budget = budget
        self.p_unsafe: list[float | None] = [None] * len(matchers)
        self.errors: list[str | None] = [None] * len(matchers)
        self.steps = 0
        self._start: int | None = None
        self._bitmask: np.ndarray[Any, Any] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape
        if self._start is None:
            self._start = input_ids.shape[1]
        step = input_ids.shape[1] - self._start
        self.steps = step + 1
        live = [i for i, m in enumerate(self.matchers) if m is not None and not m.is_stopped()]
        if step > 0:
            for i in live:
                matcher = self.matchers[i]
                assert matcher is not None
                if not matcher.consume_token(int(input_ids[i, -1])) and self.errors[i] is None:
                    self.errors[i] = f"grammar rejected a token: {matcher.get_error()}"
        done = [i for i, m in enumerate(self.matchers) if m is not None and m.is_stopped()]
        live = [i for i in live if i not in done]
        if step == 0:
            safe, unsafe = self.rating_tokens
            pair = scores[:, [safe, unsafe]].float()
            probs = torch.softmax(pair, dim=-1)[:, 1]
            self.p_unsafe = [float(p) for p in probs]
        if self.tokenizer is None:
            return scores
        # generate() hands each step a fresh float copy of the logits: masking in place is safe
        if done:  # the answer is complete (or the row finished): end it, nothing else
            eos = self.tokenizer.eos.to(scores.device)
            scores[done] = scores[done].masked_fill(~eos[:vocab], float("-inf"))
        if not live:
            return scores
        if self._bitmask is None or self._bitmask.shape[0] != rows:
            self._bitmask = llguidance.numpy.allocate_token_bitmask(rows, vocab)
        bitmask = self._bitmask
        for i in live:
            matcher = self.matchers[i]
            assert matcher is not None
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, i)
        allowed = _allowed(bitmask, vocab).to(scores.device)
        if step == 0:
            rating = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
            rating[list(self.rating_tokens)] = True
            both = allowed & rating
            usable = both.any(dim=-1, keepdim=True)
            allowed = torch.where(usable, both, allowed)
        elif self.budget - step <= RESERVE_TOKENS:
            # first end the open string, then close the brackets; else keep the grammar's choice
            for preferred in (self.tokenizer.quote, self.tokenizer.closing):
                narrowed = allowed & preferred.to(scores.device)[:vocab]
                allowed = torch.where(narrowed.any(dim=-1, keepdim=True), narrowed, allowed)
        if len(live) == rows:
            scores.masked_fill_(~allowed, float("-inf"))
        else:
            scores[live] = scores[live].masked_fill(~allowed[live], float("-inf"))
        return scores
