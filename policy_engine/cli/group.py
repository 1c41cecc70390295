"""The `policy-engine` click group: one line per user error on stderr, never a traceback.

Exit status: 0 success; 1 some items failed or a backend/server fault; 2 a user error (bad
policy, unknown name, bad option). Plugins add commands through `register_commands`.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..errors import PolicyEngineError, PolicyError
from ..host import get_host
from ..logs import log_to_stderr

POLICY_HELP = "A shipped policy name (see `policy-engine policies`) or a path to a YAML file."

# Built-in commands that live in their own packages, imported when used (or listed by --help):
# `import policy_engine.cli` stays light, and those modules may import this one.
LAZY_COMMANDS = {
    "audit": ("policy_engine.audit.commands", "audit"),
    "calibrate": ("policy_engine.audit.calibrate", "calibrate_command"),
    "eval": ("policy_engine.audit.evaluate", "eval_command"),
    "export": ("policy_engine.audit.commands", "export_command"),
    "merge": ("policy_engine.audit.commands", "merge"),
    "report": ("policy_engine.audit.report", "report_command"),
    "serve": ("policy_engine.serve.command", "serve_command"),
    "test": ("policy_engine.audit.commands", "test_command"),
}


class Group(click.Group):
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


@contextmanager
def user_errors(ctx: click.Context) -> Iterator[None]:
    """Inside a command: the engine's errors as `error: ...` lines on stderr (one per problem
    of a PolicyError), exiting with the error's status."""
    try:
        yield
    except PolicyError as err:
        for problem in err.problems:
            click.echo(f"error: {problem}", err=True)
        ctx.exit(err.exit_code)
    except PolicyEngineError as err:
        click.echo(f"error: {err}", err=True)
        ctx.exit(err.exit_code)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="policy-engine", prog_name="policy-engine")
def cli() -> None:
    """Judge images against declarative safety policies with vision-language models."""
    log_to_stderr()


def build_cli() -> click.Group:
    """The CLI with plugin commands added (one factory for the console script and tests)."""
    get_host().add_commands(cli)
    return cli


def main() -> None:
    log_to_stderr()
    try:
        build_cli()
    except PolicyEngineError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    cli(prog_name="policy-engine")
