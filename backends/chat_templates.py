"""Chat templates for SGLang's native `/generate`, which takes the prompt as rendered text.

The built-ins reproduce SGLang's own conversation templates of the same names (what
`--chat-template NAME` gives a server, and what LlavaGuard's README relies on) byte for byte:
`render` is SGLang's `Conversation.get_prompt()` for one user turn (image, then the policy) and
the assistant's opening, and `continued` is the same conversation with a prefilled assistant
message left open, the text score mode sends. A Jinja file, or a checkpoint directory that ships
one, covers anything else.

Why `continued` matters: SGLang's OpenAI path (`serving_chat._apply_conversation_template`)
continues a prefilled assistant message only by stripping a trailing stop string or separator,
and only when the rendered text *ends* with one. CHATML (`chatml-llava`) ends a message with
`<|im_end|>\\n`, so nothing is stripped and the turn stays closed: the model then starts a new
turn instead of writing the rating. `sglang_continues()` says which templates SGLang continues,
and `jinja_source()` gives a Jinja template that renders exactly like a closing one but that
SGLang's Jinja path continues (`--chat-template FILE.jinja`).

Source: SGLang 0.5.23, `python/sglang/srt/parser/conversation.py` (`Conversation.get_prompt`,
`generate_chat_conv`, the registered templates) and
`python/sglang/srt/entrypoints/openai/serving_chat.py` (`_apply_conversation_template`,
`_apply_jinja_template`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policy_engine import BackendUnavailableError

JINJA_HINT = "pip install 'policy-engine[sglang]'"
Style = Literal["chatml", "add_colon_two", "add_new_line_single"]


@dataclass(frozen=True)
class ChatTemplate:
    """One of SGLang's conversation templates, as `conversation.py` registers it (the fields
    keep SGLang's names), for a single user turn: the image, then the policy text."""

    name: str
    style: Style  # SGLang's SeparatorStyle
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    stop_str: tuple[str, ...]
    image_token: str  # what generate_chat_conv inserts for an image_url part

    def get_prompt(self, messages: list[tuple[str, str | None]]) -> str:
        """SGLang's `Conversation.get_prompt` for these messages ((role, text or None))."""
        system = self.system_template.format(system_message=self.system_message)
        if self.style == "chatml":
            text = "" if system == "" else system + self.sep + "\n"
            for role, message in messages:
                text += f"{role}\n{message}{self.sep}\n" if message else f"{role}\n"
            return text
        if self.style == "add_new_line_single":
            text = "" if (not self.system_message or system == "") else system + self.sep
            for role, message in messages:
                text += f"{role}\n{message}{self.sep}" if message else f"{role}\n"
            return text
        seps = (self.sep, self.sep2 or "")
        text = system + seps[0]
        for index, (role, message) in enumerate(messages):
            text += f"{role}: {message}{seps[index % 2]}" if message else f"{role}:"
        return text

    def user_content(self, prompt: str) -> str:
        return self.image_token + prompt

    def render(self, prompt: str) -> str:
        """The text for `/generate`: the user turn and the assistant's opening."""
        return self.get_prompt([(self.roles[0], self.user_content(prompt)), (self.roles[1], None)])

    def continued(self, prompt: str, prefill: str) -> str:
        """The user turn and an assistant message that starts with `prefill` and goes on: the
        conversation with `prefill` as the assistant's message, without the separator that
        closes it (vicuna_v1.1: `ASSISTANT: ` + prefill; CHATML: `<|im_start|>assistant\\n` +
        prefill)."""
        user = (self.roles[0], self.user_content(prompt))
        text = self.get_prompt([user, (self.roles[1], prefill)])
        closing = self._closing(1)
        assert text.endswith(prefill + closing)
        return text[: len(text) - len(closing)]

    def _closing(self, index: int) -> str:
        """What get_prompt writes after the message at `index`."""
        if self.style == "chatml":
            return self.sep + "\n"
        if self.style == "add_new_line_single":
            return self.sep
        return (self.sep, self.sep2 or "")[index % 2]

    def sglang_continues(self) -> bool:
        """Whether SGLang's OpenAI path continues a prefilled assistant message under this
        template (`continue_final_message`): it renders the conversation with the message
        closed, then strips a trailing stop string, `sep` and `sep2`, each only when the text
        ends with it (serving_chat._apply_conversation_template)."""
        marker = "@@prefill@@"
        text = self.get_prompt([(self.roles[0], self.user_content("x")), (self.roles[1], marker)])
        for stop in self.stop_str:
            if text.endswith(stop):
                text = text[: -len(stop)]
        for separator in (self.sep, self.sep2):
            if separator and text.endswith(separator):
                text = text[: -len(separator)]
        return text.endswith(marker)


