"""The document the TUI edits: a policy file's text, what it means, and structured edits.

The text is the single source of truth. The structured views (categories, exceptions) read the
resolved policy and write back through round-trip YAML (ruamel.yaml), so the author's comments,
key order, quoting and layout survive wherever an edit did not touch them. In a file that
`extends` another, an edit writes the smallest overlay: a category patch (`- id: O2` with the
changed field), a `remove: true` entry, an exception (or `null` to drop an inherited one).

This module does not import Textual: it is the part of the app the tests can reason about
without a screen.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from policy_engine import (
    PluginHost,
    Policy,
    PolicyEngineError,
    load_policy,
    shipped_policies,
)

from .analysis import Analysis, analyse, prompt_diff
from .roundtrip import (
    LAYOUTS,
    append,
    child_at,
    dump,
    layout_for,
    patch_lines,
    put,
    settle,
    yaml_for,
)

EXCEPTION_STATES = ("none", "non-violating", "sensitive")
GUIDELINE_FIELDS = ("should_not", "can")
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")


class EditError(PolicyEngineError):
    """A structured edit that cannot be written into this file (the message says why)."""


# -- the document --------------------------------------------------------------------------


class PolicyDocument:
    """A policy file being edited: its text, the text last saved, and structured edits."""

    def __init__(
        self,
        path: str | Path,
        text: str,
        *,
        saved_text: str | None = None,
        host: PluginHost | None = None,
        origin: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.text = text
        self.saved_text = text if saved_text is None else saved_text
        self.on_disk = saved_text is None  # False until a new document is first saved
        self.initial_text = text  # a new document's prompt diff starts from what it copied
        self.host = host
        self.origin = origin
        """The shipped policy this unsaved copy was opened from (None for any file): saving
        it asks for an id and a file of its own (`save_as`)."""
        self._analysis: Analysis | None = None
        self._saved_analysis: Analysis | None = None
        self._parents: dict[str, Policy | None] = {}
        self._plain_cache: tuple[str, dict[str, Any]] | None = None
        self._layout: tuple[str, tuple[int, int, int]] | None = None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, host: PluginHost | None = None) -> PolicyDocument:
        """Open a policy file; raises PolicyEngineError with one readable line."""
        path = Path(path).expanduser()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise PolicyEngineError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise PolicyEngineError(f"{path}: is a directory, not a policy file") from None
        except OSError as err:
            raise PolicyEngineError(f"{path}: cannot read: {err.strerror}") from None
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise PolicyEngineError(f"{path}: not a UTF-8 text file") from None
        return cls(path, text, host=host)

    @classmethod
    def new_from(
        cls, base: str, path: str | Path, how: str = "copy", host: PluginHost | None = None
    ) -> PolicyDocument:
        """A new, unsaved document at `path` from a shipped policy: a verbatim copy (comments
        and all) or a small file that `extends` it."""
        path = Path(path).expanduser()
        new_id = _id_from(path.stem)
        if new_id in shipped_policies():
            raise PolicyEngineError(
                f"{new_id!r} is a shipped policy's name: a new policy needs an id of its own "
                "(it comes from the file name: pick another)"
            )
        if how == "copy":
            document = cls.shipped_copy(base, path, host=host)
            document.origin = None
            document.set_id(new_id)
            document.initial_text = document.text
            return document
        if how == "extends":
            _shipped_text(base)  # an unknown name is refused here, not when the file loads
            text = (
                f"# {new_id}: based on the shipped policy {base!r}. Its categories, exceptions\n"
                "# and post-processors apply unless this file overrides them.\n"
                f"extends: {base}\n"
                f"id: {new_id}\n"
                'version: "1"\n'
                f"description: Based on {base}.\n"
            )
        else:
            raise PolicyEngineError(f"unknown way to start a policy {how!r}; use copy or extends")
        return cls(path, text, saved_text="", host=host)

    @classmethod
    def shipped_copy(
        cls, name: str, path: str | Path, host: PluginHost | None = None
    ) -> PolicyDocument:
        """An unsaved, unedited copy of the shipped policy `name` (comments and all), still
        with its id: clean until edited; `save_as` gives it an id and file of its own, `path`
        being the file first offered."""
        text = _shipped_text(name)
        return cls(Path(path).expanduser(), text, saved_text="", host=host, origin=name)

    # -- state ---------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Unsaved changes: an edit since the last save; a new file not yet written; an edit
        of a shipped policy's copy (opened unedited, that copy is clean)."""
        if self.on_disk:
            return self.text != self.saved_text
        if self.origin is not None:
            return self.text != self.initial_text
        return True

    @property
    def analysis(self) -> Analysis:
        if self._analysis is None or self._analysis.text != self.text:
            self._analysis = analyse(self.text, self.path, self.host)
        return self._analysis

    @property
    def saved_analysis(self) -> Analysis:
        """The last saved text's meaning (for a new document: the text it started from)."""
        text = self.saved_text if self.on_disk else self.initial_text
        if self._saved_analysis is None or self._saved_analysis.text != text:
            self._saved_analysis = analyse(text, self.path, self.host)
        return self._saved_analysis

    def prompt_diff(self) -> str:
        return prompt_diff(self.saved_analysis, self.analysis)

    def changed_on_disk(self) -> bool:
        """True when the file on disk is no longer what this document last read or saved."""
        if not self.on_disk:
            return self.path.exists()
        try:
            return self.path.read_text(encoding="utf-8").removeprefix("\ufeff") != self.saved_text
        except (OSError, UnicodeDecodeError):
            return True

    def save(self) -> None:
        """Write the text atomically (a crash never leaves half a file), keeping the mode."""
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise PolicyEngineError(f"{folder}: no such folder")
        try:
            mode = self.path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        handle, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
                out.write(self.text)
            os.chmod(temp, mode)
            os.replace(temp, self.path)
        except OSError as err:
            Path(temp).unlink(missing_ok=True)
            raise PolicyEngineError(f"{self.path}: cannot save: {err.strerror}") from None
        self.saved_text = self.text
        self.on_disk = True
        self.origin = None

    def save_as(self, path: str | Path, new_id: str) -> None:
        """Give the document the id `new_id` (written into the text, comments kept) and save it
        at `path`; on failure the document is as it was."""
        before = (self.text, self.path, self._layout)
        if self._plain().get("id") != new_id:
            self.set_id(new_id)
        self.path = Path(path)
        try:
            self.save()
        except PolicyEngineError:
            self.text, self.path, self._layout = before
            raise

    # -- what the file itself says ---------------------------------------------------------
    def _load_tree(self) -> tuple[YAML, Any]:
        if self._layout is None or self._layout[0] != self.text:
            self._layout = (self.text, layout_for(self.text))
        yaml = yaml_for(*self._layout[1])
        try:
            data = yaml.load(self.text)
        except YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise EditError(
                f"the YAML does not parse{where}: fix it in the YAML tab first"
            ) from None
        if not isinstance(data, CommentedMap):
            raise EditError("the file is not a YAML mapping: fix it in the YAML tab first")
        return yaml, data

    def _parent(self, data: dict[str, Any]) -> Policy | None:
        """The resolved policy this file extends (None for a standalone file)."""
        ref = data.get("extends")
        if not isinstance(ref, str) or not ref:
            return None
        if ref not in self._parents:
            target: str | Path = ref
            if "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml")) or ref.startswith("."):
                target = self.path.parent / Path(ref).expanduser()
            try:
                self._parents[ref] = load_policy(target, host=self.host)
            except PolicyEngineError as err:
                raise EditError(f"the parent policy {ref!r} does not load: {err}") from None
        return self._parents[ref]

    def _plain(self) -> dict[str, Any]:
        """The text as plain data (a cheap parse, for questions that do not edit)."""
        if self._plain_cache is None or self._plain_cache[0] != self.text:
            try:
                data = pyyaml.safe_load(self.text)
            except pyyaml.YAMLError:
                data = None
            self._plain_cache = (self.text, data if isinstance(data, dict) else {})
        return self._plain_cache[1]

    def inherited_ids(self) -> set[str]:
        """Ids of the categories this file inherits (empty for a standalone file)."""
        try:
            parent = self._parent(self._plain())
        except EditError:
            return set()
        return {c.id for c in parent.categories} if parent is not None else set()

    def extends(self) -> str | None:
        """The policy this file extends, as written (None for a standalone file)."""
        ref = self._plain().get("extends")
        return ref if isinstance(ref, str) else None

    def _edit(self, change: Callable[[CommentedMap, Policy | None], None]) -> str:
        yaml, data = self._load_tree()
        parent = self._parent(data)
        before = dump(yaml, data)
        change(data, parent)
        settle(data)
        after = dump(yaml, data)
        layout = self._layout[1] if self._layout is not None else LAYOUTS[0]
        self.text = after if before == self.text else patch_lines(self.text, before, after)
        self._layout = (self.text, layout)  # an edit keeps the file's layout
        return self.text

    # -- structured edits --------------------------------------------------------------------
    def set_id(self, new_id: str) -> str:
        """Set the policy's own `id:` (in place, or added after `extends:` when missing)."""
        if not new_id.strip():
            raise EditError("a policy needs an id")

        def change(data: CommentedMap, parent: Policy | None) -> None:
            if "id" in data or "extends" not in data:
                put(data, "id", new_id)
            else:
                data.insert(list(data).index("extends") + 1, "id", new_id)

        return self._edit(change)

    def set_severity(self, category_id: str, severity: str) -> str:
        return self._set_field(category_id, "severity", severity)

    def rename(self, category_id: str, name: str) -> str:
        if not name.strip():
            raise EditError("a category needs a name")
        return self._set_field(category_id, "name", name.strip())

    def set_guidelines(self, category_id: str, which: str, lines: list[str]) -> str:
        if which not in GUIDELINE_FIELDS:
            raise EditError(f"unknown guideline list {which!r}; use should_not or can")
        items = [line.strip() for line in lines if line.strip()]
        return self._set_field(category_id, which, items)

    def _set_field(self, category_id: str, key: str, value: Any) -> str:
        def change(data: CommentedMap, parent: Policy | None) -> None:
            entry = _entry(data, category_id, create=parent is not None)
            if parent is not None and _inherited_value(parent, category_id, key) == value:
                # back to what the parent says: drop the override instead of repeating it
                entry.pop(key, None)
                if set(entry) == {"id"}:
                    data["categories"].remove(entry)
                    if not data["categories"]:
                        del data["categories"]
                return
            if isinstance(value, list):
                old = entry.get(key)
                if isinstance(old, CommentedSeq) and list(old) == value:
                    return
                value_node: Any = CommentedSeq(value)
            else:
                value_node = value
            put(entry, key, value_node)

        return self._edit(change)

    def set_exception(self, category_id: str, status: str, reason: str | None = None) -> str:
        """Declare a category non-violating or sensitive (with a reason), or `none`."""
        if status not in EXCEPTION_STATES:
            raise EditError(f"unknown exception {status!r}; use {', '.join(EXCEPTION_STATES)}")
        reason = (reason or "").strip() or None

        def change(data: CommentedMap, parent: Policy | None) -> None:
            inherited = parent.exceptions.get(category_id) if parent is not None else None
            exceptions = data.get("exceptions")
            if status == "none":
                if isinstance(exceptions, CommentedMap):
                    exceptions.pop(category_id, None)
                if inherited is not None:
                    put(
                        child_at(data, "exceptions", CommentedMap), category_id, None
                    )  # drop the inherited
                elif isinstance(exceptions, CommentedMap) and not exceptions:
                    del data["exceptions"]
                return
            if (
                inherited is not None
                and inherited.status.value == status
                and inherited.reason == reason
            ):
                if isinstance(exceptions, CommentedMap):
                    exceptions.pop(category_id, None)
                    if not exceptions:
                        del data["exceptions"]
                return
            exceptions = child_at(data, "exceptions", CommentedMap)
            entry = exceptions.get(category_id)
            if not isinstance(entry, CommentedMap):
                entry = CommentedMap()
                put(exceptions, category_id, entry)
            put(entry, "status", status)
            if reason is None:
                entry.pop("reason", None)
            else:
                put(entry, "reason", reason)

        return self._edit(change)

    def add_category(self, category_id: str, name: str, severity: str = "medium") -> str:
        if not _ID.match(category_id):
            raise EditError(
                f"{category_id!r} is not a category id: start with a letter; letters, digits, "
                "'_', '.', '-'; at most 32 characters"
            )
        if not name.strip():
            raise EditError("a category needs a name")

        def change(data: CommentedMap, parent: Policy | None) -> None:
            taken = {e.get("id") for e in _categories(data) if isinstance(e, dict)}
            if parent is not None:
                taken |= {c.id for c in parent.categories}
            if category_id in taken:
                raise EditError(f"there is already a category {category_id!r}")
            entry = CommentedMap()
            entry["id"] = category_id
            entry["name"] = name.strip()
            entry["severity"] = severity
            entry["should_not"] = CommentedSeq()
            entry["can"] = CommentedSeq()
            append(child_at(data, "categories", CommentedSeq), entry)

        return self._edit(change)

    def remove_category(self, category_id: str) -> str:
        def change(data: CommentedMap, parent: Policy | None) -> None:
            inherited = parent is not None and any(c.id == category_id for c in parent.categories)
            categories = _categories(data)
            entry = next((e for e in categories if _is(e, category_id)), None)
            if entry is None and not inherited:
                raise EditError(f"no category {category_id!r} in this file")
            if inherited:
                entry = _entry(data, category_id, create=True)
                for key in [k for k in entry if k != "id"]:
                    del entry[key]
                put(entry, "remove", True)
            else:
                categories.remove(entry)
            exceptions = data.get("exceptions")
            if isinstance(exceptions, CommentedMap):
                exceptions.pop(category_id, None)
                if not exceptions:
                    del data["exceptions"]

        return self._edit(change)

    def move_category(self, category_id: str, offset: int) -> str:
        """Move a category up (negative offset) or down in the list the model sees."""

        def change(data: CommentedMap, parent: Policy | None) -> None:
            categories = _categories(data)
            if parent is not None and any(c.id == category_id for c in parent.categories):
                raise EditError(
                    f"{category_id} is inherited and keeps the order of "
                    f"{data.get('extends')!r}; to reorder, start from a copy instead"
                )
            own = [
                i
                for i, e in enumerate(categories)
                if isinstance(e, dict)
                and not e.get("remove")
                and not (parent is not None and any(c.id == e.get("id") for c in parent.categories))
            ]
            at = next((i for i in own if _is(categories[i], category_id)), None)
            if at is None:
                raise EditError(f"no category {category_id!r} in this file")
            slot = own.index(at) + offset
            if not 0 <= slot < len(own):
                raise EditError(f"{category_id} is already at the {'top' if offset < 0 else 'end'}")
            other = own[slot]
            categories[at], categories[other] = categories[other], categories[at]

        return self._edit(change)


