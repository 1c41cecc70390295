"""The `policy-engine` command line. JSON on stdout; user errors as one line each on stderr.

Exit status: 0 success; 1 some items failed (assess, audit, eval, test) or a backend fault; 2 a
user error (bad policy, unknown name, bad option). Plugins add commands through
`register_commands`; backends add flags through `Backend.cli_flags`.
"""

from __future__ import annotations

from . import commands as _commands  # noqa: F401  (registers the core commands on `cli`)
from .commands import assess, echo_row
from .engine import EngineChoice, EngineCommand, engine_choice, engine_options, parse_pairs
from .group import POLICY_HELP, build_cli, cli, echo_json, main

__all__ = [
    "POLICY_HELP",
    "EngineChoice",
    "EngineCommand",
    "assess",
    "build_cli",
    "cli",
    "echo_json",
    "echo_row",
    "engine_choice",
    "engine_options",
    "main",
    "parse_pairs",
]
