"""Tiny random-weight diffusers pipelines, built offline from configs.

`tiny_sd(path)` saves a Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, a CLIPTokenizer over a vocabulary written here, a DDIM scheduler and a
CLIPImageProcessor) with `save_pretrained`, so tests load it back through
`StableDiffusionPipeline.from_pretrained` exactly as a hub checkpoint is loaded. `tiny_sdxl(path)`
does the same for StableDiffusionXLPipeline (two text encoders, a UNet with SDXL's added
time/text conditioning). Sizes are toys: a 32x32 image in a couple of steps takes well under a
second on a CPU. The weights are random; the VAE's last layer is tinted red so that generated
images have a clearly positive, seed-dependent redness (tests/colour_backend.py reads it).

The docs' example (scripts/diffusers_example.py) and bench/diffusers_checker.py use the same
recipe.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

SIZE = 32
"""Image side in pixels (the VAE halves it once: 16x16 latents)."""
STEPS = 2
"""Denoising steps: enough to run the whole loop, few enough to be quick."""

_TEXT = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

# the UNet both pipelines share: two levels, the second with cross-attention
_UNET: dict[str, Any] = {
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "sample_size": SIZE // 2,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes (the alphabet CLIP's BPE works on)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def make_tokenizer() -> Any:
    """A CLIPTokenizer over every byte (alone and word-final) plus a few merges, from files
    written here."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        return _tokenizer(Path(tmp), CLIPTokenizer)


def _tokenizer(folder: Path, cls: Any) -> Any:
    letters = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"]
    tokens += [c for c in letters if c not in tokens] + [c + "</w>" for c in letters]
    merges = ["a t", "c a", "ca t</w>", "d o", "do g</w>"]
    tokens += ["at", "ca", "cat</w>", "do", "dog</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return cls(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _vae(seed: int) -> Any:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=SIZE,
    )
    with torch.no_grad():  # a red tint: pixels lean to red, by how much depends on the latents
        vae.decoder.conv_out.bias.copy_(torch.tensor([0.5, -0.5, -0.5]))
    return vae


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _feature_extractor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=SIZE, size={"shortest_edge": SIZE})


def tiny_sd(path: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (no safety checker) under `path`; returns `path`."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET,
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, **_TEXT))
    pipe = StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=_feature_extractor(),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionXLPipeline under `path`; returns `path`."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=2,
    )
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=1000, hidden_act="gelu", **_TEXT)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    tokenizer = make_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


def call_kwargs(seed: int = 0, **extra: Any) -> dict[str, Any]:
    """Arguments for a quick, deterministic pipeline call."""
    import torch

    return {
        "prompt": "a cat",
        "num_inference_steps": STEPS,
        "height": SIZE,
        "width": SIZE,
        "guidance_scale": 1.0,
        "generator": torch.Generator("cpu").manual_seed(seed),
        **extra,
    }