# -- helpers on the round-trip tree --------------------------------------------------------


def _shipped_text(name: str) -> str:
    shipped = shipped_policies()
    if name not in shipped:
        raise PolicyEngineError(f"unknown policy {name!r}; shipped: {', '.join(shipped)}")
    return Path(shipped[name]).read_text(encoding="utf-8")


def _id_from(stem: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "policy"
    return cleaned if cleaned[0].isalpha() else f"p-{cleaned}"


def _is(entry: Any, category_id: str) -> bool:
    return isinstance(entry, dict) and entry.get("id") == category_id


def _categories(data: CommentedMap) -> list[Any]:
    value = data.get("categories")
    return value if isinstance(value, list) else []


def _entry(data: CommentedMap, category_id: str, *, create: bool) -> CommentedMap:
    for entry in _categories(data):
        if _is(entry, category_id):
            if entry.get("remove"):
                raise EditError(f"{category_id} is removed in this file")
            return entry  # type: ignore[no-any-return]
    if not create:
        raise EditError(f"no category {category_id!r} in this file")
    entry = CommentedMap()
    entry["id"] = category_id
    append(child_at(data, "categories", CommentedSeq), entry)
    return entry


def _inherited_value(parent: Policy, category_id: str, key: str) -> Any:
    for category in parent.categories:
        if category.id == category_id:
            return getattr(category, key)
    return None
