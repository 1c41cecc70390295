"""Chat templates for SGLang's native `/generate`, which takes the prompt as rendered text.

The built-ins are SGLang's own templates of the same names (what `--chat-template NAME` gives
a server, and what LlavaGuard's README relies on); a Jinja file, or a checkpoint directory that
ships one, covers anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from policy_engine.errors import BackendUnavailableError

JINJA_HINT = "pip install 'policy-engine[sglang]'"


@dataclass(frozen=True)
class ChatTemplate:
    """A single-turn chat template as SGLang names them: system, user (image then text), and
    the assistant's opening. `render` gives the text `/generate` expects."""

    name: str
    system: str
    system_affixes: tuple[str, str]
    user_affixes: tuple[str, str]
    assistant_prefix: str
    image_token: str

    def render(self, prompt: str) -> str:
        head = (
            f"{self.system_affixes[0]}{self.system}{self.system_affixes[1]}" if self.system else ""
        )
        user = f"{self.user_affixes[0]}{self.image_token}{prompt}{self.user_affixes[1]}"
        return head + user + self.assistant_prefix


_CHATML = ("<|im_start|>system\n", "<|im_end|>\n")
TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(  # LlavaGuard v1.2 (OneVision, Qwen2) and the 34B (Yi) checkpoints
            "chatml-llava",
            "You are a helpful assistant.",
            _CHATML,
            ("<|im_start|>user\n", "<|im_end|>\n"),
            "<|im_start|>assistant\n",
            "<image>\n",
        ),
        ChatTemplate(  # LlavaGuard 7B and 13B (LLaVA 1.5, Vicuna)
            "vicuna_v1.1",
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            ("", " "),
            ("USER:", " "),
            "ASSISTANT:",
            " <image>\n",
        ),
        ChatTemplate(  # QwenGuard (Qwen2.5-VL)
            "qwen2-vl",
            "You are a helpful assistant.",
            _CHATML,
            ("<|im_start|>user\n", "<|im_end|>\n"),
            "<|im_start|>assistant\n",
            "<|vision_start|><|image_pad|><|vision_end|>",
        ),
    )
}


class JinjaTemplate:
    """An HF chat template (a Jinja file, or the one a checkpoint directory ships)."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.source = _jinja_source(path)
        try:
            import jinja2
            import jinja2.sandbox
        except ImportError:
            raise BackendUnavailableError(
                f"a Jinja chat template needs jinja2: {JINJA_HINT}"
            ) from None
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self.template = env.from_string(self.source)
        except jinja2.TemplateError as err:
            raise BackendUnavailableError(f"chat template {path}: {err}") from None

    def render(self, prompt: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return str(
            self.template.render(
                messages=[{"role": "user", "content": content}],
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
            )
        )


def _jinja_source(path: Path) -> str:
    if path.is_dir():
        for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            candidate = path / name
            if candidate.is_file():
                if name.endswith(".jinja"):
                    return candidate.read_text(encoding="utf-8")
                template = json.loads(candidate.read_text(encoding="utf-8")).get("chat_template")
                if isinstance(template, str):
                    return template
        raise BackendUnavailableError(f"chat template: {path} holds no chat template")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise BackendUnavailableError(f"chat template {path}: {err.strerror}") from None


def template_for(name: str, model_path: str | None) -> ChatTemplate | JinjaTemplate:
    """The chat template the native transport renders: a name, a path, or guessed ('auto')."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name != "auto":
        path = Path(name).expanduser()
        if path.exists():
            return JinjaTemplate(path)
        raise BackendUnavailableError(
            f"unknown chat template {name!r}; templates: {', '.join(TEMPLATES)}, "
            "or a Jinja file or checkpoint directory"
        )
    guessed = guess_template(model_path or "")
    if guessed is None:
        raise BackendUnavailableError(
            f"cannot tell the chat template of model {model_path!r}; pass "
            f"-o chat_template=NAME ({', '.join(TEMPLATES)}) or a Jinja file"
        )
    return TEMPLATES[guessed]


def guess_template(model_path: str) -> str | None:
    """The SGLang template name for a checkpoint path, from its name alone."""
    name = model_path.lower()
    if "qwen" in name and ("vl" in name or "guard" in name):
        return "qwen2-vl"
    if any(k in name for k in ("-ov", "onevision", "v1.2", "34b", "v1.6")):
        return "chatml-llava"
    if any(k in name for k in ("llavaguard-7b", "llavaguard-13b", "llava-v1.5", "llava-1.5")):
        return "vicuna_v1.1"
    if "vicuna" in name:
        return "vicuna_v1.1"
    return None
