"""`import policy_engine` and `policy-engine --help` never try to import heavy libraries.

A meta-path finder records every *attempt* to import a forbidden package, so the test means the
same whether or not torch, transformers or textual happen to be installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = (
    "torch",
    "transformers",
    "textual",
    "torchvision",
    "llguidance",
    "sglang",
    "aiohttp",
    "pyarrow",
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "python_multipart",
    "openai",
    "schemathesis",
    "ruamel",
    "tree_sitter",
    "tree_sitter_yaml",
    "ray",
    "diffusers",
)

PROBE = """
import json, sys
FORBIDDEN = set({forbidden!r})
attempts = []
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            attempts.append(name)
        return None
sys.meta_path.insert(0, Recorder())
{body}
print(json.dumps(sorted(set(attempts))))
"""

BODIES = {
    "import": "import policy_engine",
    "help": (
        "from policy_engine.cli import main\n"
        "sys.argv = ['policy-engine', '--help']\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit:\n        pass"
    ),
    "assess-help": (
        "from policy_engine.cli import main\n"
        "sys.argv = ['policy-engine', 'assess', '--help']\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit:\n        pass"
    ),
    "tui-help": (
        "from policy_engine.cli import main\n"
        "sys.argv = ['policy-engine', 'tui', '--help']\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit:\n        pass"
    ),
    "compile": (
        "from policy_engine import get_host, load_policy\n"
        "get_host().compile(load_policy('llavaguard'))"
    ),
    "backends": (
        "from policy_engine.host import get_host\n"
        "get_host().backends()\n"
        "get_host().backend('transformers')(model='tiny-random', greedy=True)\n"
        "get_host().backend('sglang')(url='http://127.0.0.1:1', transport='native')"
    ),
    # the diffusers drop-in imports torch, numpy and diffusers inside its functions only
    "integration": (
        "from policy_engine.integrations.diffusers import PolicySafetyChecker\n"
        "PolicySafetyChecker(policy='llavaguard', backend='static')"
    ),
    "control": "import importlib.util\nimportlib.util.find_spec('torch')",
}


def attempts(body: str) -> list[str]:
    code = PROBE.format(forbidden=FORBIDDEN, body=body)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "case", ["import", "help", "tui-help", "compile", "backends", "integration"]
)
def test_no_heavy_imports(case: str) -> None:
    assert attempts(BODIES[case]) == []


def test_probe_detects_an_attempt() -> None:
    # The control proves the recorder sees attempts, so an empty list above means something.
    assert attempts(BODIES["control"]) == ["torch"]
