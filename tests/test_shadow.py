"""Shadow mode (docs/shadow.md): a step or a policy in shadow is judged and recorded under
`Decision.shadow`, logged by sinks, returned by serve and compared by `report`, and never
enforced: the Decision's own rating, category and actions stay the live policy's."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from colour_backend import ColourBackend, colour_host, red_image
from policy_engine.plugins import sinks

from policy_engine import Engine, PluginHost
from policy_engine.audit.report_shadow import ShadowComparison
from policy_engine.audit.store import ResultRow, ResultStore
from policy_engine.cli import cli
from policy_engine.compiler import _policy_data, policy_hash
from policy_engine.errors import PolicyEngineError, PolicyError
from policy_engine.loader import load_policy, load_policy_text
from policy_engine.verdict import Decision, Verdict

# redness 0.4: the colour backend's P(Unsafe) is sigmoid(12 * -0.1) ~ 0.23, so the live
# policies rate it Safe and a candidate threshold of 0.2 re-rates it Unsafe.
BORDERLINE = 0.4

MODERATION = """
  - name: rules
    id: moderation
    params:
      rules:
        - {id: block-unsafe, when: {rating: Unsafe}, then: block}
"""
LIVE = "extends: llavaguard\nid: live\npostprocess:" + MODERATION
WITH_SHADOW_STEP = """
extends: llavaguard
id: live
postprocess:
  - name: thresholds
    id: candidate-cut
    shadow: true
    params: {p_unsafe: {default: 0.2}, action: flip}
""" + MODERATION.removeprefix("\n")
CANDIDATE = """
extends: llavaguard
id: candidate
version: "2"
postprocess:
  - name: thresholds
    id: candidate-cut
    params: {p_unsafe: {default: 0.2}, action: flip}
