"""The tiny random-weight checkpoints: hub code path, chat template, any image size, determinism,
tokenizer round trips, cache atomicity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from policy_engine.backends import tiny
from policy_engine.backends.tiny import (
    BUILD_VERSION,
    TINY_MODELS,
    build_tiny_model,
    cache_root,
    corpus_digest,
    tiny_model_path,
)

from policy_engine import get_host
from policy_engine.errors import PolicyEngineError
from policy_engine.loader import load_policy

pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # the OneVision processor's video processor needs it
torch = pytest.importorskip("torch")

NAMES = sorted(TINY_MODELS)
SIZES = [(1, 1), (2, 2), (1, 500), (500, 1), (3000, 20), (64, 64), (640, 480)]  # (width, height)
EXPECTED = {
    "tiny-random": {
        "processor": "LlavaOnevisionProcessor",
        "model": "LlavaOnevisionForConditionalGeneration",
        "eos": "<|im_end|>",
        "image": "<image>",
        "render": "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        "generation_prompt": "<|im_start|>assistant\n",
    },
    "tiny-random-llava": {
        "processor": "LlavaProcessor",
        "model": "LlavaForConditionalGeneration",
        "eos": "</s>",
        "image": "<image>",
        "render": "USER: <image>\n{prompt} ASSISTANT:",
        "generation_prompt": "ASSISTANT:",
    },
    "tiny-random-qwen": {
        "processor": "Qwen2_5_VLProcessor",
        "model": "Qwen2_5_VLForConditionalGeneration",
        "eos": "<|im_end|>",
        "image": "<|image_pad|>",
        "render": (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ),
        "generation_prompt": "<|im_start|>assistant\n",
    },
}
MAX_QWEN_ASPECT = 200
"""Qwen2VLImageProcessor's `smart_resize` rejects images whose long side exceeds 200x the short."""
ROUND_TRIP = [
    '{\n    "rating": "Unsafe",',
    '{\n    "rating": "Safe",\n    "category": "NA: None applying",\n    "rationale": "ok"\n}',
    "Café crème, é è ê",
    "漢字とかな",
    "emoji 😀👍🏽 and flags 🇩🇪",
    "  leading and trailing spaces  ",
    "tabs\tnew\nlines\r\nand \x00 \x7f control",
    'quotes " \\ backslash \\u00e9 escaped',
    "",
]


def conversation(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def prompt() -> str:
    return get_host().compile(load_policy("llavaguard")).prompt


@pytest.fixture(scope="module")
def paths(tiny_models: Path) -> dict[str, Path]:
    return {name: tiny_model_path(name, cache_dir=tiny_models) for name in NAMES}


@pytest.fixture(scope="module")
def loaded(paths: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return {
        name: (
            AutoProcessor.from_pretrained(path),
            AutoModelForImageTextToText.from_pretrained(path),
        )
        for name, path in paths.items()
    }


def test_cache_layout(paths: dict[str, Path], tiny_models: Path) -> None:
    for name, path in paths.items():
        assert path == tiny_models / "models" / f"{name}-{BUILD_VERSION}-{corpus_digest()}"
        readme = (path / "README.md").read_text(encoding="utf-8")
        assert "RANDOM" in readme and "meaningless" in readme
    assert sorted(p.name for p in (tiny_models / "models").iterdir()) == sorted(
        f"{name}-{BUILD_VERSION}-{corpus_digest()}" for name in NAMES
    )


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLICY_ENGINE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("POLICY_ENGINE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "policy-engine"


@pytest.mark.parametrize("name", NAMES)
def test_loads_through_auto_classes(name: str, loaded: dict[str, tuple[Any, Any]]) -> None:
    processor, model = loaded[name]
    assert type(processor).__name__ == EXPECTED[name]["processor"]
    assert type(model).__name__ == EXPECTED[name]["model"]
    tokenizer = processor.tokenizer
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(EXPECTED[name]["image"])
    assert processor.image_token_id == model.config.image_token_id


@pytest.mark.parametrize("name", NAMES)
def test_chat_template(name: str, loaded: dict[str, tuple[Any, Any]], prompt: str) -> None:
    processor, _ = loaded[name]
    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True)
    assert text == EXPECTED[name]["render"].format(prompt=prompt)
    assert text.index(EXPECTED[name]["image"]) < text.index(prompt)
    assert text.endswith(EXPECTED[name]["generation_prompt"])
    bare = processor.apply_chat_template(conversation(prompt))
    assert not bare.endswith(EXPECTED[name]["generation_prompt"])
    # The same template is on the tokenizer, for text-only use.
    assert processor.tokenizer.chat_template == processor.chat_template


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("name", NAMES)
def test_generate_any_image_size(
    name: str, size: tuple[int, int], loaded: dict[str, tuple[Any, Any]], prompt: str
) -> None:
    processor, model = loaded[name]
    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True)
    image = Image.new("RGB", size, (200, 40, 90))
    if name == "tiny-random-qwen" and max(size) / min(size) > MAX_QWEN_ASPECT:
        # The real QwenGuard processor has the same limit: such images need padding first.
        with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
            processor(images=[image], text=[text], return_tensors="pt")
        return
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() > 0
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len < out.shape[1] <= prompt_len + 5
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_bos_like_the_real_tokenizers(name: str, loaded: dict[str, tuple[Any, Any]]) -> None:
    """Llama (v1.0) prepends <s> once; Qwen2 (OneVision) and Qwen2.5-VL prepend nothing."""
    processor, _ = loaded[name]
    text = processor.apply_chat_template(conversation("hi"), add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (8, 8))], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    if name == "tiny-random-llava":
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    else:
        assert tokenizer.bos_token is None
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


