"""The plugin host: registration rules, error messages, introspection, entry-point loading, the
allow/block lists and hook tracing. Plugins are small classes with @hookimpl methods registered
on fresh hosts; entry points come from throwaway dist-info directories on a temporary path."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image
from support import run_cli, write_dist_info

from policy_engine import (
    Backend,
    Batch,
    Decision,
    Generation,
    PluginError,
    PluginHost,
    PostProcessor,
    PromptFormat,
    UnknownNameError,
    get_host,
    hookimpl,
)
from policy_engine.cli import cli
from policy_engine.engine import Engine
from policy_engine.host import set_host

BUILTINS = {
    "builtin-cascade",
    "builtin-ensemble",
    "builtin-escalation",
    "builtin-formats",
    "builtin-severity",
    "builtin-sglang",
    "builtin-sinks",
    "builtin-tui",
    "builtin-static",
    "builtin-thresholds",
    "builtin-transformers",
}


# --- helpers ---------------------------------------------------------------------------------


class EchoBackend(Backend):
    name = "echo"
    description = "test backend"

    def generate(self, batch: Batch) -> list[Generation]:
        return [Generation(error="echo never answers") for _ in batch]


class OtherEcho(Backend):
    name = "echo"


class Noop(PostProcessor):
    name = "noop"

    def __call__(self, decision: Decision, context: dict[str, object]) -> None:
        decision.note("noop", "nothing")


class BackendPlugin:
    def __init__(self, *classes: object) -> None:
        self.classes = classes

    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        for cls in self.classes:
            register(cls)


class PostprocessorPlugin:
    def __init__(self, *classes: object) -> None:
        self.classes = classes

    @hookimpl
    def register_postprocessors(self, register):  # type: ignore[no-untyped-def]
        for cls in self.classes:
            register(cls)


class FormatPlugin:
    def __init__(self, *classes: object) -> None:
        self.classes = classes

    @hookimpl
    def register_prompt_formats(self, register):  # type: ignore[no-untyped-def]
        for cls in self.classes:
            register(cls)


def bare_host(**plugins: object) -> PluginHost:
    host = PluginHost(load_entry_points=False)
    for name, plugin in plugins.items():
        host.register(plugin, name=name)
    return host


def make_dist(
    root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str] | None = None
) -> Path:
    """Write an installed distribution (dist-info and modules) into `root`, as pip would."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    write_dist_info(root, name, "1.2.3", {"policy_engine": entry_points})
    return root


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def default_host_plugin() -> Iterator[list[str]]:
    """Names appended to the list are unregistered from the default host afterwards."""
    names: list[str] = []
    try:
        yield names
    finally:
        for name in names:
            get_host().unregister(name)


# --- registration rules ----------------------------------------------------------------------


def test_duplicate_name_names_both_plugins() -> None:
    host = bare_host(first=BackendPlugin(EchoBackend), second=BackendPlugin(OtherEcho))
    with pytest.raises(PluginError) as caught:
        host.backends()
    message = str(caught.value)
    assert "backend 'echo' is registered twice" in message
    assert "'first'" in message and "'second'" in message
    assert caught.value.exit_code == 2


def test_duplicate_of_a_builtin_names_the_builtin() -> None:
    class Impostor(Backend):
        name = "static"

    host = PluginHost()
    host.register(BackendPlugin(Impostor), name="impostor")
    with pytest.raises(PluginError) as caught:
        host.backend("static")
    assert "'builtin-static'" in str(caught.value)
    assert "'impostor'" in str(caught.value)


def test_same_plugin_registering_a_name_twice_is_rejected() -> None:
    host = bare_host(twice=PostprocessorPlugin(Noop, Noop))
    with pytest.raises(PluginError, match="post-processor 'noop' is registered twice"):
        host.postprocessors()


def test_same_name_in_different_registries_is_fine() -> None:
    class NoopFormat(PromptFormat):
        name = "noop"

    host = bare_host(p=PostprocessorPlugin(Noop), f=FormatPlugin(NoopFormat))
    assert host.postprocessor("noop") is Noop
    assert host.prompt_format("noop") is NoopFormat


