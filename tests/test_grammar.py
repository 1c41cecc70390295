"""The answer grammar admits exactly the trained layout of the answers the schema accepts."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

llguidance = pytest.importorskip("llguidance")
ll_numpy = pytest.importorskip("llguidance.numpy")
tokenizers = pytest.importorskip("tokenizers")

from policy_engine import get_host  # noqa: E402
from policy_engine.compiler import CompiledPolicy  # noqa: E402
from policy_engine.grammar import answer_grammar  # noqa: E402
from policy_engine.loader import load_policy  # noqa: E402

CUSTOM = """\
extends: llavaguard
id: custom
version: "1"
prompt_format: generic
output:
  extra_fields: [severity, categories]
  rationale_max_chars: 40
categories:
  - id: C1
    name: 'Quotes "and" back\\slashes, é 漢字'
    severity: high
    should_not: [Show things.]
    can: [Show other things.]
"""


@pytest.fixture(scope="module")
def ll_tokenizer() -> object:
    """A small byte-level BPE: every byte encodable, merges learnt from policy-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    compiled = get_host().compile(load_policy("llavaguard"))
    corpus = [compiled.prompt] + [
        compiled.layout.dumps({"rating": r, "category": c, "rationale": "The image shows."})
        for r in ("Safe", "Unsafe")
        for c in compiled.labels
    ]
    tok.train_from_iterator(corpus * 3, trainer)
    return llguidance.LLTokenizer(tok.to_str(), eos_token=0)


def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CompiledPolicy]:
    path = tmp_path_factory.mktemp("policies") / "custom.yaml"
    path.write_text(CUSTOM, encoding="utf-8")
    return {
        "llavaguard": get_host().compile(load_policy("llavaguard")),
        "children-platform": get_host().compile(load_policy("children-platform")),
        "custom": get_host().compile(load_policy(str(path))),
    }


@pytest.fixture(scope="module")
def compiled_policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CompiledPolicy]:
    return policies(tmp_path_factory)


def matcher(tokenizer: object, grammar: str) -> object:
    m = llguidance.LLMatcher(
        tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
    )
    assert not m.is_error(), m.get_error()
    return m


def accepts(tokenizer: object, grammar: str, text: str) -> bool:
    m = matcher(tokenizer, grammar)
    ok = m.consume_tokens(tokenizer.tokenize_str(text))  # type: ignore[attr-defined]
    return bool(ok and m.is_accepting())


def answers(compiled: CompiledPolicy) -> list[dict[str, object]]:
    labels = list(compiled.labels)
    violating = labels[:-1]
    found = []
    for i, label in enumerate(labels):
        found.append(
            {
                "rating": "Unsafe" if i % 2 and label in violating else "Safe",
                "category": label,
                "rationale": ["x", 'a "quoted" \\ line\nnext', "é 漢字 🙂", "\t tab"][i % 4],
                "severity": compiled.policy.severity_levels[i % 4],
                "categories": violating[: i % 3] if i % 5 else [violating[0], violating[-1]],
            }
        )
    return found


@pytest.mark.parametrize("name", ["llavaguard", "children-platform", "custom"])
@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_trained_layout_is_accepted_whole_and_after_prefix(
    ll_tokenizer: object, compiled_policies: dict[str, CompiledPolicy], name: str, mode: str
) -> None:
    compiled = compiled_policies[name]
    layout = compiled.layout_for(mode)  # type: ignore[arg-type]
    whole = answer_grammar(compiled, mode)  # type: ignore[arg-type]
    tail = answer_grammar(compiled, mode, after_prefix=True)  # type: ignore[arg-type]
    prefix = layout.prefix()
    for answer in answers(compiled):
        text = layout.dumps(answer)
        if len(str(answer["rationale"])) > 40 and name == "custom":
            continue
        assert accepts(ll_tokenizer, whole, text), text
        assert text.startswith(prefix)
        assert accepts(ll_tokenizer, tail, text[len(prefix) :]), text


