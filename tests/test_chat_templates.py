"""The native transport's chat templates render exactly as SGLang does (golden strings), and the
Jinja twin of chatml-llava renders the same bytes through both loaders.

The golden strings were produced by running SGLang 0.5.23's own `srt/parser/conversation.py`
(`generate_chat_conv`, `Conversation.get_prompt`) and the strip of
`srt/entrypoints/openai/serving_chat.py` (`_apply_conversation_template`) on a request with one
user message (an image_url part, then the text PROMPT) and, for `sglang_openai`, a final
assistant message PREFILL with `continue_final_message`, outside this repository (importing
SGLang needs torch and CUDA builds; its code is not copied here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policy_engine.backends.chat_templates import (
    JINJA_SOURCES,
    TEMPLATES,
    JinjaTemplate,
    jinja_source,
    main,
    template_for,
)

from policy_engine import get_host
from policy_engine.errors import BackendUnavailableError
from policy_engine.loader import load_policy

PROMPT = "Assess this image.\nO1: x"
PREFILL = '{\n    "rating": "'
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
CHATML_HEAD = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_HEAD = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
)
GOLDEN = {
    # name: (SGLang's generation prompt, what its openai path builds for the continued prefill)
    "chatml-llava": (CHATML_HEAD, CHATML_HEAD + PREFILL + "<|im_end|>\n"),
    "vicuna_v1.1": (
        f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:",
        f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT: {PREFILL}",
    ),
    "qwen2-vl": (QWEN_HEAD, QWEN_HEAD + PREFILL),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_as_sglang_does(name: str) -> None:
    render, sglang_openai = GOLDEN[name]
    template = TEMPLATES[name]
    assert template.render(PROMPT) == render
    continued = template.continued(PROMPT, PREFILL)
    if template.sglang_continues():
        assert continued == sglang_openai  # byte for byte what SGLang sends the model
    else:
        # SGLang leaves the turn closed; the native text is the open turn it should have been
        assert sglang_openai == continued + "<|im_end|>\n"
    assert continued.endswith(PREFILL)


def test_which_templates_sglang_continues() -> None:
    """vicuna_v1.1 ends a message with sep2 '</s>' and qwen2-vl with sep '<|im_end|>\\n':
    stripped. CHATML ends with '<|im_end|>\\n', which is neither its stop string nor its sep."""
    assert {n: t.sglang_continues() for n, t in TEMPLATES.items()} == {
        "chatml-llava": False,
        "vicuna_v1.1": True,
        "qwen2-vl": True,
    }


def test_vicuna_answers_after_a_space() -> None:
    """The score text is 'ASSISTANT: {', as SGLang renders an assistant message, not
    'ASSISTANT:{' (the generation prompt plus the prefix)."""
    compiled = get_host().compile(load_policy("llavaguard-v1.0"))
    prefix = compiled.layout_for("score").prefix()
    text = TEMPLATES["vicuna_v1.1"].continued(compiled.prompt, prefix)
    assert text.endswith(" ASSISTANT: " + prefix)
    assert text == TEMPLATES["vicuna_v1.1"].render(compiled.prompt) + " " + prefix


def sglang_loads(source: str) -> str:
    """What SGLang's TemplateManager._load_jinja_template makes of a .jinja file's text."""
    return source.strip("\n").replace("\\n", "\n")


@pytest.mark.parametrize("loader", ["as written", "as SGLang loads it"])
def test_the_jinja_twin_renders_like_chatml_llava(loader: str) -> None:
    source = jinja_source("chatml-llava")
    if loader != "as written":
        source = sglang_loads(source)
    twin = JinjaTemplate(source=source)
    chatml = TEMPLATES["chatml-llava"]
    compiled = get_host().compile(load_policy("llavaguard"))
    for prompt in (PROMPT, compiled.prompt):
        assert twin.render(prompt) == chatml.render(prompt)
        # SGLang's Jinja path: the turns before the prefill with the generation prompt, then it
        assert twin.continued(prompt, PREFILL) == chatml.render(prompt) + PREFILL
    # a request's own system message replaces the default, as in the conversation template
    system = twin.template.render(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        add_generation_prompt=False,
    )
    assert system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_the_twin_is_detected_as_multimodal_by_sglang() -> None:
    """detect_jinja_template_content_format: a template that names 'image' gets OpenAI-style
    content parts ({"type": "image"}, {"type": "text", ...}), which the twin renders."""
    assert "image" in JINJA_SOURCES["chatml-llava"]
    assert "\\n" not in sglang_loads(JINJA_SOURCES["chatml-llava"])


def test_the_twin_is_printed_for_a_launch_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chatml-llava"]) == 0
    assert capsys.readouterr().out == JINJA_SOURCES["chatml-llava"]
    assert main(["nope"]) == 2
    assert "usage:" in capsys.readouterr().err
    with pytest.raises(BackendUnavailableError, match=r"SGLang continues 'vicuna_v1\.1' as it is"):
        jinja_source("vicuna_v1.1")


def test_a_twin_file_is_a_native_template(tmp_path: Path) -> None:
    path = tmp_path / "chatml-llava.jinja"
    path.write_text(JINJA_SOURCES["chatml-llava"])
    template = template_for(str(path), None)
    assert isinstance(template, JinjaTemplate)
    assert template.render(PROMPT) == GOLDEN["chatml-llava"][0]
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": JINJA_SOURCES["chatml-llava"]})
    )
    path.unlink()
    assert template_for(str(tmp_path), None).render(PROMPT) == GOLDEN["chatml-llava"][0]
