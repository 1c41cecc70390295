"""The example plugin in examples/policy-engine-example-plugin, discovered as a REAL installed
distribution: its package and a dist-info (METADATA, entry_points.txt, RECORD) generated from its
own pyproject.toml are put in a temporary directory, which the `policy-engine` command sees on
PYTHONPATH. Nothing is installed into the dev venv and no network is used.

(`pip install --no-deps --no-build-isolation --target` would need `wheel` next to the venv's
setuptools; the hand-made dist-info is what such an install leaves behind, minus the wheel.)
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image
from support import run_cli, write_dist_info

from policy_engine import PluginHost, PolicyError
from policy_engine.engine import Engine

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "policy-engine-example-plugin"
MODULE = "policy_engine_example"

POLICY_YAML = """\
extends: llavaguard
id: example-tagging
postprocess:
  - name: escalate
    id: block-violence
    params: {categories: [O2], action: block}
  - name: tag
    params: {label: violent}
"""


# --- fixtures --------------------------------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))


def install_example(target: Path) -> Path:
    """Copy the package into `target` and write the dist-info an installer would write."""
    project = _pyproject()["project"]
    shutil.copytree(EXAMPLE / MODULE, target / MODULE, ignore=shutil.ignore_patterns("__pycache__"))
    return write_dist_info(
        target,
        project["name"],
        project["version"],
        project["entry-points"],
        project.get("dependencies", []),
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example plugin (built once for this module)."""
    target = tmp_path_factory.mktemp("site")
    install_example(target)
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    image = root / "image.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image, format="PNG")
    policy = root / "tagging.yaml"
    policy.write_text(POLICY_YAML, encoding="utf-8")
    return {"root": root, "image": image, "policy": policy}


