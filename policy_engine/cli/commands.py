"""The built-in commands that live with the core: policies, check, compile, schema, plugins,
backends, assess. (audit, eval, report, serve, … are in their packages, imported lazily.)"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import click

from ..audience import levels_of
from ..host import get_host
from ..loader import load_policy, shipped_policies
from ..policy import PolicyFile
from ..progress import Progress, wanted
from ..verdict import Decision
from .engine import EngineChoice, EngineCommand, engine_options
from .group import cli, echo_json


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
                "levels": levels_of(policy),  # audience levels: NAME@LEVEL
            }
        )
    if as_json:
        echo_json(rows)
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
    compiled = get_host().compile(loaded)
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
    echo_json(summary)


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
    compiled = get_host().compile(load_policy(policy))
    if part == "prompt":
        click.echo(compiled.prompt, nl=False)
    elif part == "schema":
        echo_json(compiled.schema)
    else:
        echo_json(
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
    echo_json(document)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plugins(as_json: bool) -> None:
    """List loaded plugins, their hooks and what each registered."""
    infos = [asdict(info) for info in get_host().plugins()]
    if as_json:
        echo_json(infos)
        return
    for info in infos:
        origin = "built-in" if info["builtin"] else (info["distribution"] or "registered")
        version = f" {info['version']}" if info["version"] else ""
        click.echo(f"{info['name']} ({origin}{version})")
        click.echo(f"  hooks: {', '.join(info['hooks']) or 'none'}")
        for kind, names in info["registered"].items():
            click.echo(f"  {kind}s: {', '.join(names)}")
        if info["commands"]:
            click.echo(f"  commands: {', '.join(info['commands'])}")
        for hook in info["unknown_hooks"]:
            click.echo(f"  UNKNOWN HOOK: {hook} (never called; misspelled?)")


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
                "flags": [flag.flag for flag in cls.cli_flags],
            }
        )
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        caps = [k for k, v in row["capabilities"].items() if v is True]
        click.echo(f"{row['name']:<12} {row['description']}")
        click.echo(
            f"{'':<12} capabilities: {', '.join(caps)}; options: "
            f"{', '.join(row['options']) or 'none'}"
        )


@cli.command(cls=EngineCommand)
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
    help="A progress bar on stderr (default: when stderr is a terminal, for several images).",
)
def assess(images: tuple[str, ...], fmt: str, progress: bool | None, engine: EngineChoice) -> None:
    """Judge each IMAGE (path or data: URL) against a policy; print one Decision per line.
    A video is one item too: its sampled frames are judged and the Decision names the deciding
    frame (docs/video.md)."""
    metadata = engine.metadata
    built = engine.build()
    show = wanted(progress) and (progress is not None or len(images) > 1)
    with built:
        if show:
            click.echo(f"loading backend {built.backend.name!r}…", err=True)
        built.load()  # before the progress bar, so loading messages stay on their own lines
        with Progress(len(images), enabled=show) as bar:
            for decision in built.assess_many(images, metadata=metadata):
                if fmt == "jsonl":
                    click.echo(decision.model_dump_json(exclude_none=True))
                else:
                    echo_row(decision)
                bar.update(decision)
    if bar.errors:
        click.echo(f"error: {bar.errors} of {len(images)} images could not be assessed", err=True)
        sys.exit(1)


def echo_row(decision: Decision) -> None:
    """A Decision for people: the final rating and category, overrides, actions (also for a
    failed image), the rationale indented under it."""
    v = decision.verdict
    if v.error is not None:
        click.echo(f"{v.source}: ERROR ({v.error.kind}) {v.error.message}")
    else:
        score = f" p_unsafe={v.p_unsafe:.3f}" if v.p_unsafe is not None else ""
        category = f" {decision.category_id}: {decision.category_name}"
        category = category if decision.category_id else ""
        click.echo(f"{v.source}: {decision.rating}{category}{score}")
        for override in decision.overrides:
            click.echo(f"  ({override.step}: {override.reason})")
    if v.parts is not None and v.deciding_part is not None:
        part = v.parts[v.deciding_part]
        at = f" at {part.timestamp:.2f} s" if part.timestamp is not None else ""
        click.echo(f"  deciding part {part.index}{at} of {len(v.parts)} ({v.aggregation})")
    for action in decision.actions:
        extra = " ".join(f"{k}={val}" for k, val in action.params.items())
        click.echo(f"  -> {action.name} {extra}".rstrip())
    if v.rationale:
        click.echo("  " + v.rationale.replace("\n", "\n  "))
    for shadow in decision.shadow or []:
        names = ", ".join(a.name for a in shadow.actions) or "no action"
        click.echo(f"  [shadow {shadow.kind} {shadow.source}: {shadow.rating} -> {names}]")