@pytest.mark.parametrize(
    ("plugin", "method", "expected"),
    [
        (BackendPlugin(Noop), "backends", "expected a subclass of Backend"),
        (BackendPlugin(EchoBackend()), "backends", "expected a subclass of Backend"),
        (PostprocessorPlugin(EchoBackend), "postprocessors", "a subclass of PostProcessor"),
        (FormatPlugin("generic"), "prompt_formats", "expected a subclass of PromptFormat"),
    ],
)
def test_registering_a_non_subclass_is_rejected(plugin: object, method: str, expected: str) -> None:
    host = bare_host(wrong=plugin)
    with pytest.raises(PluginError) as caught:
        getattr(host, method)()
    assert expected in str(caught.value)
    assert "plugin 'wrong' registered" in str(caught.value)


def test_registering_a_class_without_a_name_is_rejected() -> None:
    class Nameless(Backend):
        pass

    host = bare_host(anon=BackendPlugin(Nameless))
    with pytest.raises(PluginError, match="plugin 'anon' registered a backend without a name"):
        host.backends()


def test_a_registration_error_is_a_clean_cli_error() -> None:
    host = bare_host(first=BackendPlugin(EchoBackend), second=BackendPlugin(OtherEcho))
    previous = set_host(host)
    try:
        result = CliRunner().invoke(cli, ["backends"])
    finally:
        set_host(previous)
    assert result.exit_code == 2
    assert "error: backend 'echo' is registered twice" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_hookimpl_with_unknown_argument_is_rejected_at_register() -> None:
    class Bad:
        @hookimpl
        def register_backends(self, register, extra):  # type: ignore[no-untyped-def]
            pass

    host = bare_host()
    with pytest.raises(Exception, match="extra"):
        host.register(Bad(), name="bad")
    assert host.pm.get_plugin("bad") is None


# --- lookups ---------------------------------------------------------------------------------


def test_unknown_name_lists_installed_names() -> None:
    host = PluginHost()
    with pytest.raises(UnknownNameError) as caught:
        host.backend("nope")
    assert caught.value.kind == "backend"
    assert caught.value.name == "nope"
    assert caught.value.known == ["cascade", "ensemble", "sglang", "static", "transformers"]
    assert str(caught.value) == (
        "unknown backend 'nope'; installed: cascade, ensemble, sglang, static, transformers"
    )

    with pytest.raises(UnknownNameError) as caught:
        host.prompt_format("llavaguard-v9")
    assert str(caught.value).endswith("installed: generic, llavaguard-v1.0, llavaguard-v1.2")
    with pytest.raises(UnknownNameError) as caught:
        host.postprocessor("tag")
    assert str(caught.value) == (
        "unknown post-processor 'tag'; installed: escalate, rules, severity, thresholds"
    )


def test_unknown_name_on_an_empty_host() -> None:
    with pytest.raises(UnknownNameError) as caught:
        bare_host().backend("static")
    assert caught.value.known == []
    assert str(caught.value).startswith("unknown backend 'static'; ")
    assert "none installed" in str(caught.value)


def test_registered_records_the_plugin() -> None:
    host = PluginHost()
    host.register(BackendPlugin(EchoBackend), name="echo-plugin")
    assert host.backends()["echo"].plugin == "echo-plugin"
    assert host.backends()["echo"].obj is EchoBackend
    assert host.backends()["static"].plugin == "builtin-static"
    assert host.postprocessors()["escalate"].plugin == "builtin-escalation"
    assert host.prompt_formats()["llavaguard-v1.2"].plugin == "builtin-formats"


def test_register_and_unregister_update_the_registries() -> None:
    host = bare_host()
    assert host.backends() == {}
    host.register(BackendPlugin(EchoBackend), name="echo-plugin")
    assert list(host.backends()) == ["echo"]
    host.unregister("echo-plugin")
    assert host.backends() == {}
    host.unregister("never-registered")  # a no-op


def test_register_and_unregister_on_the_default_host(default_host_plugin: list[str]) -> None:
    host = get_host()
    assert "echo" not in host.backends()
    host.register(BackendPlugin(EchoBackend), name="test-echo")
    default_host_plugin.append("test-echo")
    decision = Engine("llavaguard", "echo").assess(png())
    assert decision.verdict.error is not None
    assert decision.verdict.error.message == "echo never answers"
    host.unregister("test-echo")
    assert "echo" not in host.backends()


# --- plugins(): who registered what ----------------------------------------------------------


class Multi:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register(EchoBackend)

    @hookimpl
    def register_postprocessors(self, register):  # type: ignore[no-untyped-def]
        register(Noop)

    @hookimpl
    def observe_decision(self, decision):  # type: ignore[no-untyped-def]
        pass


