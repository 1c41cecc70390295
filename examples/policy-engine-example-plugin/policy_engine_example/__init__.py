"""An example policy-engine plugin: one module, three hooks.

- `register_postprocessors`: the `tag` post-processor, which adds a `tag` action with a label
  (to Unsafe verdicts only, unless `only_unsafe: false`).
- `register_commands`: `policy-engine example-hello`, which prints a JSON greeting.
- `observe_decision`: when `EXAMPLE_PLUGIN_LOG` names a file, appends every Decision to it as one
  JSON line.

It is found through the entry point in its pyproject.toml (group `policy_engine`, name
`example`); nothing in policy-engine names it.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field

from policy_engine import Decision, PostProcessor, hookimpl

__version__ = "0.1.0"

LOG_ENV = "EXAMPLE_PLUGIN_LOG"
_log_lock = threading.Lock()


class TagParams(BaseModel):
    # extra="forbid": a misspelled parameter in a policy is a load-time error, not a no-op.
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, description="The label the `tag` action carries.")
    only_unsafe: bool = Field(
        default=True, description="Tag Unsafe verdicts only; false: tag every valid verdict."
    )


class Tag(PostProcessor):
    """policy YAML:  - {name: tag, params: {label: needs-blur}}"""

    name = "tag"
    description = "Add a `tag` action with a label (to Unsafe verdicts, by default)"
    Params = TagParams
    params: TagParams

    def __call__(self, decision: Decision, context: dict[str, Any]) -> None:
        step = f"tag:{self.params.label}"
        verdict = decision.verdict
        if not verdict.ok:
            decision.note(step, "not tagged (the verdict is an error)")
            return
        if self.params.only_unsafe and not verdict.unsafe:
            decision.note(step, f"not tagged (rating {verdict.rating}, only_unsafe)")
            return
        decision.add_action("tag", by=step, label=self.params.label)
        decision.note(step, f"tagged {self.params.label!r} (rating {verdict.rating})")


@hookimpl
def register_postprocessors(register):  # type: ignore[no-untyped-def]
    register(Tag)


@hookimpl
def register_commands(cli):  # type: ignore[no-untyped-def]
    @cli.command(name="example-hello")
    @click.option("--name", default="world", show_default=True, help="Whom to greet.")
    def example_hello(name: str) -> None:
        """Print a JSON greeting from the example plugin."""
        greeting = {"plugin": "example", "version": __version__, "message": f"hello, {name}"}
        click.echo(json.dumps(greeting))


@hookimpl
def observe_decision(decision):  # type: ignore[no-untyped-def]
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = decision.model_dump_json(exclude_none=True)
    with _log_lock, open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")
