"""Built-in prompt formats, registered through the entry point like any plugin."""

from __future__ import annotations

from ..hookspecs import Register, hookimpl
from .base import PromptFormat
from .generic import GenericFormat
from .llavaguard import LlavaGuardV10, LlavaGuardV12


@hookimpl
def register_prompt_formats(register: Register[type[PromptFormat]]) -> None:
    register(LlavaGuardV12)
    register(LlavaGuardV10)
    register(GenericFormat)
