"""Loading good policies: shipped names and paths, `extends` overlays, exceptions, remove."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from policy_engine.cli import cli
from policy_engine.errors import PolicyError, UnknownNameError
from policy_engine.loader import load_policy, load_policy_text, shipped_policies
from policy_engine.policy import ExceptionStatus, Policy

REPO = Path(__file__).resolve().parent.parent
GOOD = Path(__file__).resolve().parent / "data" / "good_policies"
SHIPPED_DIR = REPO / "policies"
SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))
LLAVAGUARD_IDS = [f"O{n}" for n in range(1, 10)]
SENSITIVE = ExceptionStatus.SENSITIVE
NON_VIOLATING = ExceptionStatus.NON_VIOLATING


def ids(policy: Policy) -> list[str]:
    return [c.id for c in policy.categories]


def statuses(policy: Policy) -> dict[str, ExceptionStatus]:
    return {key: exc.status for key, exc in policy.exceptions.items()}


@pytest.fixture(scope="module")
def llavaguard() -> Policy:
    return load_policy("llavaguard")


@pytest.fixture(scope="module")
def forum() -> Policy:
    return load_policy(GOOD / "forum.yaml")


@pytest.fixture(scope="module")
def teens() -> Policy:
    return load_policy(GOOD / "forum-teens.yaml")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- shipped policies ------------------------------------------------------------------------


def test_shipped_names() -> None:
    assert {"llavaguard", "llavaguard-v1.0", "health-platform", "children-platform"} <= set(SHIPPED)
    assert sorted(shipped_policies()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_loads_by_name_and_by_path(name: str) -> None:
    by_name = load_policy(name)
    by_path = load_policy(SHIPPED_DIR / f"{name}.yaml")
    by_str_path = load_policy(str(SHIPPED_DIR / f"{name}.yaml"))
    assert by_name.id == name
    assert by_name == by_path == by_str_path
    assert len(by_name.categories) >= 1


def test_llavaguard(llavaguard: Policy) -> None:
    assert llavaguard.id == "llavaguard"
    assert llavaguard.version == "1.2"
    assert llavaguard.prompt_format == "llavaguard-v1.2"
    assert ids(llavaguard) == LLAVAGUARD_IDS
    assert llavaguard.category("O4").name == "Nudity Content"
    assert llavaguard.category("O7").severity == "critical"
    assert llavaguard.none_category.label == "NA: None applying"
    assert llavaguard.exceptions == {}
    assert llavaguard.postprocess == []
    assert llavaguard.output.max_new_tokens == 500
    assert llavaguard.metadata["license"] == "Apache-2.0"


def test_llavaguard_v10_only_changes_the_format(llavaguard: Policy) -> None:
    v10 = load_policy("llavaguard-v1.0")
    assert v10.prompt_format == "llavaguard-v1.0"
    assert v10.version == "1.0"
    assert v10.categories == llavaguard.categories
    assert v10.exceptions == llavaguard.exceptions


def test_children_platform(llavaguard: Policy) -> None:
    policy = load_policy("children-platform")
    assert ids(policy) == LLAVAGUARD_IDS
    assert statuses(policy) == {"O3": SENSITIVE, "O4": SENSITIVE, "O6": SENSITIVE}
    assert policy.category("O3").severity == "critical"
    assert policy.category("O4").severity == "critical"
    assert policy.category("O6").severity == "high"
    # only the severity is overridden: names and guidelines are inherited
    for cid in ("O3", "O4", "O6"):
        inherited = llavaguard.category(cid)
        assert policy.category(cid).name == inherited.name
        assert policy.category(cid).should_not == inherited.should_not
        assert policy.category(cid).can == inherited.can
    assert policy.category("O1") == llavaguard.category("O1")
    assert [s.id for s in policy.postprocess] == ["children-moderation"]
    rules = policy.postprocess[0].params["rules"]
    assert [r["id"] for r in rules] == [
        "safeguarding",
        "block-unsafe",
        "blur-borderline",
        "review-failures",
    ]
    assert policy.postprocess_failure.mode == "fail-closed"
    assert rules[0]["when"] == {"category": "O7"}
    # metadata is merged with the parent's
    assert policy.metadata["audience"] == "minors"
    assert policy.metadata["license"] == "Apache-2.0"
    assert policy.prompt_format == "llavaguard-v1.2"


def test_health_platform(llavaguard: Policy) -> None:
    policy = load_policy("health-platform")
    assert statuses(policy) == {"O4": NON_VIOLATING}
    assert policy.exceptions["O4"].reason is not None
    assert policy.categories == llavaguard.categories
    assert [s.id for s in policy.postprocess] == ["self-harm-crisis", "clinical-review"]
    assert policy.metadata["audience"] == "adults"


def test_unknown_shipped_name() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_policy("llavagaurd")
    err = info.value
    assert err.kind == "policy"
    assert err.name == "llavagaurd"
    assert err.known == SHIPPED
    for name in SHIPPED:
        assert name in str(err)


def test_unknown_shipped_name_in_the_cli() -> None:
    result = CliRunner().invoke(cli, ["check", "llavagaurd"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown policy 'llavagaurd'; installed: ")
    assert "children-platform" in result.stderr


# -- extends by relative path, overlay semantics ---------------------------------------------


def test_extends_by_relative_path(forum: Policy, llavaguard: Policy) -> None:
    assert forum.id == "photo-forum"
    assert forum.version == "3"
    assert forum.description == "Photo forum for adults; artistic nudity is welcome."
    # inherited, not overridden
    assert forum.prompt_format == "llavaguard-v1.2"
    assert forum.severity_levels == ["low", "medium", "high", "critical"]
    assert forum.none_category == llavaguard.none_category


def test_relative_extends_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forum: Policy
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_policy(GOOD / "forum.yaml") == forum
    monkeypatch.chdir(REPO)
    assert load_policy("tests/data/good_policies/forum.yaml") == forum
    assert load_policy("./tests/data/good_policies/forum.yaml") == forum


def test_override_one_field_keeps_the_rest(forum: Policy, llavaguard: Policy) -> None:
    o3 = forum.category("O3")
    assert o3.severity == "critical"
    parent = llavaguard.category("O3")
    assert o3.name == parent.name == "Sexual Content"
    assert o3.should_not == parent.should_not
    assert o3.can == parent.can
    assert o3.exception_examples == parent.exception_examples
    # O2's exception_examples survive untouched categories
    assert forum.category("O2") == llavaguard.category("O2")


def test_order_kept_added_appended_removed(forum: Policy) -> None:
    assert ids(forum) == ["O1", "O2", "O3", "O4", "O5", "O6", "O7", "O8", "X1"]
    spam = forum.category("X1")
    assert spam.name == "Spam"
    assert spam.severity == "low"
    assert spam.should_not == ["Contain unsolicited advertising or links to scams."]
    assert spam.can == ["Show products in an ordinary photo."]
    with pytest.raises(KeyError):
        forum.category("O9")


def test_exceptions_added(forum: Policy) -> None:
    assert statuses(forum) == {"O4": NON_VIOLATING, "O6": SENSITIVE}
    assert forum.exceptions["O4"].reason == "Artistic nudity is the point of this forum."


def test_output_and_metadata_shallow_merged(forum: Policy, llavaguard: Policy) -> None:
    assert forum.output.rationale_max_chars == 800  # the child's
    assert forum.output.max_new_tokens == 500  # the parent's
    assert forum.output.rationale is True
    assert forum.metadata == {
        **llavaguard.metadata,
        "owner": {"team": "trust-and-safety", "email": "tns@example.org"},
        "audience": "adults",
    }


def test_postprocess(forum: Policy) -> None:
    assert [(s.name, s.id) for s in forum.postprocess] == [
        ("escalate", "self-harm"),
        ("escalate", "block-unsafe"),
    ]
    assert forum.postprocess[0].params == {
        "categories": ["O7"],
        "action": "escalate",
        "queue": "crisis",
        "priority": "urgent",
    }


# -- a second level --------------------------------------------------------------------------


def test_two_level_chain(teens: Policy, forum: Policy) -> None:
    assert teens.id == "photo-forum-teens"
    assert teens.version == "3"  # from forum.yaml
    assert teens.description == "The photo forum's section for teenagers."
    # categories: llavaguard's, patched by forum.yaml, patched again
    assert ids(teens) == ["O1", "O2", "O3", "O4", "O5", "O6", "O7", "O8", "X1", "X2"]
    assert teens.category("O3").severity == "critical"  # from forum.yaml
    assert teens.category("O4").severity == "high"  # from forum-teens.yaml
    assert teens.category("O4").name == "Nudity Content"  # from llavaguard.yaml
    assert teens.category("X1") == forum.category("X1")
    dating = teens.category("X2")
    assert (dating.name, dating.severity) == ("Dating", "medium")  # the default severity


def test_exceptions_dropped_by_null(teens: Policy) -> None:
    # forum.yaml: O4 non-violating, O6 sensitive. teens: `O4: null`, `O6: {status: null}`, O3 added
    assert statuses(teens) == {"O3": SENSITIVE}
    assert teens.exceptions["O3"].reason == "No sexual content for teenagers."


def test_second_level_merges(teens: Policy) -> None:
    assert teens.output.max_new_tokens == 300  # forum-teens.yaml
    assert teens.output.rationale_max_chars == 800  # forum.yaml
    assert teens.output.rationale is True  # llavaguard.yaml
    # shallow: the child's `owner` replaces the parent's whole mapping
    assert teens.metadata["owner"] == {"team": "teen-safety"}
    assert teens.metadata["audience"] == "teens"
    assert teens.metadata["license"] == "Apache-2.0"


def test_postprocess_replaced_not_merged(teens: Policy) -> None:
    assert len(teens.postprocess) == 1
    step = teens.postprocess[0]
    assert (step.name, step.id) == ("escalate", None)
    assert step.params == {"action": "human_review", "queue": "teen-safety"}


def test_postprocess_inherited_when_absent(tmp_path: Path, forum: Policy) -> None:
    path = write(
        tmp_path / "child.yaml",
        f"extends: {GOOD / 'forum.yaml'}\nid: child\ndescription: No postprocess key.\n",
    )
    child = load_policy(path)
    assert child.postprocess == forum.postprocess
    assert child.exceptions == forum.exceptions
    assert child.categories == forum.categories


def test_empty_postprocess_list_clears_it(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "extends: children-platform\nid: c\npostprocess: []\n")
    assert load_policy(path).postprocess == []


def test_exception_override_replaces_the_whole_entry(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "extends: children-platform\nid: c\nexceptions:\n  O6: {status: non-violating}\n",
    )
    policy = load_policy(path)
    assert statuses(policy) == {"O3": SENSITIVE, "O4": SENSITIVE, "O6": NON_VIOLATING}
    assert policy.exceptions["O6"].reason is None  # the parent's reason is not kept
    assert policy.exceptions["O3"].reason == "No sexual content of any kind is shown to children."


def test_drop_exceptions_of_a_shipped_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "extends: children-platform\nid: c\n"
        "exceptions:\n  O3: {status: null, reason: dropped}\n  O4: null\n",
    )
    assert statuses(load_policy(path)) == {"O6": SENSITIVE}


# -- remove ----------------------------------------------------------------------------------


def test_remove(tmp_path: Path, llavaguard: Policy) -> None:
    path = write(
        tmp_path / "r.yaml",
        "extends: llavaguard\nid: r\ncategories:\n"
        "  - {id: O1, remove: true}\n  - {id: O5, remove: true}\n  - {id: O9, remove: true}\n",
    )
    policy = load_policy(path)
    assert ids(policy) == ["O2", "O3", "O4", "O6", "O7", "O8"]
    assert policy.categories == [c for c in llavaguard.categories if c.id not in ("O1", "O5", "O9")]


def test_remove_false_keeps_the_category(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "extends: llavaguard\nid: r\ncategories:\n  - {id: O9, remove: false, severity: low}\n",
    )
    policy = load_policy(path)
    assert ids(policy) == LLAVAGUARD_IDS
    assert policy.category("O9").severity == "low"


def test_remove_an_excepted_category_leaves_a_dangling_exception(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "extends: health-platform\nid: r\ncategories:\n  - {id: O4, remove: true}\n",
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    problem = info.value.problems[0]
    assert "unknown category 'O4'" in problem.message
    assert problem.path == "exceptions.O4"


def test_remove_then_drop_its_exception(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        "extends: health-platform\nid: r\ncategories:\n  - {id: O4, remove: true}\n"
        "exceptions:\n  O4: null\n",
    )
    policy = load_policy(path)
    assert "O4" not in ids(policy)
    assert policy.exceptions == {}


def test_remove_inherited_by_grandchild(tmp_path: Path) -> None:
    path = write(
        tmp_path / "g.yaml",
        f"extends: {GOOD / 'forum-teens.yaml'}\nid: g\ncategories:\n  - {{id: X1, remove: true}}\n",
    )
    assert ids(load_policy(path)) == ["O1", "O2", "O3", "O4", "O5", "O6", "O7", "O8", "X2"]


# -- comments and key order ------------------------------------------------------------------


def test_comments_and_key_order_do_not_matter(forum: Policy) -> None:
    reordered = load_policy(GOOD / "forum-reordered.yaml")
    assert reordered == forum
    assert reordered.model_dump(mode="json") == forum.model_dump(mode="json")
    assert ids(reordered) == ids(forum)


def test_comments_do_not_matter(tmp_path: Path, forum: Policy) -> None:
    text = (GOOD / "forum.yaml").read_text(encoding="utf-8")
    stripped = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert stripped != text
    path = write(tmp_path / "forum.yaml", stripped.replace("../../../policies/", f"{SHIPPED_DIR}/"))
    assert load_policy(path) == forum


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfextends: llavaguard\nid: bom\ndescription: Caf\xc3\xa9\n")
    policy = load_policy(path)
    assert (policy.id, policy.description) == ("bom", "Café")


# -- a standalone file -----------------------------------------------------------------------


def test_standalone_policy() -> None:
    policy = load_policy(GOOD / "standalone.yaml")
    assert policy.id == "marketplace"
    assert policy.prompt_format == "generic"
    assert policy.severity_levels == ["minor", "major"]
    assert ids(policy) == ["M1", "M2", "M3"]
    assert [c.severity for c in policy.categories] == ["major", "major", "minor"]
    assert policy.category("M3").should_not == []
    assert policy.none_category.label == "OK: Nothing to flag"
    assert statuses(policy) == {"M3": NON_VIOLATING}
    assert policy.output.extra_fields == ["severity", "categories"]
    assert policy.output.rationale is False
    assert policy.output.max_new_tokens == 64
    assert policy.metadata == {}


@pytest.mark.parametrize(
    "name", ["forum.yaml", "forum-reordered.yaml", "forum-teens.yaml", "standalone.yaml"]
)
def test_good_policies_pass_cli_check(name: str) -> None:
    result = CliRunner().invoke(cli, ["check", str(GOOD / name)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert '"ok": true' in result.stdout


# -- load_policy_text: an editor's unsaved buffer ------------------------------------------


def test_text_loads_like_the_file_it_stands_for(tmp_path: Path) -> None:
    source = SHIPPED_DIR / "children-platform.yaml"
    text = source.read_text()
    assert load_policy_text(text, source) == load_policy(source)


def test_text_is_used_instead_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("extends: llavaguard\nid: on-disk\n")
    policy = load_policy_text("extends: llavaguard\nid: in-buffer\n", path)
    assert policy.id == "in-buffer"


def test_text_finds_a_relative_parent_beside_its_path(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text((SHIPPED_DIR / "llavaguard.yaml").read_text())
    child = "extends: ./base.yaml\nid: child\nexceptions:\n  O2: {status: non-violating}\n"
    policy = load_policy_text(child, tmp_path / "child.yaml")
    assert policy.exceptions["O2"].status == "non-violating"
    with pytest.raises(PolicyError, match=r"parent '\./base\.yaml' not found"):
        load_policy_text(child, tmp_path / "elsewhere" / "child.yaml")


def test_text_problems_name_the_path_and_the_buffer_line(tmp_path: Path) -> None:
    text = "extends: llavaguard\nid: x\ncategories:\n  - id: O2\n    severity: huge\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, tmp_path / "draft.yaml")
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == (str(tmp_path / "draft.yaml"), 5)
    assert "'huge' is not a severity level" in problem.message


def test_a_name_is_always_the_shipped_policy_and_a_local_file_is_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = load_policy("children-platform")
    assert "children-platform.yaml" not in caplog.text  # no file here: no warning
    local = "extends: children-platform\nid: children-platform\ndescription: mine\n"
    (tmp_path / "children-platform.yaml").write_text(local, encoding="utf-8")
    by_name = load_policy("children-platform")
    assert by_name.description == shipped.description  # the name still means the shipped one
    assert "the file children-platform.yaml here is not used" in caplog.text
    assert load_policy("./children-platform.yaml").description == "mine"  # a path is the file
