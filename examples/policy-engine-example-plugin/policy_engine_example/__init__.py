"""An example policy-engine plugin: one module, four hooks, typed against plugin API 1.0.

- `register_backends`: the `example-colour` backend, which judges an image by its mean colour
  (reddish: Unsafe, category O2; anything else: Safe). No model: a deterministic stand-in for
  demos and for testing post-processing chains on images you draw.
- `register_postprocessors`: the `tag` post-processor, which adds a custom `tag` action with a
  label (to Unsafe decisions only, unless `only_unsafe: false`).
- `register_commands`: `policy-engine example-hello`, which prints a JSON greeting.
- `observe_decision`: when `EXAMPLE_PLUGIN_LOG` names a file, appends every Decision to it as
  one JSON line.

It is found through the entry point in its pyproject.toml (group `policy_engine`, name
`example`); nothing in policy-engine names it. It type-checks under `mypy --strict` with no
`type: ignore`.
"""

from __future__ import annotations

import json
import os
import threading

import click
from pydantic import BaseModel, ConfigDict, Field

from policy_engine import (
    Backend,
    Batch,
    Capabilities,
    Decision,
    Generation,
    PostProcessor,
    Register,
    StepContext,
    hookimpl,
)

__version__ = "0.1.0"

LOG_ENV = "EXAMPLE_PLUGIN_LOG"
_log_lock = threading.Lock()


# -- a backend -------------------------------------------------------------------------------
class ColourOptions(BaseModel):
    # extra="forbid": a misspelled option (-o redness=...) is an error, not a no-op.
    model_config = ConfigDict(extra="forbid")

    redness: int = Field(
        default=60, ge=0, le=255, description="How much red must exceed green and blue."
    )


class ColourBackend(Backend):
    """`-b example-colour`: Unsafe (O2) when the image's mean colour is clearly red."""

    name = "example-colour"
    description = "Judges by mean colour (red: Unsafe O2); no model, for demos and tests"
    Options = ColourOptions
    capabilities = Capabilities(json_schema=True, batching=True, max_batch_size=32)
    options: ColourOptions

    def generate(self, batch: Batch) -> list[Generation]:
        compiled = batch.compiled
        layout = compiled.layout_for(batch.mode)
        labels = {category_id: label for label, category_id in compiled.labels.items()}
        answers = []
        for image in batch:
            pixel = image.image.resize((1, 1)).getpixel((0, 0))  # images arrive as RGB
            assert isinstance(pixel, tuple)
            red, green, blue = pixel[:3]
            unsafe = red - max(green, blue) >= self.options.redness
            answer = {
                "rating": "Unsafe" if unsafe else "Safe",
                "category": labels["O2" if unsafe else compiled.policy.none_category.id],
                "rationale": f"Mean colour ({red}, {green}, {blue}).",
            }
            answers.append(Generation(text=layout.dumps(answer), model="example-colour"))
        return answers


# -- a post-processor -----------------------------------------------------------------------
class TagParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, description="The label the `tag` action carries.")
    only_unsafe: bool = Field(
        default=True, description="Tag Unsafe decisions only; false: tag every valid one."
    )


class Tag(PostProcessor):
    """policy YAML:  - {name: tag, params: {label: needs-blur}}"""

    name = "tag"
    description = "Add a `tag` action with a label (to Unsafe decisions, by default)"
    Params = TagParams
    params: TagParams

    def __call__(self, decision: Decision, context: StepContext) -> None:
        if not decision.verdict.ok:
            context.note("not tagged (the verdict is an error)")
            return
        # decision.rating is the final rating, after earlier steps' overrides
        if self.params.only_unsafe and decision.rating != "Unsafe":
            context.note(f"not tagged (rating {decision.rating}, only_unsafe)")
            return
        context.add_action("tag", label=self.params.label)  # stamped with this step's id
        context.note(f"tagged {self.params.label!r} (rating {decision.rating})")


# -- the hooks -------------------------------------------------------------------------------
@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(ColourBackend)


@hookimpl
def register_postprocessors(register: Register[type[PostProcessor]]) -> None:
    register(Tag)


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command(name="example-hello")
    @click.option("--name", default="world", show_default=True, help="Whom to greet.")
    def example_hello(name: str) -> None:
        """Print a JSON greeting from the example plugin."""
        greeting = {"plugin": "example", "version": __version__, "message": f"hello, {name}"}
        click.echo(json.dumps(greeting))


@hookimpl
def observe_decision(decision: Decision) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = decision.model_dump_json(exclude_none=True)
    with _log_lock, open(path, "a", encoding="utf-8") as log:
        log.write(line + "\n")
