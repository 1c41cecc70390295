"""The `policy-engine tui` command, registered through the plugin hook like any plugin's.

Textual is imported when the command runs, never when the CLI starts.
"""

from __future__ import annotations

import click

from policy_engine import PolicyEngineError, hookimpl


@click.command(name="tui")
@click.argument("policy", required=False, metavar="[POLICY]")
def tui_command(policy: str | None) -> None:
    """Edit a policy in a terminal app: categories, exceptions, YAML, live prompt and schema,
    problems, trying images and running the policy's tests.

    POLICY: a file (a path with / or \\, starting with ., or ending in .yaml/.yml; created
    on save if missing), or else a shipped policy's name, whatever files are in the current
    folder: it opens as an unsaved copy, which ctrl+s saves under an id and file of your own
    (offered: NAME-custom, ./NAME-custom.yaml). Without it, the app asks.
    """
    try:
        from .app import create_app
    except ImportError as err:
        missing = getattr(err, "name", None) or "textual"
        raise PolicyEngineError(
            f"the tui needs {missing}: pip install 'policy-engine[tui]'"
        ) from None
    create_app(policy).run()


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(tui_command)
