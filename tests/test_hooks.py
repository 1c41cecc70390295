"""Meta-tests for the plugin API (after datasette's): every hookspec is documented in its
docstring and in docs/plugins.md, and has a `test_hook_<name>` here that drives it through the
engine, the host or the CLI, the way a plugin would meet it."""

from __future__ import annotations

import inspect
import io
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Decision,
    Generation,
    PluginHost,
    Policy,
    PolicyEngineError,
    PostProcessor,
    PromptFormat,
    Register,
    StepContext,
    get_host,
    hookimpl,
    hookspecs,
    load_policy,
)
from policy_engine.cli import build_cli, cli
from policy_engine.engine import Engine
from policy_engine.formats.generic import GenericFormat
from policy_engine.host import set_host

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
SPEC_MARK = "policy_engine_spec"  # set by pluggy's HookspecMarker("policy_engine")

HOOKS = sorted(
    name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, SPEC_MARK)
)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- meta ------------------------------------------------------------------------------------


def test_hookspecs_are_the_known_api() -> None:
    # A new hook must be added here on purpose, with docs and a test_hook_<name>.
    assert HOOKS == [
        "observe_decision",
        "register_backends",
        "register_commands",
        "register_postprocessors",
        "register_prompt_formats",
        "startup",
    ]
    assert PluginHost(load_entry_points=False).hook_names() == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspec_docstring_names_every_argument(hook: str) -> None:
    spec = getattr(hookspecs, hook)
    doc = inspect.getdoc(spec)
    assert doc, f"hookspec {hook} has no docstring"
    for arg in inspect.signature(spec).parameters:
        assert re.search(rf"`{re.escape(arg)}\b", doc), f"{hook}'s docstring does not name `{arg}`"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    headings = [line for line in docs.splitlines() if line.startswith("#")]
    assert any(f"`{hook}(" in line or f"`{hook}`" in line for line in headings), (
        f"docs/plugins.md has no heading for hook {hook}"
    )
    for arg in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f"{hook}({arg}" in docs, f"docs/plugins.md does not show {hook}'s argument {arg}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    test = globals().get(f"test_hook_{hook}")
    assert callable(test), f"tests/test_hooks.py has no test_hook_{hook}"


def test_no_test_for_a_hook_that_does_not_exist() -> None:
    tests = [name[len("test_hook_") :] for name in globals() if name.startswith("test_hook_")]
    assert sorted(set(tests) - {"is_documented", "has_a_test"}) == HOOKS


# --- one test per hook -----------------------------------------------------------------------


class Canned(Backend):
    """Replies with one fixed, valid llavaguard-v1.2 answer."""

    name = "canned"
    capabilities = Capabilities(batching=True, max_batch_size=8)

    def generate(self, batch: Batch) -> list[Generation]:
        self.seen = [batch.compiled.policy.id for _ in batch]
        answer = '{"rating": "Unsafe", "category": "O3: Sexual Content", "rationale": "canned"}'
        return [Generation(text=answer, model="canned-1") for _ in batch]


def test_hook_register_backends() -> None:
    class Plugin:
        @hookimpl
        def register_backends(self, register: Register[type[Backend]]) -> None:
            register(Canned)

    host = PluginHost()
    host.register(Plugin(), name="canned-plugin")
    assert host.backends()["canned"].plugin == "canned-plugin"
    with Engine("llavaguard", "canned", host=host) as engine:
        assert isinstance(engine.backend, Canned)
        assert engine.batch_size == 8  # the engine reads the registered class's capabilities
        decisions = list(engine.assess_many([png(), png()]))
    assert [d.rating for d in decisions] == ["Unsafe", "Unsafe"]
    assert decisions[0].category_id == "O3"
    assert decisions[0].verdict.model == "canned-1"
    assert engine.backend.seen == ["llavaguard", "llavaguard"]


def test_hook_register_prompt_formats(tmp_path: Path) -> None:
    class Marked(GenericFormat):
        name = "marked"

        def render(self, policy: Policy) -> str:
            return "MARKED\n" + super().render(policy)

    class Plugin:
        @hookimpl
        def register_prompt_formats(self, register: Register[type[PromptFormat]]) -> None:
            register(Marked)

    host = PluginHost()
    host.register(Plugin(), name="marked-plugin")
    path = tmp_path / "marked.yaml"
    path.write_text("extends: llavaguard\nid: marked\nprompt_format: marked\n", encoding="utf-8")
    engine = Engine(
        path, "static", backend_options={"rating": "Unsafe", "category": "O1"}, host=host
    )
    assert engine.compiled.prompt.startswith("MARKED\nYou are a content-safety reviewer.")
    decision = engine.assess(png())  # the static backend answers in the format's layout
    assert decision.verdict.ok
    assert decision.category_id == "O1"

    # Without the plugin, the policy does not load, and the error names the installed formats.
    with pytest.raises(Exception, match="unknown prompt format 'marked'; installed: generic"):
        load_policy(path, host=PluginHost())


