"""Tiny random-weight checkpoints of the LlavaGuard model classes, built offline.

Tests and dry runs need a model that goes through exactly the hub code path
(`AutoProcessor.from_pretrained`, `AutoModelForImageTextToText.from_pretrained`, chat template,
image processor, `generate`) without a download or a GPU. These checkpoints have the same classes
as the real ones (Llava-OneVision with SigLIP + Qwen2 for LlavaGuard v1.1/v1.2, Llava with CLIP +
Llama for v1.0, Qwen2.5-VL for QwenGuard) at toy sizes, a byte-level BPE tokenizer trained on the
project's own prompts, and RANDOM weights: their verdicts are meaningless.

Builds are deterministic (same seed, same policy texts: byte-identical files) and atomic (built in
a temporary sibling directory, then renamed into place). torch, transformers and tokenizers are
imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from policy_engine import PolicyEngineError

TINY_MODELS: dict[str, str] = {
    "tiny-random": "llava-onevision",
    "tiny-random-llava": "llava",
    "tiny-random-qwen": "qwen2.5-vl",
}
"""Checkpoint name -> model kind."""

logger = logging.getLogger(__name__)

BUILD_VERSION = "1"
"""Bump when the recipe changes: it is part of the cache path, so old builds are never reused."""

KINDS = ("llava-onevision", "llava", "qwen2.5-vl")

TILE = 28
"""Side of one vision tile in pixels (two 14-px patches): 4 image tokens per tile."""
PATCH = 14

_ONEVISION_TOKENS = {
    "pad": "<|endoftext|>",  # also Qwen2's bos id, though Qwen2 never prepends a bos token
    "im_start": "<|im_start|>",
    "eos": "<|im_end|>",
    "image": "<image>",
    "video": "<video>",
}
_LLAVA_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "image": "<image>"}
_QWEN_TOKENS = {
    "pad": "<|endoftext|>",  # also the bos id in the config, as in Qwen2.5-VL; never prepended
    "im_start": "<|im_start|>",
    "eos": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}
_TOKENS = {"llava-onevision": _ONEVISION_TOKENS, "llava": _LLAVA_TOKENS, "qwen2.5-vl": _QWEN_TOKENS}

QWEN_MIN_PIXELS = (2 * TILE) ** 2
"""Qwen2VLImageProcessor's default floor (56*56): smaller images are upscaled to 4 image tokens."""
QWEN_MAX_PIXELS = TILE * TILE * 16
"""At most about 16 image tokens (one per 28x28 block after the 2x2 merge) per image. Very
elongated images can exceed it: `smart_resize` keeps at least one 28-px block per side."""

