"""A diffusers safety checker that moderates generated images by a policy.

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.safety_checker = PolicySafetyChecker(policy="children-platform", backend="transformers",
                                              backend_options={"model": "..."})
    out = pipe("a prompt")
    out.nsfw_content_detected          # the policy's decision, one bool per image
    pipe.safety_checker.last_decisions # the full Decisions of the last batch

Pipelines that have a safety-checker hook (StableDiffusionPipeline and its img2img, inpaint,
ControlNet, PAG, LCM and HunyuanDiT relatives) call `checker(images=..., clip_input=...)` after
decoding and expect `(images, has_nsfw_concept)` back. `clip_input` (CLIP features for
diffusers' own checker) is ignored: the policy's backend judges the pixels. What those pipelines
pass as `images`, read from their `run_safety_checker`:

- a torch tensor `N x C x H x W` straight from the VAE, in [-1, 1]. The pipeline then
  denormalizes to [0, 1] only the images reported *not* flagged (`do_denormalize`), so a flagged
  image comes back already in [0, 1] (zeros: black, as diffusers' checker does);
- a numpy array `N x H x W x C` in [0, 1] (pipelines that decode with `decode_latents`, and
  older diffusers releases).

SDXL-family pipelines have no such hook: `moderate_output(pipe(...))` moderates what they return
(PIL images, numpy or torch in [0, 1]) and gives back a `StableDiffusionPipelineOutput` with
`nsfw_content_detected`, as the hooked pipelines do.

What happens to an image follows the Decision (`treatment`): an error Decision (rating None)
is blocked (fail closed, never a silent Safe); otherwise a `block` action blacks it out, a
`blur` action blurs it, an `allow` action leaves it as it is; with none of these an Unsafe
image gets `unsafe_default` (block, as diffusers does) and a Safe one is untouched. An image is
reported flagged (`nsfw_content_detected`) when its rating is not Safe or the policy blocked or
blurred it.

torch, numpy and diffusers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image, ImageFilter

from ..errors import PolicyEngineError
from ..verdict import Decision

if TYPE_CHECKING:
    from ..backend import Backend
    from ..engine import Engine
    from ..policy import Policy

Treatment = Literal["block", "blur", "allow"]
TREATMENTS: tuple[Treatment, ...] = ("block", "blur", "allow")
"""In order of precedence: a Decision with several of these actions gets the first."""


def treatment(decision: Decision, unsafe_default: Treatment = "block") -> Treatment:
    """What to do with the image of `decision`: block (black out), blur, or allow."""
    if decision.rating is None:
        return "block"  # fail closed: an image that could not be judged is never shown
    names = {action.name for action in decision.actions}
    for name in TREATMENTS:
        if name in names:
            return name
    return unsafe_default if decision.rating == "Unsafe" else "allow"


def is_flagged(decision: Decision, treated: Treatment) -> bool:
    """`nsfw_content_detected` for one image: not rated Safe, or blocked or blurred."""
    return decision.rating != "Safe" or treated != "allow"


class PolicySafetyChecker:
    """A drop-in for diffusers' `StableDiffusionSafetyChecker`, judging by a policy.

    Give it an `Engine` (shared: never closed here), or a policy and a backend (with any other
    `Engine` keyword, such as `backend_options` or `mode`) to build one that `close()` closes.
    `metadata` goes with every image to the policy's post-processors. After each batch,
    `last_decisions` and `last_treatments` hold one entry per image, and `on_decisions` (if
    given) is called with the Decisions. Those attributes belong to the last call: give each
    pipeline that runs concurrently its own checker (they may share one Engine).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        policy: Policy | str | Path | None = None,
        backend: Backend | str | None = None,
        metadata: dict[str, Any] | None = None,
        on_decisions: Callable[[list[Decision]], None] | None = None,
        unsafe_default: Treatment = "block",
        blur_radius: float | None = None,
        **engine_options: Any,
    ) -> None:
        if engine is None:
            if policy is None or backend is None:
                raise PolicyEngineError(
                    "PolicySafetyChecker needs an Engine, or a policy and a backend"
                )
            from ..engine import Engine

            engine = Engine(policy, backend, **engine_options)
            self.owns_engine = True
        else:
            if policy is not None or backend is not None or engine_options:
                raise PolicyEngineError(
                    "PolicySafetyChecker takes an Engine or a policy and a backend, not both"
                )
            self.owns_engine = False
        if unsafe_default not in TREATMENTS:
            raise PolicyEngineError(
                f"unsafe_default must be one of {', '.join(TREATMENTS)}, not {unsafe_default!r}"
            )
        self.engine = engine
        self.metadata = dict(metadata or {})
        self.on_decisions = on_decisions
        self.unsafe_default: Treatment = unsafe_default
        self.blur_radius = blur_radius
        self.last_decisions: list[Decision] = []
        self.last_treatments: list[Treatment] = []

    # -- what diffusers calls --------------------------------------------------------------
    def __call__(self, images: Any, clip_input: Any = None, **_: Any) -> tuple[Any, list[bool]]:
        """`(images, has_nsfw_concept)` as diffusers' pipelines expect from their checker.

        A torch tensor is taken as the VAE's output in [-1, 1]: flagged images come back in
        [0, 1] (the pipeline skips denormalizing them), the others untouched. A numpy array is
        taken in [0, 1]."""
        return self._moderate(images, signed=True)

    def moderate(self, images: Any) -> tuple[Any, list[bool]]:
        """Moderate images as a pipeline returns them: a list of PIL images, a numpy array
        `N x H x W x C` or a torch tensor `N x C x H x W`, both in [0, 1]; the same type back."""
        return self._moderate(images, signed=False)

    def moderate_output(self, output: Any) -> Any:
        """Moderate what a pipeline without a safety-checker hook returned (SDXL and friends):
        a `StableDiffusionPipelineOutput` with the moderated images and
        `nsfw_content_detected`, or `(images, nsfw_content_detected)` for `return_dict=False`."""
        as_tuple = isinstance(output, tuple)
        images = output[0] if as_tuple else getattr(output, "images", None)
        if images is None:
            raise PolicyEngineError(f"cannot find images in a {type(output).__name__}")
        moderated, flags = self.moderate(images)
        if as_tuple:
            return moderated, flags
        from diffusers.pipelines.stable_diffusion.pipeline_output import (
            StableDiffusionPipelineOutput,
        )

        return StableDiffusionPipelineOutput(images=moderated, nsfw_content_detected=flags)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the engine if this checker built it."""
        if self.owns_engine:
            self.engine.close()

    def __enter__(self) -> PolicySafetyChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        policy = self.engine.policy
        return (
            f"PolicySafetyChecker(policy={policy.id!r}, version={policy.version!r}, "
            f"backend={self.engine.backend.name!r})"
        )

    # -- internals -------------------------------------------------------------------------
    def _judge(self, pictures: list[Image.Image]) -> list[tuple[Treatment, bool]]:
        decisions = list(self.engine.assess_many(pictures, metadata=self.metadata))
        treated = [treatment(d, self.unsafe_default) for d in decisions]
        self.last_decisions = decisions
        self.last_treatments = treated
        if self.on_decisions is not None:
            self.on_decisions(decisions)
        return [(t, is_flagged(d, t)) for d, t in zip(decisions, treated, strict=True)]

    def _blur(self, picture: Image.Image) -> Image.Image:
        radius = self.blur_radius
        if radius is None:
            radius = max(2.0, max(picture.size) / 32)
        return picture.filter(ImageFilter.GaussianBlur(radius))

    def _moderate(self, images: Any, *, signed: bool) -> tuple[Any, list[bool]]:
        if isinstance(images, list) and all(isinstance(i, Image.Image) for i in images):
            return self._moderate_pil(images)
        import numpy as np

        if isinstance(images, np.ndarray):
            return self._moderate_numpy(images)
        import torch

        if isinstance(images, torch.Tensor):
            return self._moderate_tensor(images, signed=signed)
        raise PolicyEngineError(
            "PolicySafetyChecker takes a torch tensor N x C x H x W, a numpy array N x H x W x C "
            f"or a list of PIL images, not {type(images).__name__}"
        )

    def _moderate_pil(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        pictures = [image.convert("RGB") for image in images]
        out = list(images)
        flags = []
        for index, (treated, flagged) in enumerate(self._judge(pictures)):
            flags.append(flagged)
            if treated == "block":
                out[index] = Image.new(images[index].mode, images[index].size)
            elif treated == "blur":
                out[index] = self._blur(images[index])
        return out, flags

    def _moderate_numpy(self, images: Any) -> tuple[Any, list[bool]]:
        _check_shape(images.shape, channels_last=True)
        out = images.copy()
        flags = []
        pictures = _to_pil(images)
        for index, (treated, flagged) in enumerate(self._judge(pictures)):
            flags.append(flagged)
            if treated != "allow":
                out[index] = self._treated(pictures[index], treated).astype(images.dtype)
        return out, flags

    def _moderate_tensor(self, images: Any, *, signed: bool) -> tuple[Any, list[bool]]:
        import torch

        _check_shape(tuple(images.shape), channels_last=False)
        unit = (images / 2 + 0.5).clamp(0, 1) if signed else images
        array = unit.detach().cpu().permute(0, 2, 3, 1).float().numpy()
        pictures = _to_pil(array)
        out = images.clone()
        flags = []
        for index, (treated, flagged) in enumerate(self._judge(pictures)):
            flags.append(flagged)
            if treated == "allow":
                if flagged and signed:  # the pipeline will not denormalize a flagged image
                    out[index] = unit[index]
                continue
            pixels = torch.from_numpy(self._treated(pictures[index], treated))
            out[index] = pixels.permute(2, 0, 1).to(device=images.device, dtype=images.dtype)
        return out, flags

    def _treated(self, picture: Image.Image, treated: Treatment) -> Any:
        """An H x W x 3 float32 array in [0, 1]: black, or the blurred picture."""
        import numpy as np

        if treated == "block":
            return np.zeros((picture.height, picture.width, 3), dtype=np.float32)
        return np.asarray(self._blur(picture), dtype=np.float32) / 255


def _check_shape(shape: tuple[int, ...], *, channels_last: bool) -> None:
    channels = shape[-1] if channels_last else (shape[1] if len(shape) == 4 else None)
    if len(shape) != 4 or channels != 3:
        layout = "N x H x W x 3" if channels_last else "N x 3 x H x W"
        raise PolicyEngineError(
            f"PolicySafetyChecker expects RGB images {layout}, got shape {tuple(shape)}"
            " (latents cannot be judged: decode them first)"
        )


def _to_pil(array: Any) -> list[Image.Image]:
    """N x H x W x 3 floats in [0, 1] to PIL images, rounded as diffusers' `numpy_to_pil`."""
    import numpy as np

    pixels = (np.clip(array, 0, 1) * 255).round().astype("uint8")
    return [Image.fromarray(p) for p in pixels]
