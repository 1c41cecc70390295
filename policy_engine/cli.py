"""The `policy-engine` command line. JSON on stdout; user errors as one line each on stderr.

Exit status: 0 success; 1 some items failed (assess) or a backend fault; 2 a user error (bad
policy, unknown name, bad option). Plugins add commands through `register_commands`.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import click
import yaml

from .compiler import compile_policy
from .errors import PolicyEngineError, PolicyError
from .host import get_host
from .loader import load_policy, shipped_policies
from .policy import PolicyFile

POLICY_HELP = "A shipped policy name (see `policy-engine policies`) or a path to a YAML file."


# Built-in commands that live in their own packages, imported when used (or listed by --help):
# `import policy_engine.cli` stays light, and those modules may import this one.
LAZY_COMMANDS = {
    "audit": ("policy_engine.audit.commands", "audit"),
    "eval": ("policy_engine.audit.evaluate", "eval_command"),
    "export": ("policy_engine.audit.commands", "export_command"),
    "merge": ("policy_engine.audit.commands", "merge"),
    "report": ("policy_engine.audit.report", "report_command"),
    "serve": ("policy_engine.serve.command", "serve_command"),
    "test": ("policy_engine.audit.commands", "test_command"),
}


class _Group(click.Group):
    """Turns the engine's errors into clean messages and exit codes: never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in LAZY_COMMANDS:
            module, attribute = LAZY_COMMANDS[name]
            command = getattr(importlib.import_module(module), attribute)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolicyError as err:
            for problem in err.problems:
                click.echo(str(problem), err=True)
            ctx.exit(err.exit_code)
        except PolicyEngineError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="policy-engine", prog_name="policy-engine")