def test_plugins_reports_hooks_and_registrations() -> None:
    host = PluginHost()
    host.register(Multi(), name="multi")
    infos = {info.name: info for info in host.plugins()}
    assert set(infos) == BUILTINS | {"multi"}
    multi = infos["multi"]
    assert multi.hooks == ("observe_decision", "register_backends", "register_postprocessors")
    assert multi.registered == {"backend": ["echo"], "post-processor": ["noop"]}
    assert (multi.distribution, multi.version, multi.builtin) == (None, None, False)

    static = infos["builtin-static"]
    assert static.builtin is True
    assert static.distribution == "policy-engine"
    assert static.version
    assert static.hooks == ("register_backends",)
    assert static.registered == {"backend": ["static"]}
    assert infos["builtin-formats"].registered == {
        "prompt format": ["generic", "llavaguard-v1.0", "llavaguard-v1.2"]
    }
    assert [info.name for info in host.plugins()] == sorted(infos)


def test_plugins_command_shows_registrations() -> None:
    host = PluginHost()
    host.register(Multi(), name="multi")
    previous = set_host(host)
    try:
        runner = CliRunner()
        as_json = runner.invoke(cli, ["plugins", "--json"])
        as_text = runner.invoke(cli, ["plugins"])
    finally:
        set_host(previous)
    assert as_json.exit_code == 0, as_json.output
    expected = json.loads(json.dumps([asdict(info) for info in host.plugins()]))
    assert json.loads(as_json.output) == expected
    assert as_text.exit_code == 0, as_text.output
    assert "multi (registered)" in as_text.output
    assert "  hooks: observe_decision, register_backends, register_postprocessors" in as_text.output
    assert "  backends: echo" in as_text.output
    assert "  post-processors: noop" in as_text.output
    assert "builtin-static (built-in " in as_text.output


# --- entry points: built-ins, allow and block lists ------------------------------------------


def test_builtins_load_with_an_empty_allowlist() -> None:
    assert os.environ["POLICY_ENGINE_PLUGINS"] == ""  # set by conftest
    host = PluginHost()
    assert {info.name for info in host.plugins()} == BUILTINS
    assert all(info.builtin for info in host.plugins())


def test_no_entry_points_when_disabled() -> None:
    assert bare_host().plugins() == []


def test_loading_is_lazy_and_happens_once() -> None:
    host = PluginHost()
    assert host.pm.get_plugins() == set()
    host.ensure_loaded()
    loaded = set(host.pm.get_plugins())
    host.ensure_loaded()
    assert set(host.pm.get_plugins()) == loaded
    assert len(loaded) == len(BUILTINS)


def test_blocklisting_a_builtin_removes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    disabled = (
        " builtin-static , builtin-transformers, builtin-sglang, builtin-cascade, "
        "builtin-ensemble, something-else"
    )
    monkeypatch.setenv("POLICY_ENGINE_DISABLE_PLUGINS", disabled)
    host = PluginHost()
    assert "static" not in host.backends()
    assert {info.name for info in host.plugins()} == BUILTINS - {
        "builtin-static",
        "builtin-transformers",
        "builtin-sglang",
        "builtin-cascade",
        "builtin-ensemble",
    }
    with pytest.raises(UnknownNameError, match=r"unknown backend 'static'.*none installed"):
        host.backend("static")
    assert "escalate" in host.postprocessors()


def test_blocklisting_a_builtin_in_the_cli() -> None:
    disabled = {
        "POLICY_ENGINE_DISABLE_PLUGINS": "builtin-static,builtin-transformers,builtin-sglang,"
        "builtin-cascade,builtin-ensemble"
    }
    result = run_cli("backends", "--json", env=disabled)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assessed = run_cli(
        "assess",
        "x.png",
        "--backend",
        "static",
        env=disabled,
    )
    assert assessed.returncode == 2
    assert "error: unknown backend 'static'" in assessed.stderr
    assert "none installed" in assessed.stderr


GOOD_PLUGIN = """\
from policy_engine import Backend, hookimpl

class Third(Backend):
    name = "third"

@hookimpl
def register_backends(register):
    register(Third)
"""