def test_hook_register_postprocessors(tmp_path: Path) -> None:
    class Stamp(PostProcessor):
        name = "stamp"

        def __call__(self, decision: Decision, context: StepContext) -> None:
            context.add_action("stamp", mode=context.mode)
            context.note(f"seen {len(decision.actions)} actions")

    class Explode(PostProcessor):
        name = "explode"

        def __call__(self, decision: Decision, context: StepContext) -> None:
            raise ValueError("boom")

    class Plugin:
        @hookimpl
        def register_postprocessors(self, register: Register[type[PostProcessor]]) -> None:
            register(Stamp)
            register(Explode)

    host = PluginHost()
    host.register(Plugin(), name="stamp-plugin")
    path = tmp_path / "stamped.yaml"
    path.write_text(
        "extends: llavaguard\n"
        "id: stamped\n"
        "postprocess:\n"
        "  - {name: escalate, params: {action: block}}\n"
        "  - {name: explode, id: fragile}\n"
        "  - {name: stamp}\n",
        encoding="utf-8",
    )
    decision = Engine(
        path, "static", backend_options={"rating": "Unsafe", "category": "O2"}, host=host
    ).assess(png())
    # policy order, then the default failure policy (fail-closed: human review)
    assert [a.name for a in decision.actions] == ["block", "stamp", "human_review"]
    assert decision.actions[1].params == {"mode": "full"}
    assert [a.by for a in decision.actions] == ["0:escalate", "2:stamp", "postprocess-failure"]
    assert [t.step for t in decision.trace] == [
        "0:escalate",
        "fragile",
        "2:stamp",
        "postprocess-failure",
    ]
    failure = decision.trace[1]
    assert failure.error and failure.message == "post-processor failed: ValueError: boom"
    assert decision.rating == "Unsafe"  # a failing post-processor never loses the verdict
    assert not decision.ok


def test_hook_register_commands() -> None:
    class Plugin:
        @hookimpl
        def register_commands(self, cli: click.Group) -> None:
            @cli.command(name="hooktest-hello")
            @click.argument("who")
            def hello(who: str) -> None:
                """Say hello (test plugin)."""
                click.echo(f"hello {who}")

    host = PluginHost()
    host.register(Plugin(), name="command-plugin")
    previous = set_host(host)
    try:
        group = build_cli()
        assert group is cli
        runner = CliRunner()
        result = runner.invoke(group, ["hooktest-hello", "plugins"])
        listing = runner.invoke(group, ["--help"])
    finally:
        set_host(previous)
        cli.commands.pop("hooktest-hello", None)
    assert result.exit_code == 0, result.output
    assert result.output == "hello plugins\n"
    assert "hooktest-hello" in listing.output
    assert "Say hello (test plugin)." in listing.output
    assert "hooktest-hello" not in cli.commands


def test_hook_observe_decision() -> None:
    seen: list[Decision] = []

    class Sink:
        @hookimpl
        def observe_decision(self, decision: Decision) -> None:
            seen.append(decision)

    host = get_host()
    host.register(Sink(), name="test-sink")
    try:
        engine = Engine(
            "llavaguard", "static", backend_options={"rating": "Unsafe", "category": "O2"}
        )
        decision = engine.assess(png())
        broken = engine.assess(b"not an image")
    finally:
        host.unregister("test-sink")
    assert seen == [decision, broken]
    assert seen[0] is decision  # the very object the engine returns, after post-processing
    assert decision.rating == "Unsafe"
    assert not broken.verdict.ok  # error decisions are observed too
    Engine("llavaguard", "static").assess(png())
    assert len(seen) == 2  # unregistered: sees nothing more


def test_hook_startup() -> None:
    """Called once when the host loads, with the host; a PolicyEngineError there is the
    configuration problem every later use reports."""
    calls: list[PluginHost] = []

    class Checks:
        @hookimpl
        def startup(self, host: PluginHost) -> None:
            calls.append(host)
            if len(calls) == 1:
                return
            raise PolicyEngineError("POLICY_ENGINE_EXAMPLE is not set")

    host = PluginHost(load_entry_points=False)
    host.pm.register(Checks(), name="checks")  # before loading, as an entry point would be
    host.ensure_loaded()
    host.ensure_loaded()
    assert calls == [host]  # once, however often the host is asked

    failing = PluginHost(load_entry_points=False)
    calls.append(failing)  # the next call raises
    failing.pm.register(Checks(), name="checks")
    with pytest.raises(PolicyEngineError, match="POLICY_ENGINE_EXAMPLE is not set"):
        failing.backends()
    with pytest.raises(PolicyEngineError, match="POLICY_ENGINE_EXAMPLE is not set"):
        failing.backends()  # every use says it, not only the first


def test_the_stable_api_in_the_docs_is_exactly_what_policy_engine_exports() -> None:
    import policy_engine

    docs = DOCS.read_text(encoding="utf-8")
    section = docs[docs.index("## What is stable") : docs.index("and, for commands that run")]
    listed = set(re.findall(r"`([A-Za-z_]+)`", section)) - {"policy_engine", "__all__"}
    assert listed == set(policy_engine.__all__)
    for name in policy_engine.__all__:
        getattr(policy_engine, name)  # every exported name resolves (lazy ones too)
    assert policy_engine.__version__ != "0+unknown"  # from the installed distribution