def cli() -> None:
    """Judge images against declarative safety policies with vision-language models."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def policies(as_json: bool) -> None:
    """List the shipped policies."""
    rows = []
    for name in shipped_policies():
        policy = load_policy(name)
        rows.append(
            {
                "name": name,
                "id": policy.id,
                "version": policy.version,
                "prompt_format": policy.prompt_format,
                "categories": len(policy.categories),
                "description": policy.description,
            }
        )
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        click.echo(
            f"{row['name']:<20} v{row['version']:<5} {row['prompt_format']:<16} "
            f"{row['description']}"
        )


@cli.command()
@click.argument("policy", metavar="POLICY")
def check(policy: str) -> None:
    """Validate POLICY and print a summary. POLICY: a shipped name or a path."""
    loaded = load_policy(policy)
    compiled = compile_policy(loaded)
    summary = {
        "ok": True,
        "policy": policy,
        "id": loaded.id,
        "version": loaded.version,
        "prompt_format": loaded.prompt_format,
        "categories": [c.id for c in loaded.categories],
        "exceptions": {k: v.status.value for k, v in loaded.exceptions.items()},
        "postprocess": [s.id or s.name for s in loaded.postprocess],
        "hash": compiled.hash,
    }
    _echo_json(summary)


@cli.command(name="compile")
@click.argument("policy", metavar="POLICY")
@click.option(
    "--part",
    type=click.Choice(["prompt", "schema", "all"]),
    default="all",
    show_default=True,
    help="prompt: the exact prompt text; schema: the verdict JSON Schema; all: both as JSON.",
)
def compile_command(policy: str, part: str) -> None:
    """Show what the model will be asked (prompt) and what it must answer (schema)."""
    compiled = compile_policy(load_policy(policy))
    if part == "prompt":
        click.echo(compiled.prompt, nl=False)
    elif part == "schema":
        _echo_json(compiled.schema)
    else:
        _echo_json(
            {
                "policy": compiled.policy.id,
                "version": compiled.policy.version,
                "prompt_format": compiled.prompt_format,
                "hash": compiled.hash,
                "prompt": compiled.prompt,
                "schema": compiled.schema,
                "layout": {"keys": list(compiled.layout.keys), "indent": compiled.layout.indent},
                "answer_prefix": compiled.layout.prefix(),
            }
        )


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the policy file format (for editors)."""
    document = PolicyFile.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "policy-engine policy file"
    _echo_json(document)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plugins(as_json: bool) -> None:
    """List loaded plugins, their hooks and what each registered."""
    infos = [asdict(info) for info in get_host().plugins()]
    if as_json:
        _echo_json(infos)
        return
    for info in infos:
        origin = "built-in" if info["builtin"] else (info["distribution"] or "registered")
        version = f" {info['version']}" if info["version"] else ""
        click.echo(f"{info['name']} ({origin}{version})")
        click.echo(f"  hooks: {', '.join(info['hooks'])}")
        for kind, names in info["registered"].items():
            click.echo(f"  {kind}s: {', '.join(names)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def backends(as_json: bool) -> None:
    """List installed backends and their capabilities."""
    rows: list[dict[str, Any]] = []
    for name, entry in sorted(get_host().backends().items()):
        cls = entry.obj
        rows.append(
            {
                "name": name,
                "plugin": entry.plugin,
                "description": cls.description,
                "capabilities": asdict(cls.capabilities),
                "options": sorted(cls.Options.model_fields),
            }
        )
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        caps = [k for k, v in row["capabilities"].items() if v is True]
        click.echo(f"{row['name']:<12} {row['description']}")
        click.echo(
            f"{'':<12} capabilities: {', '.join(caps)}; options: "
            f"{', '.join(row['options']) or 'none'}"
        )


def _parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        try:
            result[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            result[key] = value
    return result


F = TypeVar("F", bound=Callable[..., Any])


def engine_options(*, policy: bool = True) -> Callable[[F], F]:
    """A decorator adding the options that choose a policy (unless the command takes it as an
    argument), a backend and how to run it: shared by every command that judges images."""
    options = [
        click.option(
            "--backend",
            "-b",
            "backend",
            default="transformers",
            show_default=True,
            help="A backend name (`backends`).",
        ),
        click.option(
            "--model",
            "-m",
            default=None,
            help="Model: hub id, local checkpoint directory, or tiny-random (random weights, "
            "offline).",
        ),
        click.option(
            "--url",
            "urls",
            multiple=True,
            metavar="URL",
            help="Server URL for HTTP backends (repeatable: several servers are balanced).",
        ),
        click.option(
            "--transport",
            type=click.Choice(["openai", "native"]),
            default=None,
            help="HTTP backends: openai (/v1/chat/completions) or native (SGLang /generate).",
        ),
        click.option(
            "--launch",
            is_flag=True,
            default=False,
            help="sglang: start an SGLang server for --model first (needs sglang and a GPU).",
        ),
        click.option(
            "--mode",
            type=click.Choice(["full", "verdict", "score"]),
            default="full",
            show_default=True,
            help="full: rating, category, rationale; verdict: no rationale; score: P(unsafe) only.",
        ),
        click.option(
            "--option",
            "-o",
            "options",
            multiple=True,
            metavar="KEY=VALUE",
            help="A backend option (repeatable); values are YAML scalars.",
        ),
        click.option(
            "--meta",
            "meta",
            multiple=True,
            metavar="KEY=VALUE",
            help="Request metadata for post-processors (repeatable), e.g. audience=minors.",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=None, help="Images per call."
        ),
    ]
    if policy:
        options.insert(
            0,
            click.option(
                "--policy",
                "-p",
                "policy",
                default="llavaguard",
                show_default=True,
                help=POLICY_HELP,
            ),
        )

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@dataclass
class EngineChoice:
    """What `engine_options` collected, turned into an Engine by `build`."""

    policy: str
    backend: str
    model: str | None
    urls: tuple[str, ...]
    transport: str | None
    launch: bool
    mode: str
    options: tuple[str, ...]
    meta: tuple[str, ...]
    batch_size: int | None

    @classmethod
    def pop(cls, params: dict[str, Any], policy: str | None = None) -> EngineChoice:
        """Take this choice's values out of a command's keyword arguments (`policy` when the
        command takes it as an argument)."""
        if policy is not None:
            params["policy"] = policy
        names = [f.name for f in fields(cls)]
        return cls(**{name: params.pop(name) for name in names})

    @property
    def metadata(self) -> dict[str, Any]:
        return _parse_pairs(self.meta, "--meta")

    def backend_options(self) -> dict[str, Any]:
        options = _parse_pairs(self.options, "--option")
        if self.model is not None:
            options["model"] = self.model
        if self.urls:
            options["url"] = list(self.urls)
        if self.transport is not None:
            options["transport"] = self.transport
        if self.launch:
            options["launch"] = True
        return options

    def build(self, *, concurrency: int | None = None, policy: Any = None) -> Any:
        """The Engine (not loaded). `concurrency` goes to the backend when it has such an
        option (HTTP backends: requests in flight), else to the engine."""
        from .engine import Engine

        options = self.backend_options()
        engine_concurrency = 1
        if concurrency is not None:
            backend_cls = get_host().backend(self.backend)
            if "concurrency" in backend_cls.Options.model_fields:
                options.setdefault("concurrency", concurrency)
            else:
                engine_concurrency = concurrency
        return Engine(
            policy if policy is not None else self.policy,
            self.backend,
            mode=self.mode,  # type: ignore[arg-type]
            backend_options=options,
            batch_size=self.batch_size,
            concurrency=engine_concurrency,
        )


@cli.command()
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@engine_options()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "table"]),
    default="jsonl",
    show_default=True,
    help="jsonl: one Decision per line; table: for people.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress line on stderr (default: when stderr is a terminal, for several images).",
)
def assess(images: tuple[str, ...], fmt: str, progress: bool | None, **params: Any) -> None:
    """Judge each IMAGE (path or data: URL) against a policy; print one Decision per line."""
    choice = EngineChoice.pop(params)
    metadata = choice.metadata
    engine = choice.build()
    failed = 0
    show = progress if progress is not None else sys.stderr.isatty() and len(images) > 1
    started = time.monotonic()
    with engine:
        engine.load()  # before the progress line, so loading messages stay on their own lines
        for done, decision in enumerate(engine.assess_many(images, metadata=metadata), 1):
            failed += not decision.verdict.ok
            if fmt == "jsonl":
                click.echo(decision.model_dump_json(exclude_none=True))
            else:
                _echo_row(decision)
            if show:
                rate = done / max(time.monotonic() - started, 1e-9)
                note = f", {failed} failed" if failed else ""
                end = "\n" if done == len(images) else ""
                click.echo(
                    f"\r[{done}/{len(images)}] {rate:.2f} images/s{note}", err=True, nl=False
                )
                click.echo(end, err=True, nl=False)
    if failed:
        click.echo(f"error: {failed} of {len(images)} images could not be assessed", err=True)
        sys.exit(1)


def _echo_row(decision: Any) -> None:
    v = decision.verdict
    if v.error is not None:
        click.echo(f"{v.source}: ERROR ({v.error.kind}) {v.error.message}")
        return
    score = f" p_unsafe={v.p_unsafe:.3f}" if v.p_unsafe is not None else ""
    category = f" {v.category_id}: {v.category_name}" if v.category_id else ""
    click.echo(f"{v.source}: {v.rating}{category}{score}")
    for action in decision.actions:
        extra = " ".join(f"{k}={val}" for k, val in action.params.items())
        click.echo(f"  -> {action.name} {extra}".rstrip())
    if v.rationale:
        click.echo(f"  {v.rationale}")


def build_cli() -> click.Group:
    """The CLI with plugin commands added (one factory for the console script and tests)."""
    get_host().add_commands(cli)
    return cli


def main() -> None:
    try:
        build_cli()
    except PolicyEngineError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    cli(prog_name="policy-engine")