_CHATML_SYSTEM = "<|im_start|>system\n{system_message}"
TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(  # LlavaGuard v1.2 (OneVision, Qwen2) and the 34B (Yi) checkpoints
            name="chatml-llava",
            style="chatml",
            system_template=_CHATML_SYSTEM,
            system_message="You are a helpful assistant.",
            roles=("<|im_start|>user", "<|im_start|>assistant"),
            sep="<|im_end|>",
            sep2=None,
            stop_str=("<|endoftext|>", "<|im_end|>"),
            image_token="<image>\n",
        ),
        ChatTemplate(  # LlavaGuard 7B and 13B (LLaVA 1.5, Vicuna)
            name="vicuna_v1.1",
            style="add_colon_two",
            system_template="{system_message}",
            system_message="A chat between a curious user and an artificial intelligence "
            "assistant. The assistant gives helpful, detailed, and polite answers to the user's "
            "questions.",
            roles=("USER", "ASSISTANT"),
            sep=" ",
            sep2="</s>",
            stop_str=(),
            image_token="<image>\n",
        ),
        ChatTemplate(  # QwenGuard (Qwen2.5-VL)
            name="qwen2-vl",
            style="add_new_line_single",
            system_template=_CHATML_SYSTEM,
            system_message="You are a helpful assistant.",
            roles=("<|im_start|>user", "<|im_start|>assistant"),
            sep="<|im_end|>\n",
            sep2=None,
            stop_str=("<|im_end|>",),
            image_token="<|vision_start|><|image_pad|><|vision_end|>",  # no newline for qwen2-vl
        ),
    )
}

# Jinja twins of the templates SGLang closes (see the module docstring): the same bytes for a
# user turn, an image part and the generation prompt, and SGLang's Jinja path continues a
# prefilled assistant message (it renders the turns before it with the generation prompt and
# appends the prefill's tokens). Newlines are written as '\n' inside string literals so the file
# means the same to SGLang's loader (which turns a literal backslash-n into a newline) and to
# transformers' (which does not); the whitespace control keeps the file's own line breaks out.
_CHATML_LLAVA_JINJA = """\
{#- chatml-llava as SGLang's conversation template renders it, for --chat-template FILE.jinja -#}
{%- set ns = namespace(system='You are a helpful assistant.') -%}
{%- for message in messages if message['role'] == 'system' -%}
    {%- if message['content'] is string -%}
        {%- set ns.system = message['content'] -%}
    {%- else -%}
        {%- set ns.system = message['content'][0]['text'] -%}
    {%- endif -%}
{%- endfor -%}
{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}
{%- for message in messages if message['role'] != 'system' -%}
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] in ('image', 'image_url') -%}
                {{- '<image>\\n' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
JINJA_SOURCES = {"chatml-llava": _CHATML_LLAVA_JINJA}


def jinja_source(name: str) -> str:
    """A Jinja chat template that renders like SGLang's template `name` and under which SGLang
    continues a prefilled assistant message (for `--chat-template FILE.jinja`)."""
    try:
        return JINJA_SOURCES[name]
    except KeyError:
        raise BackendUnavailableError(
            f"no Jinja twin of {name!r}: SGLang continues {name!r} as it is"
            if name in TEMPLATES and TEMPLATES[name].sglang_continues()
            else f"no Jinja twin of {name!r}; twins: {', '.join(JINJA_SOURCES)}"
        ) from None


class JinjaTemplate:
    """An HF chat template (a Jinja file, or the one a checkpoint directory ships)."""

    def __init__(self, path: Path | None = None, *, source: str | None = None) -> None:
        if source is None:
            if path is None:
                raise ValueError("a JinjaTemplate needs a path or a source")
            source = _jinja_source(path)
        self.name = str(path) if path is not None else "jinja"
        self.source = source
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
            raise BackendUnavailableError(f"chat template {self.name}: {err}") from None

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

    def continued(self, prompt: str, prefill: str) -> str:
        """What SGLang's Jinja path gives for a continued assistant message: the turns before it
        with the generation prompt, then the prefill."""
        return self.render(prompt) + prefill


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


def main(argv: list[str] | None = None) -> int:
    """`python -m policy_engine.backends.chat_templates chatml-llava > chatml-llava.jinja`:
    print a template's Jinja twin, for SGLang's --chat-template."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in JINJA_SOURCES:
        print(
            "usage: python -m policy_engine.backends.chat_templates "
            f"{{{','.join(JINJA_SOURCES)}}} > FILE.jinja",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(JINJA_SOURCES[args[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
