"""The `static` backend: answers every image with one fixed verdict, without a model.

For dry runs of a policy's post-processing chain, plugin development, and tests: it goes
through the same compile, parse and post-process path as a model backend. Its answers follow
the policy's answer layout, and `raw` lets you feed exact model text to the parser.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy_engine import Backend, Batch, Capabilities, Generation, Register, hookimpl


class StaticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rating: str = Field(default="Safe", pattern="^(Safe|Unsafe)$")
    category: str | None = Field(
        default=None, description="A category id of the policy; default: the none-applying one."
    )
    rationale: str = "Static answer: no model was consulted."
    p_unsafe: float | None = Field(default=None, ge=0.0, le=1.0)
    raw: str | None = Field(default=None, description="Exact reply text, bypassing the layout.")
    model: str = "static"

    @model_validator(mode="after")
    def _consistent(self) -> StaticOptions:
        if self.rating == "Unsafe" and self.category is None and self.raw is None:
            raise ValueError("an Unsafe answer names the violated category: add -o category=ID")
        return self


class StaticBackend(Backend):
    name = "static"
    description = "Fixed verdict, no model: dry runs of policies and post-processors"
    Options = StaticOptions
    capabilities = Capabilities(
        images=True, json_schema=True, scores=True, batching=True, max_batch_size=64
    )
    options: StaticOptions

    def _answer(self, batch: Batch) -> Generation:
        opts = self.options
        compiled = batch.compiled
        p_unsafe = opts.p_unsafe
        if p_unsafe is None:
            p_unsafe = 1.0 if opts.rating == "Unsafe" else 0.0
        if opts.raw is not None:
            return Generation(text=opts.raw, p_unsafe=p_unsafe, model=opts.model)
        policy = compiled.policy
        category_id = opts.category or policy.none_category.id
        labels = {v: k for k, v in compiled.labels.items()}
        if category_id not in labels:
            return Generation(
                error=f"static backend: category {category_id!r} is not in policy {policy.id!r}",
                model=opts.model,
            )
        answer: dict[str, object] = {
            "rating": opts.rating,
            "category": labels[category_id],
            "rationale": opts.rationale,
        }
        if category_id != policy.none_category.id:
            answer["severity"] = policy.category(category_id).severity
            answer["categories"] = [labels[category_id]]
        else:
            answer["severity"] = policy.severity_levels[0]
            answer["categories"] = []
        unsafe = opts.rating == "Unsafe" and category_id != policy.none_category.id
        answer["violations"] = {labels[category_id]: answer["severity"]} if unsafe else {}
        layout = compiled.layout_for(batch.mode)
        return Generation(text=layout.dumps(answer), p_unsafe=p_unsafe, model=opts.model)

    def generate(self, batch: Batch) -> list[Generation]:
        answer = self._answer(batch)
        return [replace(answer) for _ in batch.images]


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(StaticBackend)
