"""One policy per name: what a policy reference on the command line means, where the copy of a
shipped policy goes, which ids a copy may take, and whether a prompt format shows exception
reasons to the model.

The rule (the same in every command): a reference is a file when it contains `/` or `\\`,
starts with `.`, or ends with `.yaml`/`.yml`; otherwise it is a shipped policy's name. A file
`./children-platform.yaml` beside you does not change what `children-platform` means.

Like `document.py`, this module does not import Textual.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from policy_engine import (
    PluginHost,
    PolicyEngineError,
    get_host,
    load_policy_text,
    shipped_policies,
)

from .document import PolicyDocument

COPY_SUFFIX = "-custom"
_COPY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_file_reference(ref: str) -> bool:
    """True when `ref` names a file, False when it names a shipped policy (the rule above)."""
    return "/" in ref or "\\" in ref or ref.startswith(".") or ref.endswith((".yaml", ".yml"))


def default_copy(name: str, folder: Path) -> tuple[str, Path]:
    """The id and file first offered for a copy of the shipped policy `name`: `NAME-custom`
    in `folder` (the folder the app was started in)."""
    new_id = f"{name}{COPY_SUFFIX}"
    return new_id, folder / f"{new_id}.yaml"


def copy_id_problem(new_id: str) -> str | None:
    """Why `new_id` cannot be a copy's id (None: it can). A shipped policy's name is refused:
    decisions are stamped with the id, and two policies must never share one."""
    if not new_id:
        return "Give the copy an id, e.g. my-platform."
    if new_id in shipped_policies():
        return (
            f"{new_id!r} is a shipped policy's name: a copy needs an id of its own "
            "(decisions are stamped with it)."
        )
    if not _COPY_ID.match(new_id):
        return (
            f"{new_id!r}: use letters, digits, '_', '.' and '-' (starting with a letter or digit)."
        )
    return None


def copy_file_problem(path: Path) -> str | None:
    """Why a copy cannot be saved at `path` (None: it can; an existing file is asked about
    separately). A file named like a shipped policy is refused: `policy-engine tui NAME` and
    `-p NAME` would still mean the shipped one, and the CLI warns about such files."""
    if path.suffix not in (".yaml", ".yml"):
        return f"{path.name}: a policy file ends in .yaml or .yml."
    if path.stem in shipped_policies():
        return (
            f"{path.name} is named like the shipped policy {path.stem!r}, which that name keeps "
            "meaning: pick another file name."
        )
    if not path.parent.is_dir():
        return f"No folder {path.parent}."
    if path.is_dir():
        return f"{path} is a folder."
    return None


def resolve_path(raw: str, folder: Path) -> Path:
    """A path as typed in a dialog: `~` expanded, relative to `folder`."""
    path = Path(raw).expanduser()
    return path if path.is_absolute() else folder / path


def display_path(path: Path, folder: Path) -> str:
    """`path` as a user would type it from `folder`: `./name.yaml` beside it, else in full."""
    try:
        relative = path.relative_to(folder)
    except ValueError:
        return str(path)
    return f"./{relative}"


@dataclass(frozen=True)
class Start:
    """What the app opens for a command-line reference: a document (None: ask with the New
    dialog, for `new_path` if given) and a notice to show."""

    document: PolicyDocument | None
    folder: Path
    notice: str | None = None
    new_path: Path | None = None


def start_for(ref: str | Path, folder: Path, host: PluginHost | None = None) -> Start:
    """Resolve a command-line reference by the rule: a file is opened (or, missing, started
    with the New dialog); a shipped name starts an unsaved copy of that policy, never a file
    that happens to be called like it. Raises PolicyEngineError for an unknown name."""
    if isinstance(ref, Path) or is_file_reference(ref):
        path = resolve_path(str(ref), folder)
        if not path.exists():
            return Start(None, path.parent, new_path=path)
        return Start(PolicyDocument.open(path, host=host), path.parent)
    shipped = shipped_policies()
    if ref not in shipped:
        raise PolicyEngineError(
            f"unknown policy {ref!r}; shipped: {', '.join(shipped)} (a file needs a path, "
            f"e.g. policy-engine tui ./{ref}.yaml)"
        )
    _, target = default_copy(ref, folder)
    notice = (
        f"{ref!r} is a shipped policy: you are editing an unsaved copy. ctrl+s saves it under "
        "an id and file name of your own (asked first)."
    )
    if target.is_file():
        shown = display_path(target, folder)
        notice += (
            f" A copy made earlier is at {shown}: to edit it, quit and run "
            f"`policy-engine tui {shown}` (or ctrl+o)."
        )
    beside = folder / f"{ref}.yaml"
    if beside.is_file():
        notice += (
            f" ./{beside.name} here is a file, not this policy: "
            f"`policy-engine tui ./{beside.name}` opens it."
        )
    return Start(PolicyDocument.shipped_copy(ref, target, host=host), folder, notice)


def shipped_id_warning(document: PolicyDocument) -> str | None:
    """For a file whose id is a shipped policy's name (e.g. a copy saved by an older version
    of the app), why that is a problem: its decisions are stamped as the shipped policy's."""
    policy = document.analysis.policy
    shipped = shipped_policies()
    if document.origin is not None or policy is None or policy.id not in shipped:
        return None
    if document.path.resolve() == Path(shipped[policy.id]).resolve():
        return None  # the shipped file itself (a developer's checkout)
    return (
        f"This file's id {policy.id!r} is a shipped policy's name: its decisions would look "
        "like the shipped policy's. Give it an id of its own (YAML tab, `id:`)."
    )


_REASON_PROBE = "zq-reason-probe-4e1"
_reason_shown: weakref.WeakKeyDictionary[PluginHost, dict[str, bool | None]] = (
    weakref.WeakKeyDictionary()
)


def reason_reaches_model(prompt_format: str, host: PluginHost | None = None) -> bool | None:
    """Whether the prompt format `prompt_format` puts an exception's reason into the prompt
    (the LlavaGuard formats do not; the generic one does). Found by compiling a one-category
    probe policy with that format; None when the probe does not compile."""
    host = host or get_host()
    known = _reason_shown.setdefault(host, {})
    if prompt_format not in known:
        probe = (
            "id: reason-probe\n"
            f"prompt_format: {prompt_format}\n"
            "categories:\n"
            "  - {id: P1, name: Probe, should_not: [anything]}\n"
            "exceptions:\n"
            f"  P1: {{status: non-violating, reason: {_REASON_PROBE}}}\n"
        )
        try:
            compiled = host.compile(load_policy_text(probe, "reason-probe.yaml", host=host))
        except PolicyEngineError:
            known[prompt_format] = None
        else:
            known[prompt_format] = _REASON_PROBE in compiled.prompt
    return known[prompt_format]


def reason_note(prompt_format: str, host: PluginHost | None = None) -> str:
    """One line for the category editor: whether the model reads an exception's reason."""
    shown = reason_reaches_model(prompt_format, host)
    if shown is None:
        return f"Whether the model sees it depends on the format {prompt_format!r} (F4)."
    if shown:
        return f"Prompt text: the {prompt_format} prompt shows it to the model (F4)."
    return f"Documentation only: not in the {prompt_format} prompt (F4)."