class _ForceToken:
    """A logits processor that makes one token the only choice."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_on_eos(name: str, loaded: dict[str, tuple[Any, Any]]) -> None:
    from transformers import LogitsProcessorList

    processor, model = loaded[name]
    tokenizer = processor.tokenizer
    assert tokenizer.eos_token == EXPECTED[name]["eos"]
    eos = model.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    text = processor.apply_chat_template(conversation("hi"), add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (8, 8))], text=[text], return_tensors="pt")
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        do_sample=False,
        logits_processor=LogitsProcessorList([_ForceToken(tokenizer.eos_token_id)]),
    )
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1
    assert out[0, -1].item() == tokenizer.eos_token_id


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(name: str, text: str, loaded: dict[str, tuple[Any, Any]]) -> None:
    tokenizer = loaded[name][0].tokenizer
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_round_trips_prompt(
    name: str, loaded: dict[str, tuple[Any, Any]], prompt: str
) -> None:
    tokenizer = loaded[name][0].tokenizer
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.decode(ids) == prompt
    assert 500 < len(ids) < 3000  # the BPE learned the policy texts: far fewer tokens than bytes
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("name", NAMES)
def test_safe_and_unsafe_start_with_different_tokens(
    name: str, loaded: dict[str, tuple[Any, Any]]
) -> None:
    """Scoring from next-token logits needs the two ratings to differ at their first token."""
    tokenizer = loaded[name][0].tokenizer
    prefix = get_host().compile(load_policy("llavaguard")).layout.prefix()
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    firsts = []
    for rating in ("Safe", "Unsafe"):
        ids = tokenizer.encode(prefix + rating + '",', add_special_tokens=False)
        assert ids[: len(prefix_ids)] == prefix_ids
        firsts.append(ids[len(prefix_ids)])
    assert firsts[0] != firsts[1]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_builds_identical_files(
    name: str, paths: dict[str, Path], tmp_path: Path
) -> None:
    rebuilt = build_tiny_model(tmp_path / "again", TINY_MODELS[name], seed=0)
    assert (rebuilt / "model.safetensors").read_bytes() == (
        paths[name] / "model.safetensors"
    ).read_bytes()
    assert _files(rebuilt) == _files(paths[name])


def test_other_seed_other_weights_same_tokenizer(paths: dict[str, Path], tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "seed1", "llava-onevision", seed=1)
    cached = paths["tiny-random"]
    assert (other / "model.safetensors").read_bytes() != (cached / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (cached / "tokenizer.json").read_bytes()


def test_build_does_not_touch_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_model(tmp_path / "m", "llava", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_configs_match_the_real_geometry(paths: dict[str, Path]) -> None:
    ov = json.loads((paths["tiny-random"] / "config.json").read_text(encoding="utf-8"))
    assert ov["vision_config"]["model_type"] == "siglip_vision_model"
    assert ov["text_config"]["model_type"] == "qwen2"
    assert ov["vision_feature_select_strategy"] == "full"
    llava = json.loads((paths["tiny-random-llava"] / "config.json").read_text(encoding="utf-8"))
    assert llava["vision_config"]["model_type"] == "clip_vision_model"
    assert llava["text_config"]["model_type"] == "llama"
    assert llava["vision_feature_select_strategy"] == "default"
    qwen = json.loads((paths["tiny-random-qwen"] / "config.json").read_text(encoding="utf-8"))
    assert qwen["model_type"] == "qwen2_5_vl"
    assert qwen["vision_config"]["model_type"] == "qwen2_5_vl_vision"
    assert qwen["text_config"]["model_type"] == "qwen2_5_vl_text"
    text = qwen["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2  # 3-D RoPE covers it
    assert qwen["vision_config"]["out_hidden_size"] == text["hidden_size"]
    assert all(
        i < qwen["vision_config"]["depth"] for i in qwen["vision_config"]["fullatt_block_indexes"]
    )


@pytest.mark.parametrize(
    ("size", "grid"),
    [((1, 1), (4, 4)), ((64, 64), (4, 4)), ((640, 480), (6, 8)), ((3000, 20), (2, 96))],
    ids=["1x1", "64x64", "640x480", "3000x20"],
)
def test_qwen_image_tokens_follow_the_grid(
    size: tuple[int, int], grid: tuple[int, int], loaded: dict[str, tuple[Any, Any]]
) -> None:
    """One <|image_pad|> per 2x2 block of 14-px patches, between vision start and end.

    Small images are upscaled to min_pixels (56x56: 4 tokens); others shrink to about
    max_pixels (16 tokens), except that each side keeps at least one 28-px block, so a 3000x20
    strip still gives 48 tokens.
    """
    processor, _ = loaded["tiny-random-qwen"]
    text = processor.apply_chat_template(conversation("hi"), add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", size)], text=[text], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, *grid]]
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    start = ids.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    end = ids.index(tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    assert ids[start + 1 : end] == [pad] * (grid[0] * grid[1] // 4)
    assert ids.count(pad) == grid[0] * grid[1] // 4
    # mm_token_type_ids marks the image tokens: the model needs it for its 3-D RoPE positions
    assert inputs["mm_token_type_ids"][0].tolist() == [int(i == pad) for i in ids]


def test_unknown_name() -> None:
    with pytest.raises(PolicyEngineError) as err:
        tiny_model_path("tiny-nonsense")
    assert all(name in str(err.value) for name in NAMES)
    with pytest.raises(PolicyEngineError):
        build_tiny_model(Path("unused"), "gpt")


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(directory: Path, kind: str = "llava", seed: int = 0) -> Path:
        (directory / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tiny, "build_tiny_model", crash)
    with pytest.raises(RuntimeError):
        tiny_model_path("tiny-random-llava", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_lost_race_keeps_the_winner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, paths: dict[str, Path]
) -> None:
    target = tmp_path / "models" / f"tiny-random-llava-{BUILD_VERSION}-{corpus_digest()}"

    def build_but_lose_the_race(directory: Path, kind: str = "llava", seed: int = 0) -> Path:
        shutil.copytree(paths["tiny-random-llava"], target)  # the other builder finishes first
        (directory / "config.json").write_text("{}", encoding="utf-8")
        (directory / "README.md").write_text("loser", encoding="utf-8")
        return directory

    monkeypatch.setattr(tiny, "build_tiny_model", build_but_lose_the_race)
    assert tiny_model_path("tiny-random-llava", cache_dir=tmp_path) == target
    assert [p.name for p in (tmp_path / "models").iterdir()] == [target.name]
    assert _files(target) == _files(paths["tiny-random-llava"])


def test_incomplete_target_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "models" / f"tiny-random-{BUILD_VERSION}-{corpus_digest()}"
    target.mkdir(parents=True)
    with pytest.raises(PolicyEngineError, match="not a complete tiny model"):
        tiny_model_path("tiny-random", cache_dir=tmp_path)


def test_import_is_cheap() -> None:
    code = (
        "import sys, policy_engine.backends.tiny\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