def policy_engine(
    *args: str, site: Path, env: dict[str, str | None], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the real `policy-engine` with `site` on PYTHONPATH and no inherited sink log."""
    return run_cli(*args, env={"EXAMPLE_PLUGIN_LOG": None, **env}, pythonpath=site, cwd=cwd)


def plugin_names(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [info["name"] for info in json.loads(result.stdout)]


# --- the package itself ----------------------------------------------------------------------


def test_pyproject_declares_the_entry_point() -> None:
    project = _pyproject()["project"]
    assert project["name"] == "policy-engine-example-plugin"
    assert "policy-engine" in project["dependencies"]
    assert project["entry-points"]["policy_engine"] == {"example": MODULE}
    # Its own top-level package, not a module inside the policy_engine namespace.
    assert (EXAMPLE / MODULE / "__init__.py").is_file()
    assert not (EXAMPLE / "policy_engine").exists()
    assert (EXAMPLE / "README.md").is_file()


def test_docs_show_the_example_verbatim() -> None:
    docs = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    pyproject = (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    module = (EXAMPLE / MODULE / "__init__.py").read_text(encoding="utf-8")
    assert f"```toml\n{pyproject}```" in docs, "docs/plugins.md: example pyproject.toml is stale"
    assert f"```python\n{module}```" in docs, "docs/plugins.md: example module is stale"


def test_installed_distribution_is_visible_to_importlib_metadata(site: Path) -> None:
    code = (
        "import importlib.metadata as m, json;"
        "eps = [e for e in m.entry_points(group='policy_engine') if e.name == 'example'];"
        "print(json.dumps([(e.value, e.dist.metadata['Name'], e.dist.version) for e in eps]))"
    )
    environ = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    )
    assert json.loads(out.stdout) == [[MODULE, "policy-engine-example-plugin", "0.1.0"]]


# --- through the real CLI --------------------------------------------------------------------


def test_plugins_lists_the_example(site: Path, files: dict[str, Path]) -> None:
    result = policy_engine(
        "plugins", "--json", site=site, env={"POLICY_ENGINE_PLUGINS": "example"}, cwd=files["root"]
    )
    infos = {info["name"]: info for info in json.loads(result.stdout)}
    assert result.returncode == 0, result.stderr
    example = infos["example"]
    assert example["distribution"] == "policy-engine-example-plugin"
    assert example["version"] == "0.1.0"
    assert example["builtin"] is False
    assert example["hooks"] == [
        "observe_decision",
        "register_backends",
        "register_commands",
        "register_postprocessors",
    ]
    assert example["registered"] == {"backend": ["example-colour"], "post-processor": ["tag"]}
    assert example["commands"] == ["example-hello"]
    assert example["unknown_hooks"] == []
    # The built-ins are still there, next to it.
    assert {"builtin-escalation", "builtin-formats", "builtin-static"} <= set(infos)

    text = policy_engine(
        "plugins", site=site, env={"POLICY_ENGINE_PLUGINS": "example"}, cwd=files["root"]
    )
    assert "example (policy-engine-example-plugin 0.1.0)" in text.stdout
    assert "post-processors: tag" in text.stdout


def test_assess_runs_tag_after_escalate_and_logs(site: Path, files: dict[str, Path]) -> None:
    log = files["root"] / "decisions.jsonl"
    log.unlink(missing_ok=True)
    result = policy_engine(
        "assess",
        str(files["image"]),
        "--policy",
        str(files["policy"]),
        "--backend",
        "static",
        "-o",
        "rating=Unsafe",
        "-o",
        "category=O2",
        site=site,
        env={"POLICY_ENGINE_PLUGINS": "example", "EXAMPLE_PLUGIN_LOG": str(log)},
        cwd=files["root"],
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    decision = json.loads(lines[0])
    assert decision["verdict"]["rating"] == "Unsafe"
    assert decision["verdict"]["category_id"] == "O2"
    # Policy order: escalate first, then tag.
    assert [(a["name"], a["by"]) for a in decision["actions"]] == [
        ("block", "block-violence"),
        ("tag", "1:tag"),
    ]
    assert decision["actions"][1]["params"] == {"label": "violent"}
    assert [t["step"] for t in decision["trace"]] == ["block-violence", "1:tag"]
    assert "tagged 'violent'" in decision["trace"][1]["message"]

    logged = log.read_text(encoding="utf-8").splitlines()
    assert len(logged) == 1
    assert json.loads(logged[0]) == decision


def test_the_colour_backend_judges_by_colour_through_the_cli(
    site: Path, files: dict[str, Path]
) -> None:
    grey = files["root"] / "grey.png"
    Image.new("RGB", (16, 16), (120, 120, 120)).save(grey, format="PNG")
    result = policy_engine(
        "assess",
        str(files["image"]),
        str(grey),
        "--policy",
        str(files["policy"]),
        "-b",
        "example-colour",
        site=site,
        env={"POLICY_ENGINE_PLUGINS": "example"},
        cwd=files["root"],
    )
    assert result.returncode == 0, result.stderr
    red, plain = (json.loads(line) for line in result.stdout.splitlines())
    assert (red["rating"], red["category_id"]) == ("Unsafe", "O2")
    assert [a["name"] for a in red["actions"]] == ["block", "tag"]
    assert red["verdict"]["model"] == "example-colour"
    assert (plain["rating"], plain["actions"]) == ("Safe", [])
    strict = policy_engine(
        "assess",
        str(files["image"]),
        "-b",
        "example-colour",
        "-o",
        "redness=250",
        site=site,
        env={"POLICY_ENGINE_PLUGINS": "example"},
        cwd=files["root"],
    )
    assert json.loads(strict.stdout)["rating"] == "Safe"  # its option reached it


def test_example_hello_command(site: Path, files: dict[str, Path]) -> None:
    result = policy_engine(
        "example-hello",
        "--name",
        "tests",
        site=site,
        env={"POLICY_ENGINE_PLUGINS": "example"},
        cwd=files["root"],
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "plugin": "example",
        "version": "0.1.0",
        "message": "hello, tests",
    }
    helped = policy_engine(
        "--help", site=site, env={"POLICY_ENGINE_PLUGINS": "example"}, cwd=files["root"]
    )
    assert "example-hello" in helped.stdout


def test_loads_when_allowlist_unset(site: Path, files: dict[str, Path]) -> None:
    result = policy_engine(
        "plugins", "--json", site=site, env={"POLICY_ENGINE_PLUGINS": None}, cwd=files["root"]
    )
    assert "example" in plugin_names(result)


def test_empty_allowlist_loads_no_third_party_plugin(site: Path, files: dict[str, Path]) -> None:
    env: dict[str, str | None] = {"POLICY_ENGINE_PLUGINS": ""}
    names = plugin_names(policy_engine("plugins", "--json", site=site, env=env, cwd=files["root"]))
    assert "example" not in names
    assert "builtin-escalation" in names  # built-ins always load

    result = policy_engine(
        "assess",
        str(files["image"]),
        "--policy",
        str(files["policy"]),
        "--backend",
        "static",
        site=site,
        env=env,
        cwd=files["root"],
    )
    assert result.returncode == 2
    assert result.stdout == ""
    installed = "escalate, rules, severity, thresholds"
    assert f"unknown post-processor 'tag'; installed: {installed}" in result.stderr
    assert "postprocess" in result.stderr  # located in the policy file
    assert "Traceback" not in result.stderr

    missing = policy_engine("example-hello", site=site, env=env, cwd=files["root"])
    assert missing.returncode == 2
    assert "No such command 'example-hello'" in missing.stderr


def test_allowlist_naming_another_plugin_skips_it(site: Path, files: dict[str, Path]) -> None:
    result = policy_engine(
        "plugins",
        "--json",
        site=site,
        env={"POLICY_ENGINE_PLUGINS": "something-else"},
        cwd=files["root"],
    )
    assert "example" not in plugin_names(result)


def test_blocklist_disables_it(site: Path, files: dict[str, Path]) -> None:
    for allow in ("example", None):
        result = policy_engine(
            "plugins",
            "--json",
            site=site,
            env={"POLICY_ENGINE_PLUGINS": allow, "POLICY_ENGINE_DISABLE_PLUGINS": "example"},
            cwd=files["root"],
        )
        names = plugin_names(result)
        assert "example" not in names
        assert "builtin-static" in names


# --- in process: the post-processor's behaviour ----------------------------------------------


def _load_example_module() -> ModuleType:
    """Import the example from its source folder under a private name (no sys.path change)."""
    spec = importlib.util.spec_from_file_location(
        "_example_plugin_under_test", EXAMPLE / MODULE / "__init__.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load_example_module()


@pytest.fixture
def host(example: ModuleType) -> PluginHost:
    host = PluginHost()  # built-ins only (conftest empties the allowlist)
    host.register(example, name="example")
    return host


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 128, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _policy(tmp_path: Path, params: str) -> Path:
    path = tmp_path / "p.yaml"
    text = f"extends: llavaguard\nid: tagged\npostprocess:\n  - name: tag\n    params: {params}\n"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("params", "rating", "tagged"),
    [
        ("{label: x}", "Unsafe", True),
        ("{label: x}", "Safe", False),
        ("{label: x, only_unsafe: false}", "Safe", True),
    ],
)
def test_tag_only_unsafe(
    host: PluginHost, tmp_path: Path, params: str, rating: str, tagged: bool
) -> None:
    options = {"rating": rating, "category": "O2" if rating == "Unsafe" else None}
    engine = Engine(_policy(tmp_path, params), "static", backend_options=options, host=host)
    decision = engine.assess(_png())
    assert [a.name for a in decision.actions] == (["tag"] if tagged else [])
    assert len(decision.trace) == 1
    assert decision.trace[0].step == "0:tag"
    assert decision.ok


def test_tag_leaves_error_verdicts_alone(host: PluginHost, tmp_path: Path) -> None:
    engine = Engine(_policy(tmp_path, "{label: x, only_unsafe: false}"), "static", host=host)
    decision = engine.assess(b"not an image")
    assert not decision.verdict.ok
    assert decision.actions == []
    assert "verdict is an error" in decision.trace[0].message


@pytest.mark.parametrize(
    ("params", "message"),
    [("{label: x, lable: y}", "lable"), ("{only_unsafe: true}", "label"), ("{label: ''}", "label")],
)
def test_tag_params_are_validated_at_load(
    host: PluginHost, tmp_path: Path, params: str, message: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        Engine(_policy(tmp_path, params), "static", host=host)
    assert message in str(caught.value)
    assert "postprocess" in str(caught.value)


def test_sink_writes_nothing_without_the_env_var(
    example: ModuleType, host: PluginHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(example.LOG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    Engine("llavaguard", "static", host=host).assess(_png())
    assert list(tmp_path.iterdir()) == []

    log = tmp_path / "log.jsonl"
    monkeypatch.setenv(example.LOG_ENV, str(log))
    engine = Engine("llavaguard", "static", host=host)
    decisions = list(engine.assess_many([_png(), b"broken", _png()]))
    logged = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    # One line per Decision. Sinks get no ordering promise: an image that cannot be decoded is
    # observed while its batch is prepared, before the batch's model answers.
    assert sorted(json.dumps(d, sort_keys=True) for d in logged) == sorted(
        json.dumps(d.model_dump(mode="json", exclude_none=True), sort_keys=True) for d in decisions
    )
    assert sum("error" in d["verdict"] for d in logged) == 1