""" + MODERATION.removeprefix("\n")


@pytest.fixture
def host() -> Iterator[PluginHost]:
    with colour_host() as made:
        yield made


def policy(text: str, host: PluginHost, name: str = "policy.yaml") -> Any:
    return load_policy_text(text, name, host=host)


def backend_of(engine: Engine) -> ColourBackend:
    assert isinstance(engine.backend, ColourBackend)
    return engine.backend


def names(actions: Any) -> list[str]:
    return [a.name if hasattr(a, "name") else a["name"] for a in actions]


# --- the policy key ----------------------------------------------------------------------------


def test_shadow_false_or_absent_leaves_the_hash_as_it_was(host: PluginHost) -> None:
    plain = policy(LIVE, host)
    explicit = policy(LIVE.replace("id: moderation", "id: moderation\n    shadow: false"), host)
    in_shadow = policy(LIVE.replace("id: moderation", "id: moderation\n    shadow: true"), host)
    assert explicit.postprocess[0].shadow is None
    assert policy_hash(explicit) == policy_hash(plain)
    assert policy_hash(in_shadow) != policy_hash(plain)
    for shipped in ("children-platform", "health-platform"):
        loaded = load_policy(shipped, host=host)
        assert loaded.postprocess, shipped
        data = loaded.model_dump(mode="json")
        assert all(step["shadow"] is None for step in data["postprocess"])
        assert all("shadow" not in step for step in _policy_data(loaded)["postprocess"])


def test_shadow_must_be_a_boolean(host: PluginHost) -> None:
    with pytest.raises(PolicyError, match="shadow"):
        policy(LIVE.replace("id: moderation", "id: moderation\n    shadow: maybe"), host)


# --- a step in shadow --------------------------------------------------------------------------


def test_a_shadow_step_is_recorded_and_not_enforced(host: PluginHost) -> None:
    live = Engine(policy(LIVE, host), "colour", host=host)
    shadowed = Engine(policy(WITH_SHADOW_STEP, host), "colour", host=host)
    image = red_image(BORDERLINE)
    base, decision = live.assess(image), shadowed.assess(image)

    # enforced: exactly what the policy without the shadow step decides
    assert decision.rating == base.rating == "Safe"
    assert decision.actions == base.actions == []
    assert decision.overrides == base.overrides == []
    assert decision.trace == base.trace and {t.step for t in base.trace} == {"moderation"}
    # recorded: the Decision as it would be with the step live, later live steps included
    (result,) = decision.shadow or []
    assert (result.kind, result.source) == ("step", "candidate-cut")
    assert result.rating == "Unsafe"
    assert [o.step for o in result.overrides] == ["candidate-cut"]
    assert [(a.name, a.by) for a in result.actions] == [("block", "moderation:block-unsafe")]
    assert result.trace[0].step == "candidate-cut"
    assert result.trace[0].message.startswith("rating Safe (NA) -> Unsafe (O1)")
    assert {t.step for t in result.trace[1:]} == {"moderation"}
    assert result.policy_hash is None and result.reused_answer is None
    assert result.agrees_with(decision) is False


def test_a_shadow_step_that_agrees_and_one_that_fails(host: PluginHost) -> None:
    shadowed = Engine(policy(WITH_SHADOW_STEP, host), "colour", host=host)
    (result,) = shadowed.assess(red_image(0.0)).shadow or []
    assert result.rating == "Safe" and result.actions == []

    engine = Engine(policy(WITH_SHADOW_STEP, host), "colour", host=host)

    def boom(*_: Any) -> None:
        raise RuntimeError("shadow step broke")

    step_id, _ = engine.chain[0]
    engine.chain[0] = (step_id, boom)  # type: ignore[assignment]
    decision = engine.assess(red_image(BORDERLINE))
    assert decision.actions == [] and decision.ok  # the live Decision knows nothing of it
    (result,) = decision.shadow or []
    assert result.trace[0].error and "shadow step broke" in result.trace[0].message
    assert names(result.actions) == ["human_review"]  # the policy's fail-closed, in shadow


def test_the_documented_step_example_does_what_the_docs_say(host: PluginHost) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "shadow.md").read_text("utf-8")
    block = re.search(r"```yaml\n(.*?)```", doc, re.S)
    assert block is not None
    decision = Engine(policy(block.group(1), host), "colour", host=host).assess(
        red_image(BORDERLINE)
    )
    assert (decision.rating, decision.actions) == ("Safe", [])
    (result,) = decision.shadow or []
    assert (result.source, result.rating) == ("candidate-cut", "Unsafe")
    assert [(a.name, a.by) for a in result.actions] == [("block", "moderation:block-unsafe")]
    assert f"P(Unsafe) {decision.verdict.p_unsafe:.2f}" in doc


# --- a policy in shadow ------------------------------------------------------------------------


def test_a_shadow_policy_that_asks_the_same_reuses_the_live_answer(host: PluginHost) -> None:
    engine = Engine("llavaguard", "colour", host=host, shadow=policy(CANDIDATE, host))
    assert engine.shadow is not None and engine.shadow_reuses
    assert engine.shadow.compiled.hash != engine.compiled.hash
    decisions = list(engine.assess_many([red_image(BORDERLINE), red_image(0.9)]))
    assert backend_of(engine).calls == 1 and backend_of(engine).images == 2

    borderline, red = decisions
    assert (borderline.rating, borderline.actions) == ("Safe", [])  # llavaguard: no steps
    assert names(red.actions) == []
    for decision, rating in ((borderline, "Unsafe"), (red, "Unsafe")):
        (result,) = decision.shadow or []
        assert (result.kind, result.source, result.reused_answer) == ("policy", "candidate", True)
        assert result.rating == rating and names(result.actions) == ["block"]
        assert result.policy_id == "candidate" and result.policy_version == "2"
        assert result.policy_hash == engine.shadow.compiled.hash
        assert result.p_unsafe == decision.verdict.p_unsafe


def test_a_shadow_policy_with_another_prompt_gets_its_own_backend_answer(
    host: PluginHost,
) -> None:
    engine = Engine(policy(LIVE, host), "colour", host=host, shadow="children-platform")
    assert engine.shadow is not None and not engine.shadow_reuses
    decisions = list(engine.assess_many([red_image(0.9), red_image(0.0)]))
    backend = backend_of(engine)
    assert backend.calls == 2 and backend.images == 4  # one call per policy
    red, grey = decisions
    assert names(red.actions) == ["block"] and red.verdict.policy_id == "live"
    (result,) = red.shadow or []
    assert (result.source, result.reused_answer) == ("children-platform", False)
    assert result.policy_hash == engine.shadow.compiled.hash
    assert result.rating == "Unsafe" and "block" in names(result.actions)
    (result,) = grey.shadow or []
    assert result.rating == "Safe"


def test_the_async_api_judges_the_shadow_policy_too(host: PluginHost) -> None:
    engine = Engine(policy(LIVE, host), "colour", host=host, shadow="children-platform")

    async def run() -> list[Decision]:
        return [d async for d in engine.aassess_many([red_image(0.9)])]

    (decision,) = asyncio.run(run())
    assert backend_of(engine).calls == 2
    (result,) = decision.shadow or []
    assert result.reused_answer is False and result.rating == "Unsafe"


def test_shadow_of_an_unreadable_image_and_of_a_given_verdict(
    host: PluginHost, tmp_path: Path
) -> None:
    engine = Engine(policy(LIVE, host), "colour", host=host, shadow="children-platform")
    decision = engine.assess(tmp_path / "missing.png")
    (result,) = decision.shadow or []
    assert decision.verdict.error is not None and result.error is not None
    assert result.error.kind == "image" and result.policy_id == "children-platform"
    assert "human_review" in names(result.actions)  # the shadow policy's own failure rule
    assert backend_of(engine).calls == 0

    given = Verdict(
        rating="Unsafe",
        category_id="O2",
        policy_id="live",
        policy_version="1",
        policy_hash=engine.compiled.hash,
    )
    (result,) = engine.decide(given).shadow or []
    assert result.rating == "Unsafe" and "block" in names(result.actions)
    assert result.policy_hash == engine.shadow.compiled.hash  # type: ignore[union-attr]


def test_shadow_steps_of_a_shadow_policy_do_not_run(host: PluginHost) -> None:
    engine = Engine("llavaguard", "colour", host=host, shadow=policy(WITH_SHADOW_STEP, host))
    (result,) = engine.assess(red_image(BORDERLINE)).shadow or []
    assert result.source == "live" and result.rating == "Safe"
    assert {t.step for t in result.trace} == {"moderation"}


def test_an_engine_with_a_shadow_policy_is_not_sent_to_ray_without_it(host: PluginHost) -> None:
    from policy_engine.ray import EngineSpec

    assert EngineSpec.from_engine(Engine("llavaguard", "colour", host=host)).policy.id
    shadowed = Engine("llavaguard", "colour", host=host, shadow="children-platform")
    with pytest.raises(PolicyEngineError, match="shadow policy does not run on Ray"):
        EngineSpec.from_engine(shadowed)


# --- sinks -------------------------------------------------------------------------------------


def test_the_decision_log_keeps_the_shadow(
    host: PluginHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "decisions.jsonl"
    monkeypatch.setenv(sinks.ENV_PATH, str(log))
    try:
        live = policy(WITH_SHADOW_STEP, host)
        engine = Engine(live, "colour", host=host, shadow=CANDIDATE_FILE(tmp_path))
        decisions = list(engine.assess_many([red_image(BORDERLINE), red_image(0.0)]))
    finally:
        sinks.close_configured_sinks()
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines == [d.model_dump_json(exclude_none=True) for d in decisions]
    logged = json.loads(lines[0])
    assert logged["rating"] == "Safe" and logged["actions"] == []
    assert [(s["kind"], s["source"]) for s in logged["shadow"]] == [
        ("step", "candidate-cut"),
        ("policy", "candidate"),
    ]
    assert [s["rating"] for s in logged["shadow"]] == ["Unsafe", "Unsafe"]
    assert all(names(s["actions"]) == ["block"] for s in logged["shadow"])
    assert Decision.model_validate_json(lines[0]).shadow == decisions[0].shadow


def CANDIDATE_FILE(folder: Path) -> Path:
    path = folder / "candidate.yaml"
    path.write_text(CANDIDATE, encoding="utf-8")
    return path


# --- the CLI, audit and report -----------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, value in enumerate((0.0, BORDERLINE, 0.9)):
        red_image(value).save(folder / f"{index}.png")
    return folder


def test_assess_with_shadow_on_the_command_line(host: PluginHost, images: Path) -> None:
    candidate = CANDIDATE_FILE(images.parent)
    runner = CliRunner()
    args = ["assess", str(images / "1.png"), "-b", "colour", "--shadow", str(candidate)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert decision["rating"] == "Safe" and decision["actions"] == []
    assert decision["shadow"][0]["source"] == "candidate"
    assert decision["shadow"][0]["rating"] == "Unsafe"
    table = runner.invoke(cli, [*args, "--format", "table"])
    assert "[shadow policy candidate: Unsafe -> block]" in table.stdout
    unknown = runner.invoke(cli, [*args[:-1], "no-such-policy"])
    assert unknown.exit_code == 2 and "no-such-policy" in unknown.stderr
    ray = runner.invoke(
        cli, ["audit", str(images), "--out", str(images.parent / "r.db"), "-b", "colour",
              "--shadow", str(candidate), "--executor", "ray"]
    )  # fmt: skip
    assert ray.exit_code == 2 and "--shadow runs with --executor local only" in ray.stderr


def test_audit_keeps_the_shadow_and_report_compares_it(host: PluginHost, images: Path) -> None:
    candidate = CANDIDATE_FILE(images.parent)
    out = images.parent / "results.db"
    runner = CliRunner()
    audit = runner.invoke(
        cli,
        ["audit", str(images), "--out", str(out), "-p", "llavaguard", "-b", "colour",
         "--shadow", str(candidate), "--no-progress"],
    )  # fmt: skip
    assert audit.exit_code == 0, audit.output
    with ResultStore(out) as store:
        rows = {row.id: row for row in store.rows()}
        assert store.meta["shadow_policy_id"] == "candidate"
    assert [rows[i].rating for i in ("0.png", "1.png", "2.png")] == ["Safe", "Safe", "Unsafe"]
    assert all(row.actions == [] for row in rows.values())  # enforced: llavaguard's, none
    assert all(row.decision["shadow"][0]["source"] == "candidate" for row in rows.values())

    report = runner.invoke(cli, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.output
    (source,) = json.loads(report.stdout)["shadow"]["sources"]
    assert (source["kind"], source["source"]) == ("policy", "candidate")
    assert (source["compared"], source["agree"], source["differ"]) == (3, 1, 2)
    assert (source["live_flagged"], source["shadow_flagged"]) == (1, 2)
    assert source["rating_changes"] == {"Safe -> Unsafe": 1}
    differences = {d["id"]: d for d in source["differences"]}
    assert set(differences) == {"1.png", "2.png"}
    assert differences["1.png"]["live"] == {"rating": "Safe", "actions": []}
    assert differences["1.png"]["shadow"] == {"rating": "Unsafe", "actions": ["block"]}

    text = runner.invoke(cli, ["report", str(out)]).stdout
    assert "Shadow vs live (3 rows with a shadow result; never enforced)" in text
    label = f"policy candidate {source['policy_hash'][:19]}"
    assert source["policy_hash"] == rows["0.png"].decision["shadow"][0]["policy_hash"]
    assert f"{label}: 3 compared, 1 agree (33.3%), 2 differ" in text
    assert "1.png: Safe [] => Unsafe [block]" in text
    page = images.parent / "report.html"
    assert runner.invoke(cli, ["report", str(out), "--html", str(page)]).exit_code == 0
    html = page.read_text(encoding="utf-8")
    assert '<section id="shadow">' in html and 'href="#shadow"' in html
    assert (
        "<td><code>1.png</code></td><td>Safe</td><td>(none)</td><td>Unsafe</td><td>block</td>"
        in html
    )


def test_eval_records_the_shadow_and_measures_the_live_policy(
    host: PluginHost, images: Path
) -> None:
    labels = images.parent / "labels.jsonl"
    rows = [("0.png", "Safe", "NA"), ("1.png", "Unsafe", "O1"), ("2.png", "Unsafe", "O1")]
    lines = [
        json.dumps({"image": f"images/{name}", "rating": rating, "category": category})
        for name, rating, category in rows
    ]
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    candidate = CANDIDATE_FILE(images.parent)
    runner = CliRunner()
    base = ["eval", str(labels), "-b", "colour", "--format", "json"]
    plain = runner.invoke(cli, base)
    out = images.parent / "eval.db"
    shadowed = runner.invoke(cli, [*base, "--shadow", str(candidate), "--out", str(out)])
    assert plain.exit_code == shadowed.exit_code == 0, shadowed.output
    # the metrics are the live policy's: the candidate would have caught 1.png
    assert json.loads(shadowed.stdout)["metrics"] == json.loads(plain.stdout)["metrics"]
    assert json.loads(plain.stdout)["metrics"]["fn"] == 1
    with ResultStore(out) as store:
        kept = {row.id: row for row in store.rows()}
    assert {row.decision["shadow"][0]["source"] for row in kept.values()} == {"candidate"}
    assert [kept[i].decision["shadow"][0]["rating"] for i in sorted(kept)] == [
        "Safe",
        "Unsafe",
        "Unsafe",
    ]


def _row(index: int, rating: str, actions: list[str], shadow: list[dict[str, Any]]) -> ResultRow:
    return ResultRow(
        id=f"r{index}",
        seq=index,
        source=f"r{index}.png",
        ok=True,
        rating=rating,
        category_id=None,
        severity=None,
        p_unsafe=None,
        actions=actions,
        error_kind=None,
        error=None,
        decision={"shadow": shadow},
    )


def test_the_comparison_keeps_versions_apart_and_bounds_its_examples() -> None:
    def result(digest: str, rating: str | None, *actions: str) -> dict[str, Any]:
        named = [{"name": a, "by": "x"} for a in actions]
        return {"kind": "policy", "source": "cand", "policy_hash": digest, "rating": rating,
                "actions": named}  # fmt: skip

    comparison = ShadowComparison(examples=2)
    for index in range(5):  # version one: always blocks what live allows
        comparison.add(_row(index, "Safe", ["allow"], [result("sha256:one", "Safe", "block")]))
    comparison.add(_row(5, "Unsafe", ["block"], [result("sha256:two", None, "human_review")]))
    comparison.add(_row(6, "Unsafe", ["block"], []))  # no shadow: not compared
    one, two = comparison.sources.values()
    assert (one.compared, one.agree, one.differ, len(one.differences)) == (5, 0, 5, 2)
    assert (one.live_flagged, one.shadow_flagged) == (0, 5) and not one.ratings
    assert (two.compared, two.differ, dict(two.ratings)) == (1, 1, {"Unsafe -> error": 1})
    assert comparison.rows == 6
    text = "\n".join(comparison.text_lines())
    assert "policy cand sha256:one: 5 compared, 0 agree (0.0%), 5 differ" in text
    assert "... 3 more" in text and "r5: Unsafe [block] => error [human_review]" in text
    assert "<p>… 3 more</p>" in comparison.html_section()


def test_a_report_without_shadow_has_no_shadow_section(host: PluginHost, images: Path) -> None:
    out = images.parent / "plain.db"
    runner = CliRunner()
    args = ["audit", str(images), "--out", str(out), "-b", "colour", "--no-progress"]
    assert runner.invoke(cli, args).exit_code == 0
    assert "shadow" not in json.loads(runner.invoke(cli, ["report", str(out), "--json"]).stdout)
    assert "Shadow" not in runner.invoke(cli, ["report", str(out)]).stdout


# --- serve -------------------------------------------------------------------------------------

fastapi = pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve import Api, data_url, wait_for  # noqa: E402

from policy_engine.serve.accesslog import EventLog  # noqa: E402
from policy_engine.serve.app import create_app  # noqa: E402
from policy_engine.serve.pool import EnginePool  # noqa: E402
from policy_engine.serve.settings import ServeSettings  # noqa: E402


def png_bytes(value: float) -> bytes:
    buffer = io.BytesIO()
    red_image(value).save(buffer, "PNG")
    return buffer.getvalue()


def png_url(value: float) -> str:
    return data_url(png_bytes(value))


@pytest.fixture
def api(host: PluginHost) -> Iterator[Api]:
    pool = EnginePool(["llavaguard", policy(CANDIDATE, host)], "colour", host=host)
    app = create_app(ServeSettings(), pool, log=EventLog(io.StringIO()))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        yield Api(client)


def test_assess_returns_the_shadow_under_its_own_key_and_enforces_live(api: Api) -> None:
    body = {"image": png_url(BORDERLINE), "policy": "llavaguard", "shadow": "candidate"}
    answer = api.post("/v1/assess", json=body)
    assert answer.status_code == 200
    decision = answer.json()["decision"]
    assert decision["rating"] == "Safe" and decision["actions"] == []
    (result,) = decision["shadow"]
    assert (result["source"], result["rating"], result["reused_answer"]) == (
        "candidate",
        "Unsafe",
        True,
    )
    assert names(result["actions"]) == ["block"]

    plain = api.post("/v1/assess", json={"image": png_url(BORDERLINE)}).json()["decision"]
    assert plain.get("shadow") is None
    form = api.post(
        "/v1/assess",
        files={"image": ("x.png", png_bytes(BORDERLINE), "image/png")},
        data={"shadow": "candidate"},
    )
    assert form.status_code == 200, form.text
    assert form.json()["decision"]["shadow"][0]["rating"] == "Unsafe"

    unknown = api.post("/v1/assess", json={**body, "shadow": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "shadow"
    batch = api.post(
        "/v1/assess/batch",
        json={"items": [body, {"image": png_url(BORDERLINE)}, {**body, "shadow": "nope"}]},
    )
    assert batch.status_code == 404 and batch.json()["error"]["param"] == "items.2.shadow"
    batch = api.post("/v1/assess/batch", json={"items": [body, {"image": png_url(BORDERLINE)}]})
    first, second = batch.json()["decisions"]
    assert first["shadow"][0]["source"] == "candidate" and second.get("shadow") is None


def test_moderation_flags_by_the_live_policy_and_reports_the_shadow(api: Api) -> None:
    part = {"type": "image_url", "image_url": {"url": png_url(BORDERLINE)}}
    answer = api.post("/v1/moderations", json={"model": "llavaguard", "input": [part]})
    (result,) = answer.json()["results"]
    assert result["flagged"] is False and result["policy_engine"]["shadow"] is None

    answer = api.post(
        "/v1/moderations", json={"model": "llavaguard", "input": [part], "shadow": "candidate"}
    )
    (result,) = answer.json()["results"]
    assert result["flagged"] is False and not any(result["categories"].values())
    assert result["policy_engine"]["actions"] == []
    (shadow,) = result["policy_engine"]["shadow"]
    assert (shadow["kind"], shadow["source"], shadow["flagged"]) == ("policy", "candidate", True)
    assert shadow["categories"] == ["O1"]
    assert names(shadow["images"][0]["actions"]) == ["block"]


def test_the_service_shadow_policy_applies_to_requests_that_name_none(host: PluginHost) -> None:
    pool = EnginePool(["llavaguard"], "colour", host=host, shadow="children-platform")
    app = create_app(ServeSettings(), pool, log=EventLog(io.StringIO()))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        api = Api(client)
        decision = api.post("/v1/assess", json={"image": png_url(0.9)}).json()["decision"]
        assert names(decision["actions"]) == []
        (result,) = decision["shadow"]
        assert (result["source"], result["reused_answer"]) == ("children-platform", False)
        assert "block" in names(result["actions"])
        backend = pool.backend
        assert isinstance(backend, ColourBackend)
        calls = backend.calls
        api.post("/v1/assess", json={"image": png_url(0.9)})
        assert backend.calls == calls + 2  # the live and the shadow policy each asked once


def test_the_contract_documents_shadow_and_serve_shadow_sets_the_default(
    api: Api, host: PluginHost
) -> None:
    spec = api.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "shadow" in schemas["AssessRequest"]["properties"]
    assert "shadow" in schemas["ModerationRequest"]["properties"]
    assert "shadow" in schemas["ModerationExtension"]["properties"]
    assert "shadow" in schemas["Decision"]["properties"]
    form = spec["paths"]["/v1/assess"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "shadow" in form["schema"]["properties"]

    from policy_engine.cli.engine import EngineChoice
    from policy_engine.serve.command import _build_pool

    choice = EngineChoice(
        policy="llavaguard", backend="colour", mode="full", shadow="children-platform"
    )
    pool = _build_pool(choice, ("llavaguard",), ServeSettings(), None)
    try:
        assert pool.shadow is not None and pool.shadow.id == "children-platform"
        engine = pool.engine("llavaguard")
        assert engine.shadow is not None and engine.shadow.policy.id == "children-platform"
        assert pool.engine("llavaguard", shadow="llavaguard").shadow_reuses
    finally:
        pool.close()
