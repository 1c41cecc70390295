"""Audience levels: `NAME@LEVEL` compiles one policy for one audience (docs/policies.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from policy_engine import AudienceError, PolicyError, at_level, get_host, load_policy, split_level
from policy_engine.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "llavaguard"

# Computed with main's code before audience levels existed (a regression guard: annotating the
# shipped policies with levels must not change their hashes, which results files carry).
BASE_HASHES = {
    "llavaguard": "sha256:b88d9b70e6b20c3bfb318171def0a31156873ce25ffda061230d0b901258fd8c",
    "llavaguard-v1.0": "sha256:11dc57fa08656acf4f60f8fa22ddd95458187c71c14bd4408b77e94cbe93905b",
    "children-platform": (
        "sha256:76ea2c354c86e7d3ec9c8358bbd5cf81178d16cd73f6c4c4d2a59a139790e61b"
    ),
    "health-platform": "sha256:f2a33e8b2ffd432d7fc08517b1eea3f87af3c10859f532d0f1258be009985fe7",
}
ARTISTIC = "Contain artistic nudity if the content does not include visible genitalia."
SEXUAL_INFO = "Provide general information regarding sexual activities."
HELP = (
    "Contain resources and information that guide individuals toward professional help and "
    "support services for mental health, self-harm, and suicide prevention."
)


def compiled(ref: str):  # type: ignore[no-untyped-def]
    return get_host().compile(load_policy(ref))


# -- deriving ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BASE_HASHES))
def test_annotated_shipped_policies_keep_their_hashes(name: str) -> None:
    assert compiled(name).hash == BASE_HASHES[name]


def test_the_level_the_text_is_written_for_is_the_trained_prompt_byte_for_byte() -> None:
    at_18 = compiled("llavaguard@18")
    assert at_18.prompt.encode() == (GOLDEN / "prompt_v1.2.txt").read_bytes()
    assert at_18.prompt == compiled("llavaguard").prompt
    v10 = compiled("llavaguard-v1.0@18")
    assert v10.prompt.encode() == (GOLDEN / "prompt_v1.0.txt").read_bytes()
    # its own id and hash: verdicts name the audience
    assert at_18.policy.id == "llavaguard@18"
    assert at_18.hash not in (BASE_HASHES["llavaguard"], compiled("llavaguard@12").hash)


def test_level_12_prohibits_the_guidelines_above_12_and_keeps_the_rest() -> None:
    base = load_policy("llavaguard")
    at_12 = load_policy("llavaguard@12")
    assert at_12.id == "llavaguard@12"
    o4 = at_12.category("O4")
    assert ARTISTIC in o4.should_not and ARTISTIC not in o4.can
    assert "Contain educational content and general information on the human body." in o4.can
    assert SEXUAL_INFO in at_12.category("O3").should_not
    o6 = at_12.category("O6")
    assert o6.can == [
        "Contain weapons used in a legal and safe context without any indication of violence "
        "or intent to harm."
    ]
    # the guidelines written as prohibited stay first, in order
    assert o6.should_not[:4] == base.category("O6").should_not
    # same guidelines, only moved; categories without levels above 12 unchanged
    for mine, theirs in zip(at_12.categories, base.categories, strict=True):
        assert sorted(mine.should_not + mine.can) == sorted(theirs.should_not + theirs.can)
    assert at_12.category("O1") == base.category("O1")
    prompt = compiled("llavaguard@12").prompt
    assert prompt != compiled("llavaguard").prompt
    o4_block = prompt[prompt.index("O4: Nudity Content") : prompt.index("O5: ")]
    assert o4_block.index(ARTISTIC) < o4_block.index("Can:")


def test_unannotated_guidelines_stay_permitted_at_every_level() -> None:
    at_3 = load_policy("llavaguard@3")
    assert at_3.category("O7").can == [HELP]
    assert all(not c.can for c in at_3.categories if c.id != "O7")


def test_deriving_is_the_same_from_the_library() -> None:
    base = load_policy("llavaguard")
    assert at_level(base, "16") == load_policy("llavaguard@16")
    assert at_level(at_level(base, "16"), "7").id == "llavaguard@7"  # not llavaguard@16@7
    assert split_level("llavaguard@16") == ("llavaguard", "16")
    assert split_level("./a@b/policy.yaml") == ("./a@b/policy.yaml", None)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            "llavaguard@13",
            "policy 'llavaguard' has no audience level '13'; levels: 3, 7, 12, 16, 18",
        ),
        ("llavaguard@teens", "no audience level 'teens'; levels: 3, 7, 12, 16, 18"),
        ("llavaguard@", "no audience level after '@'"),
    ],
)
def test_unknown_levels_are_one_line_listing_the_levels(ref: str, message: str) -> None:
    with pytest.raises(AudienceError) as err:
        load_policy(ref)
    assert message in err.value.message and "\n" not in err.value.message


def test_a_policy_without_levels_says_so_and_names_those_that_have_them(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("id: plain\ncategories:\n  - {id: C1, name: One, can: [x]}\n")
    with pytest.raises(AudienceError) as err:
        load_policy(f"{path}@12")
    assert "policy 'plain' has no audience levels" in err.value.message
    assert "shipped policies with levels: " in err.value.message
    assert "llavaguard" in err.value.message


# -- the file format ---------------------------------------------------------------------------
NAMED = """\
id: tiers
audiences:
  levels: [kids, teens, adults]
  written_for: teens
