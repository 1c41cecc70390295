"""The hook implementations (re-exported by the package, which the entry point names)."""

from __future__ import annotations

from policy_engine import Backend, PostProcessor, Register, hookimpl

from pe_brightness.backend import BrightnessBackend
from pe_brightness.night_review import NightReview


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(BrightnessBackend)


@hookimpl
def register_postprocessors(register: Register[type[PostProcessor]]) -> None:
    register(NightReview)