# Images first, then videos, then text: the placeholder always precedes the prompt.
ONEVISION_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{{- ('\\n' if not loop.first else '') + part['text'] -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2.5-VL's own template, images first like the others: the default system turn when the
# conversation has none, and each image as <|vision_start|><|image_pad|><|vision_end|> with no
# separator before the text (the processor expands <|image_pad|> to one token per merged block).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{{- (' ' if not loop.first else '') + part['text'] -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_SENTENCES = (
    "The image shows a person standing in a park on a sunny day.",
    "A cat sleeps on a wooden table next to a cup of coffee.",
    "There is no content in this image that violates the policy.",
    "The picture contains a weapon and a threatening gesture.",
    "This photo depicts a crowded street market with fruit stalls.",
    "A child is drawing with colored pencils at a desk.",
    "The scene shows smoke rising from a burning building.",
    "Two people shake hands in front of an office building.",
    "The rationale must be short, factual and refer to the image.",
    "Safe content includes landscapes, food, animals and everyday objects.",
)

_README = """\
# Tiny RANDOM-weight {kind} checkpoint

Built offline by `policy_engine.backends.tiny` (recipe version {version}, seed {seed}) for tests and
dry runs. It has the same model, processor and tokenizer classes as the real {family}
checkpoints, at toy sizes, and loads through `AutoProcessor` / `AutoModelForImageTextToText`.

**The weights are RANDOM. Its verdicts are meaningless.** Never use it to judge content.

The tokenizer is a byte-level BPE trained on the shipped policies' prompts and answers: any text
(any byte) is encodable, but token counts differ from the real models'.
"""


def cache_root() -> Path:
    """The cache directory: `$POLICY_ENGINE_CACHE`, else `~/.cache/policy-engine`."""
    env = os.environ.get("POLICY_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "policy-engine"


def tiny_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of tiny checkpoint `name`, building it first if it is not in the cache.

    The result is `<cache>/models/<name>-<BUILD_VERSION>-<corpus digest>`, where `<cache>` is
    `cache_dir` or `cache_root()`: editing a shipped policy changes the tokenizer's training
    text, so it names a new build rather than reusing one that a fresh build would not equal.
    The model is built in a temporary sibling directory and renamed into place,
    so the target is either absent or complete; when a concurrent builder wins the race, this
    build is discarded and the winner's is returned (both are byte-identical anyway).
    """
    if name not in TINY_MODELS:
        known = ", ".join(sorted(TINY_MODELS))
        raise PolicyEngineError(f"unknown tiny model {name!r}; known: {known}")
    models = (cache_dir if cache_dir is not None else cache_root()) / "models"
    target = models / f"{name}-{BUILD_VERSION}-{corpus_digest()}"
    if _is_built(target):
        return target
    if target.exists():
        raise PolicyEngineError(
            f"{target} exists but is not a complete tiny model; delete it to rebuild"
        )
    models.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "building the tiny model %r into %s (once; it takes a little while)", name, models
    )
    _remove_stale_builds(models, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=models))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        build_tiny_model(staging, TINY_MODELS[name])
        for file in staging.iterdir():
            file.chmod(0o644)  # safetensors writes the weights owner-only
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_built(target):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_model(directory: Path, kind: str = "llava-onevision", seed: int = 0) -> Path:
    """Build a tiny random-weight checkpoint of `kind` into `directory`; return `directory`.

    `kind` is "llava-onevision" (LlavaGuard v1.1/v1.2 class), "llava" (v1.0 class) or "qwen2.5-vl"
    (QwenGuard class). Writes the model (safetensors, config, generation config), the processor
    (image/video processor, tokenizer, chat template) and a README saying the weights are random.
    Not atomic: use `tiny_model_path` for the cache.
    """
    if kind not in KINDS:
        raise PolicyEngineError(f"unknown tiny model kind {kind!r}; known: {', '.join(KINDS)}")
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = _TOKENS[kind]
    tokenizer = _build_tokenizer(kind, tokens)
    if kind == "llava-onevision":
        processor, model_factory = _onevision_parts(tokenizer, tokens)
    elif kind == "qwen2.5-vl":
        processor, model_factory = _qwen_parts(tokenizer, tokens)
    else:
        processor, model_factory = _llava_parts(tokenizer, tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory()
    with _quiet_progress_bars():
        model.save_pretrained(directory)
    processor.save_pretrained(directory)
    _write_readme(directory, kind, seed)
    return directory


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No "Writing model shards" bar on stderr for a checkpoint that is one small file."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "README.md").is_file()


def _remove_stale_builds(models: Path, target_name: str, max_age_s: float = 3600.0) -> None:
    """Remove staging directories that a killed builder left behind more than an hour ago."""
    now = time.time()
    for entry in models.glob(f".{target_name}.building-*"):
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _write_readme(directory: Path, kind: str, seed: int) -> None:
    family = "QwenGuard" if kind == "qwen2.5-vl" else "LlavaGuard"
    text = _README.format(kind=kind, family=family, version=BUILD_VERSION, seed=seed)
    (directory / "README.md").write_text(text, encoding="utf-8")


def corpus_digest() -> str:
    """Eight hex digits of sha256 over the tokenizer's training texts."""
    digest = hashlib.sha256("\x00".join(_corpus()).encode("utf-8"))
    return digest.hexdigest()[:8]


def _corpus() -> list[str]:
    """The tokenizer's training texts: each shipped policy's prompt and answers, a few sentences."""
    from policy_engine import get_host, load_policy, shipped_policies

    texts = list(_SENTENCES)
    for name in sorted(shipped_policies()):
        compiled = get_host().compile(load_policy(name))
        texts.append(compiled.prompt)
        for rating in ("Safe", "Unsafe"):
            for label in compiled.labels:
                answer = {"rating": rating, "category": label, "rationale": _SENTENCES[0]}
                texts.append(compiled.layout.dumps(answer))
    return texts


def _build_tokenizer(kind: str, tokens: dict[str, str]) -> Any:
    """A byte-level BPE (every byte encodable) wrapped as `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(tokens.values())
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    common: dict[str, Any] = {
        "tokenizer_object": backend,
        "eos_token": tokens["eos"],
        "pad_token": tokens["pad"],
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    if kind == "llava":
        bos = tokens["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
        return PreTrainedTokenizerFast(
            **common,
            bos_token=bos,
            unk_token=tokens["unk"],
            extra_special_tokens={"image_token": tokens["image"]},
            model_max_length=4096,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    video = {"image_token": tokens["image"], "video_token": tokens["video"]}
    if kind == "qwen2.5-vl":
        return PreTrainedTokenizerFast(
            **common,
            extra_special_tokens={
                **video,
                "vision_start_token": tokens["vision_start"],
                "vision_end_token": tokens["vision_end"],
            },
            model_max_length=131072,
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    return PreTrainedTokenizerFast(
        **common,
        extra_special_tokens={**video, "im_start_token": tokens["im_start"]},
        model_max_length=32768,
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


def _pinpoints(tile: int) -> list[list[int]]:
    """The OneVision anyres grid (1..6 tiles per side, like llava-onevision-qwen2-0.5b)."""
    return [[tile * h, tile * w] for h in range(1, 7) for w in range(1, 7)]


def _onevision_parts(tokenizer: Any, tokens: dict[str, str]) -> tuple[Any, Any]:
    from transformers import (
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in tokens.items()}
    pinpoints = _pinpoints(TILE)
    size = {"height": TILE, "width": TILE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
        image_token=tokens["image"],
        video_token=tokens["video"],
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=PATCH,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            bos_token_id=ids["pad"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    generation = GenerationConfig(
        bos_token_id=ids["pad"],
        eos_token_id=[ids["eos"], ids["pad"]],
        pad_token_id=ids["pad"],
    )

    def factory() -> Any:
        model = LlavaOnevisionForConditionalGeneration(config)
        model.generation_config = generation
        return model

    return processor, factory


def _llava_parts(tokenizer: Any, tokens: dict[str, str]) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in tokens.items()}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        num_additional_image_tokens=1,  # CLIP's CLS token
        vision_feature_select_strategy="default",  # drops the CLS token again
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=tokens["image"],
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TILE,
            patch_size=PATCH,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        image_token_index=ids["image"],
        image_seq_length=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    generation = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )

    def factory() -> Any:
        model = LlavaForConditionalGeneration(config)
        model.generation_config = generation
        return model

    return processor, factory


def _qwen_parts(tokenizer: Any, tokens: dict[str, str]) -> tuple[Any, Any]:
    """Qwen2.5-VL (QwenGuard's class): windowed ViT, 2x2 patch merger, 3-D multimodal RoPE."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in tokens.items()}
    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=size, patch_size=PATCH, temporal_patch_size=2, merge_size=TILE // PATCH
        ),
        video_processor=Qwen2VLVideoProcessor(
            size=size, patch_size=PATCH, temporal_patch_size=2, merge_size=TILE // PATCH
        ),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    text_hidden = 64
    config = Qwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=TILE // PATCH,
            temporal_patch_size=2,
            window_size=2 * TILE,  # 2x2 merged blocks per attention window
            fullatt_block_indexes=[1],  # block 0 windowed, block 1 full, like the real ViT
            out_hidden_size=text_hidden,
            tokens_per_second=2,
        ),
        text_config=Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            # 5x the usual 0.02: attention, hence the logits, then depend measurably on the 3-D
            # RoPE positions, so tests notice a continuation placed at the wrong positions
            initializer_range=0.1,
            # head_dim 16: 8 rotary frequencies split over (temporal, height, width)
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["pad"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,  # as in Qwen2.5-VL-3B, QwenGuard's base
    )
    generation = GenerationConfig(
        bos_token_id=ids["pad"],
        eos_token_id=[ids["eos"], ids["pad"]],
        pad_token_id=ids["pad"],
    )

    def factory() -> Any:
        model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config = generation
        return model

    return processor, factory