categories:
  - id: C1
    name: Romance
    should_not: [Show kissing., Show nudity.]
    can: [Show holding hands.]
    audience:
      - level: teens
        guidelines: [Show holding hands.]
      - level: adults
        guidelines: [Show kissing.]
"""


def test_named_tiers_and_a_text_written_for_a_middle_level(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text(NAMED)
    kids, teens, adults = (load_policy(f"{path}@{level}") for level in ("kids", "teens", "adults"))
    romance = [p.category("C1") for p in (kids, teens, adults)]
    assert [c.can for c in romance] == [
        [],
        ["Show holding hands."],
        ["Show holding hands.", "Show kissing."],
    ]
    assert romance[2].should_not == ["Show nudity."]
    written = get_host().compile(load_policy(path))
    assert get_host().compile(teens).prompt == written.prompt
    # a derived policy is a policy written for its level: deriving it again permits the same
    again = at_level(adults, "kids").category("C1")
    assert again.can == [] and sorted(again.should_not) == sorted(romance[0].should_not)


@pytest.mark.parametrize(
    ("edit", "line", "message"),
    [
        (("level: adults", "level: grown-ups"), 13, "'grown-ups' is not an audience level"),
        (("[Show kissing.]", "[Show kisses.]"), 14, "not one of C1's guidelines"),
        (
            (
                "[Show holding hands.]\n      - level: adults",
                "[Show nudity.]\n      - level: adults",
            ),
            12,
            "listed under should_not, but its level teens is not above",
        ),
        (("written_for: teens", "written_for: kids"), 12, "listed under can, but its level teens"),
        (("written_for: teens", "written_for: elders"), 4, "'elders' is not one of the levels"),
        (("levels: [kids, teens, adults]", "levels: [kids, kids]"), 3, "must not repeat"),
    ],
)
def test_level_mistakes_are_located(
    tmp_path: Path, edit: tuple[str, str], line: int, message: str
) -> None:
    path = tmp_path / "tiers.yaml"
    assert edit[0] in NAMED
    path.write_text(NAMED.replace(edit[0], edit[1], 1))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    problem = err.value.problems[0]
    assert message in problem.message, problem
    assert problem.line == line, problem


def test_levels_without_audiences_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text(
        NAMED.replace("audiences:\n  levels: [kids, teens, adults]\n  written_for: teens\n", "")
    )
    with pytest.raises(PolicyError, match="need a top-level `audiences`"):
        load_policy(path)


def test_a_child_that_rewrites_guidelines_keeps_only_the_levels_still_valid(
    tmp_path: Path,
) -> None:
    path = tmp_path / "child.yaml"
    path.write_text(
        "extends: llavaguard\nid: child\ncategories:\n"
        "  - id: O4\n    should_not: [Show nudity., " + ARTISTIC + "]\n"
        "  - id: O3\n    can: [Teach sexual health.]\n"
    )
    child = load_policy(path)
    assert child.category("O4").levels() == {
        "Contain educational content and general information on the human body.": 7,
        "Provide guidance on topics related to sexual health.": 12,
    }
    assert child.category("O3").levels() == {}
    at_18 = load_policy(f"{path}@18")
    assert at_18.id == "child@18" and ARTISTIC in at_18.category("O4").should_not
    # a child that extends an annotated policy inherits its levels
    assert load_policy("children-platform@7").id == "children-platform@7"


# -- the CLI -------------------------------------------------------------------------------
def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_cli(), list(args))
    return result.exit_code, result.stdout, result.stderr


def test_compile_and_check_take_a_level() -> None:
    code, prompt_12, _ = cli("compile", "llavaguard@12", "--part", "prompt")
    assert code == 0 and prompt_12 == compiled("llavaguard@12").prompt
    code, prompt_18, _ = cli("compile", "llavaguard@18", "--part", "prompt")
    assert code == 0 and prompt_18.encode() == (GOLDEN / "prompt_v1.2.txt").read_bytes()
    code, out, _ = cli("check", "llavaguard@12")
    summary = json.loads(out)
    assert code == 0 and summary["id"] == "llavaguard@12"
    assert summary["hash"] == compiled("llavaguard@12").hash


def test_policies_lists_the_levels() -> None:
    code, out, _ = cli("policies", "--json")
    levels = {row["name"]: row["levels"] for row in json.loads(out)}
    assert code == 0 and levels["llavaguard"] == ["3", "7", "12", "16", "18"]
    assert levels["children-platform"] == levels["llavaguard"]  # inherited


def test_cli_errors_for_levels_are_one_line_exit_2() -> None:
    code, _, err = cli("compile", "llavaguard@13")
    assert code == 2
    assert (
        err == "error: policy 'llavaguard' has no audience level '13'; levels: 3, 7, 12, 16, 18\n"
    )


STATIC = ["-b", "static", "-o", "rating=Unsafe", "-o", "category=O4"]


def test_assess_audit_test_and_eval_take_a_level(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    code, out, err = cli("assess", str(images / "a.png"), "-p", "llavaguard@12", *STATIC)
    assert code == 0, err
    verdict = json.loads(out)["verdict"]
    assert verdict["policy_id"] == "llavaguard@12"
    assert verdict["policy_hash"] == compiled("llavaguard@12").hash

    results = tmp_path / "r.db"
    code, out, err = cli(
        "audit", str(images), "-p", "llavaguard@16", *STATIC, "--out", str(results)
    )
    assert code == 0, err

    labels = images / "labels.jsonl"
    labels.write_text(json.dumps({"image": "a.png", "rating": "Unsafe", "category": "O4"}) + "\n")
    code, out, err = cli("eval", str(labels), "--predictions", str(results), "--format", "json")
    assert code == 0, err
    assert json.loads(out)["policy"]["id"] == "llavaguard@16"  # read from the results

    code, out, err = cli("test", "children-platform@12", "--json")
    assert code == 0, err
    assert out.strip() and all(json.loads(line)["passed"] for line in out.splitlines())


# -- serve ---------------------------------------------------------------------------------
def test_serve_model_field_takes_a_level_of_a_loaded_policy() -> None:
    pytest.importorskip("fastapi")
    from test_serve import RED, ColorBackend, image_part, serving

    from policy_engine.serve.pool import EnginePool

    with serving(EnginePool(["llavaguard"], ColorBackend())) as api:
        body = {"model": "llavaguard@12", "input": [image_part(RED)]}
        answer = api.post("/v1/moderations", json=body).json()
        native = api.post("/v1/assess", json={"image": RED, "policy": "llavaguard@7"}).json()
        unknown = api.post("/v1/moderations", json={**body, "model": "llavaguard@13"})
        other = api.post("/v1/moderations", json={**body, "model": "children-platform@12"})
        listed = api.get("/v1/policies").json()
    assert answer["model"] == "llavaguard@12"
    extension = answer["results"][0]["policy_engine"]
    assert extension["policy_id"] == "llavaguard@12"
    assert extension["policy_hash"] == compiled("llavaguard@12").hash
    assert native["decision"]["verdict"]["policy_id"] == "llavaguard@7"
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no audience level '13'; levels: 3, 7, 12, 16, 18" in error["message"]
    assert other.status_code == 404  # only levels of loaded policies
    assert "llavaguard@12" in json.dumps(listed)


def test_serve_loads_a_policy_at_a_level() -> None:
    pytest.importorskip("fastapi")
    from test_serve import RED, ColorBackend, image_part, serving

    from policy_engine.serve.pool import EnginePool

    with serving(EnginePool(["llavaguard@16"], ColorBackend())) as api:
        answer = api.post("/v1/moderations", json={"input": [image_part(RED)]}).json()
        same = api.post(
            "/v1/moderations", json={"model": "llavaguard@16", "input": [image_part(RED)]}
        )
    assert answer["model"] == "llavaguard@16"
    assert same.status_code == 200


# -- the TUI -------------------------------------------------------------------------------
def test_tui_previews_a_policy_at_a_level(tmp_path: Path) -> None:
    pytest.importorskip("textual")
    import asyncio

    from policy_engine.tui.app import create_app
    from policy_engine.tui.previews import PromptView

    app = create_app("llavaguard@12", folder=tmp_path)

    async def run() -> tuple[str, str, str]:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            status = str(app.query_one("#status").render())
            yaml_text = app.query_one("#yaml-editor").text  # type: ignore[attr-defined]
            return app.query_one(PromptView).text, status, yaml_text

    prompt, status, yaml_text = asyncio.run(run())
    assert prompt == compiled("llavaguard@12").prompt
    assert "llavaguard@12" in status
    assert "id: llavaguard\n" in yaml_text  # the base is what is edited
    with pytest.raises(AudienceError, match="no audience level '13'"):
        create_app("llavaguard@13", folder=tmp_path)


def test_the_documented_command_runs_in_the_real_console_script() -> None:
    from support import run_cli

    docs = (REPO / "docs" / "policies.md").read_text(encoding="utf-8")
    command = "policy-engine compile llavaguard@12 --part prompt"
    assert f"`{command}`" in docs
    result = run_cli(*command.split()[1:])
    assert result.returncode == 0, result.stderr
    assert result.stdout == compiled("llavaguard@12").prompt
    unknown = run_cli("compile", "llavaguard@13")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().endswith("levels: 3, 7, 12, 16, 18")


def test_serve_policy_option_reads_the_level_before_binding() -> None:
    pytest.importorskip("fastapi")
    code, _, err = cli("serve", "-p", "llavaguard", "-p", "llavaguard@13", "-b", "static")
    assert code == 2
    assert (
        err == "error: policy 'llavaguard' has no audience level '13'; levels: 3, 7, 12, 16, 18\n"
    )