MISMATCHED_PLUGIN = """\
from policy_engine import hookimpl

@hookimpl
def register_backends(register, colour):
    pass
"""


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three installed third-party plugins: one good, one missing module, one bad hookimpl."""
    site = tmp_path / "site"
    make_dist(site, "good-plugin", {"good": "good_plugin"}, {"good_plugin": GOOD_PLUGIN})
    make_dist(site, "broken-plugin", {"broken": "policy_engine_no_such_module_xyz"})
    make_dist(
        site,
        "mismatched-plugin",
        {"mismatched": "mismatched_plugin"},
        {"mismatched_plugin": MISMATCHED_PLUGIN},
    )
    monkeypatch.syspath_prepend(str(site))
    for module in ("good_plugin", "mismatched_plugin"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return site


@pytest.mark.parametrize(
    ("allow", "expected"),
    [("", set()), ("good", {"good"}), ("good,other", {"good"}), (None, {"good"})],
)
def test_allowlist_selects_third_party_plugins(
    third_party: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    allow: str | None,
    expected: set[str],
) -> None:
    if allow is None:
        monkeypatch.delenv("POLICY_ENGINE_PLUGINS")
    else:
        monkeypatch.setenv("POLICY_ENGINE_PLUGINS", allow)
    host = PluginHost()
    infos = {info.name: info for info in host.plugins()}
    assert set(infos) - BUILTINS == expected
    if expected:
        good = infos["good"]
        assert (good.distribution, good.version, good.builtin) == ("good-plugin", "1.2.3", False)
        assert host.backends()["third"].plugin == "good"
    # Plugins outside the allowlist are never imported, so broken ones cost nothing.
    assert ("broken" in caplog.text) == (allow is None)


def test_blocklist_beats_allowlist(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICY_ENGINE_PLUGINS", "good")
    monkeypatch.setenv("POLICY_ENGINE_DISABLE_PLUGINS", "good")
    assert "third" not in PluginHost().backends()


def test_a_plugin_that_fails_to_import_is_a_warning(
    third_party: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("POLICY_ENGINE_PLUGINS", "broken,good")
    host = PluginHost()
    assert {"static", "third"} <= set(host.backends())
    assert "broken" not in {info.name for info in host.plugins()}
    assert "plugin 'broken' failed to load" in caplog.text
    assert "policy_engine_no_such_module_xyz" in caplog.text


def test_a_plugin_whose_hookimpl_does_not_match_the_spec_is_a_warning(
    third_party: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("POLICY_ENGINE_PLUGINS", "mismatched,good")
    host = PluginHost()
    assert {info.name for info in host.plugins()} == BUILTINS | {"good"}
    assert "plugin 'mismatched' failed to load" in caplog.text
    assert "colour" in caplog.text


def test_a_broken_plugin_does_not_break_the_cli(third_party: Path, tmp_path: Path) -> None:
    result = run_cli(
        "backends",
        "--json",
        env={"POLICY_ENGINE_PLUGINS": None},
        pythonpath=third_party,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout)] == [
        "cascade",
        "ensemble",
        "sglang",
        "static",
        "third",
        "transformers",
    ]
    assert "policy-engine: warning: plugin 'broken' failed to load" in result.stderr
    assert "policy-engine: warning: plugin 'mismatched' failed to load" in result.stderr
    assert "Traceback" not in result.stderr


# --- tracing ---------------------------------------------------------------------------------


def test_trace_hooks_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POLICY_ENGINE_TRACE_HOOKS", "1")
    host = PluginHost()
    host.register(BackendPlugin(EchoBackend), name="echo-plugin")
    host.backends()
    err = capsys.readouterr().err
    assert "[hooks]" in err
    assert "register_backends" in err
    assert "finish register_backends" in err

    monkeypatch.delenv("POLICY_ENGINE_TRACE_HOOKS")
    PluginHost().backends()
    assert capsys.readouterr().err == ""


def test_trace_hooks_in_the_cli() -> None:
    traced = run_cli("backends", env={"POLICY_ENGINE_TRACE_HOOKS": "1"})
    assert traced.returncode == 0, traced.stderr
    for hook in ("register_commands", "register_backends"):
        assert f"[hooks]   {hook} [hook]" in traced.stderr
        assert f"finish {hook} -->" in traced.stderr
    assert traced.stdout.startswith("cascade ")
    quiet = run_cli("backends", env={"POLICY_ENGINE_TRACE_HOOKS": None})
    assert quiet.stderr == ""
    assert quiet.stdout == traced.stdout


# --- observe_decision faults -----------------------------------------------------------------


def test_a_failing_sink_does_not_lose_the_decision(
    default_host_plugin: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        @hookimpl
        def observe_decision(self, decision):  # type: ignore[no-untyped-def]
            raise RuntimeError("sink is down")

    seen: list[str | None] = []

    class Working:
        @hookimpl
        def observe_decision(self, decision):  # type: ignore[no-untyped-def]
            seen.append(decision.rating)

    # registered first, so pluggy's order calls it after the broken one
    get_host().register(Working(), name="working-sink")
    default_host_plugin.append("working-sink")
    get_host().register(Broken(), name="broken-sink")
    default_host_plugin.append("broken-sink")
    decisions = list(Engine("llavaguard", "static").assess_many([png(), png()]))
    assert [d.rating for d in decisions] == ["Safe", "Safe"]
    warning = "plugin 'broken-sink': observe_decision failed: RuntimeError: sink is down"
    assert caplog.text.count(warning) == 2
    assert seen == ["Safe", "Safe"]  # the other sink still saw every decision


# --- a strict host ---------------------------------------------------------------------------

MISSPELLED_PLUGIN = """\
from policy_engine import Backend, hookimpl