def test_other_layouts_and_invalid_values_are_rejected(
    ll_tokenizer: object, compiled_policies: dict[str, CompiledPolicy]
) -> None:
    compiled = compiled_policies["llavaguard"]
    grammar = answer_grammar(compiled)
    good = {"rating": "Unsafe", "category": "O2: Violence, Harm, or Cruelty", "rationale": "r"}
    assert accepts(ll_tokenizer, grammar, compiled.layout.dumps(good))
    rejected = [
        json.dumps(good),  # compact
        json.dumps(good, indent=2),  # other indentation
        json.dumps({k: good[k] for k in ("category", "rating", "rationale")}, indent=4),
        compiled.layout.dumps({**good, "rating": "Maybe"}),
        compiled.layout.dumps({**good, "category": "O2: Violence"}),
        compiled.layout.dumps({**good, "category": "NA: None applying"}),  # inconsistent
        compiled.layout.dumps({**good, "rationale": ""}),
        compiled.layout.dumps({**good, "rationale": "x" * 2001}),
        json.dumps({**good, "extra": 1}, indent=4),
        compiled.layout.dumps(good) + "\n",
    ]
    for text in rejected:
        assert not accepts(ll_tokenizer, grammar, text), text


def test_categories_array_is_ordered_and_distinct(
    ll_tokenizer: object, compiled_policies: dict[str, CompiledPolicy]
) -> None:
    compiled = compiled_policies["custom"]
    grammar = answer_grammar(compiled)
    labels = list(compiled.labels)[:-1]
    base = {"rating": "Unsafe", "category": labels[0], "rationale": "r", "severity": "high"}
    dump = compiled.layout.dumps
    assert accepts(ll_tokenizer, grammar, dump({**base, "categories": [labels[0], labels[2]]}))
    assert not accepts(ll_tokenizer, grammar, dump({**base, "categories": [labels[2], labels[0]]}))
    assert not accepts(ll_tokenizer, grammar, dump({**base, "categories": [labels[1]] * 2}))


@pytest.mark.parametrize("name", ["llavaguard", "custom"])
@pytest.mark.parametrize("mode", ["full", "verdict"])
def test_random_walks_give_schema_valid_answers_in_layout(
    ll_tokenizer: object, compiled_policies: dict[str, CompiledPolicy], name: str, mode: str
) -> None:
    """Any token path the grammar allows ends in an answer that validates and is in layout."""
    compiled = compiled_policies[name]
    schema = compiled.schema_for(mode)  # type: ignore[arg-type]
    layout = compiled.layout_for(mode)  # type: ignore[arg-type]
    grammar = answer_grammar(compiled, mode, after_prefix=True)  # type: ignore[arg-type]
    vocab = ll_tokenizer.vocab_size  # type: ignore[attr-defined]
    rng = random.Random(7)
    decode = ll_tokenizer.decode_str  # type: ignore[attr-defined]
    for _ in range(25):
        m = matcher(ll_tokenizer, grammar)
        tokens: list[int] = []
        while not m.is_stopped() and len(tokens) < 400:
            bitmask = ll_numpy.allocate_token_bitmask(1, vocab)
            ll_numpy.fill_next_token_bitmask(m, bitmask, 0)
            allowed = [t for t in range(vocab) if bitmask[0, t // 32] >> (t % 32) & 1]
            # favour closing the string now and then, or the walk never ends
            closing = [t for t in allowed if t == 0 or set(decode([t])) & set('"}]')]
            pick_closing = closing and rng.random() < min(0.9, len(tokens) / 40)
            token = rng.choice(closing if pick_closing else allowed)
            assert m.consume_token(token), m.get_error()
            tokens.append(token)
        assert m.is_stopped(), "the walk should close the answer"
        text = layout.prefix() + decode([t for t in tokens if t != 0])
        answer = json.loads(text)
        jsonschema.validate(answer, schema)
        assert layout.dumps(answer) == text


def test_grammar_text_is_deterministic(compiled_policies: dict[str, CompiledPolicy]) -> None:
    compiled = compiled_policies["custom"]
    assert answer_grammar(compiled) == answer_grammar(compiled)