@hookimpl
def register_backend(register):  # singular: no such hook
    raise AssertionError("never called")
"""


def test_a_misspelled_hook_is_reported_and_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "site"
    make_dist(site, "typo-plugin", {"typo": "typo_plugin"}, {"typo_plugin": MISSPELLED_PLUGIN})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("POLICY_ENGINE_PLUGINS", "typo")
    host = PluginHost()
    info = {i.name: i for i in host.plugins()}["typo"]
    assert info.unknown_hooks == ("register_backend",)
    assert info.hooks == ()  # it implements no real hook
    warning = (
        "plugin 'typo' implements 'register_backend', which is no hook of policy-engine "
        "(did you mean 'register_backends'?): it is never called"
    )
    assert [r.getMessage() for r in caplog.records].count(warning) == 1
    listed = run_cli(
        "plugins", env={"POLICY_ENGINE_PLUGINS": "typo"}, pythonpath=site, cwd=tmp_path
    )
    assert "policy-engine: warning: plugin 'typo' implements 'register_backend'" in (listed.stderr)
    assert "typo (typo-plugin 1.2.3)\n  hooks: none\n  UNKNOWN HOOK: register_backend" in (
        listed.stdout
    )


def test_registering_a_misspelled_hook_by_hand_is_an_error() -> None:
    class Typo:
        @hookimpl
        def observe_decisions(self, decision: Decision) -> None:  # plural: no such hook
            pass

    host = PluginHost(load_entry_points=False)
    with pytest.raises(PluginError, match="did you mean 'observe_decision'"):
        host.register(Typo(), name="typo")
    assert "typo" not in {i.name for i in host.plugins()}  # not left half-registered


def test_a_command_name_clash_names_both_plugins() -> None:
    def adds(name: str) -> object:
        class Commands:
            @hookimpl
            def register_commands(self, cli: click.Group) -> None:
                cli.add_command(click.Command(name, callback=lambda: None))

        return Commands()

    for taken, owner in (("assess", "policy-engine (core)"), ("audit", "policy-engine (core)")):
        group = click.Group(
            commands={"assess": click.Command("assess", params=[click.Option(["--out"])])}
        )
        host = PluginHost(load_entry_points=False)
        host.register(adds(taken), name="greedy")
        if taken == "audit":  # a lazy built-in is taken too
            from policy_engine.cli import cli

            group = cli
        message = f"command {taken!r} is added twice: by {owner} and by plugin 'greedy'"
        with pytest.raises(PluginError, match=re.escape(message)):
            host.add_commands(group)
        command = group.get_command(click.Context(group), taken)
        assert command is not None and command.params, "the clash replaced the core command"
    group = click.Group()
    host = PluginHost(load_entry_points=False)
    host.register(adds("hello"), name="first")
    host.register(adds("hello"), name="second")
    with pytest.raises(PluginError, match=r"'hello' is added twice: by plugin '.*' and by plugin"):
        host.add_commands(group)


def test_observe_decision_goes_through_pluggy_so_tracing_shows_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POLICY_ENGINE_TRACE_HOOKS", "1")
    seen: list[Decision] = []

    class Sink:
        @hookimpl
        def observe_decision(self, decision: Decision) -> None:
            seen.append(decision)

    host = PluginHost()
    host.register(Sink(), name="sink")
    Engine("llavaguard", "static", host=host).assess(png())
    assert len(seen) == 1
    assert "observe_decision [hook]" in capsys.readouterr().err
