"""Loading policy files: safe YAML, `extends` overlays, validation mapped back to file lines.

Every problem is reported as `FILE:LINE:COL: field.path: message`. A name without a slash or a
YAML suffix is a shipped policy (`policies/`); anything else is a path.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .audience import AudienceError, at_level, keep_levels_of_kept_guidelines, split_level
from .errors import PolicyEngineError, PolicyError, Problem, UnknownNameError, plain_message
from .host import PluginHost, get_host
from .policy import (
    AggregationOptions,
    Category,
    CategoryException,
    FailurePolicy,
    LocatedValueError,
    OutputOptions,
    Policy,
    PostprocessStep,
    VideoOptions,
)
from .yamlsource import (
    Located,
    LocatedList,
    Mark,
    decode_policy_bytes,
    load_located,
    located,
    located_list,
)

log = logging.getLogger(__name__)
SHIPPED_PACKAGE = "policy_engine.policies"
MAX_EXTENDS_DEPTH = 16


def shipped_policies() -> dict[str, str]:
    """Shipped policy names and their descriptions' first lines (cheap: no validation)."""
    result = {}
    for entry in sorted(importlib.resources.files(SHIPPED_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            result[entry.name.removesuffix(".yaml")] = str(entry)
    return result


def is_path_like(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml")) or ref.startswith(".")


def _resolve(ref: str, base: Path | None) -> tuple[str, Path]:
    """(display name, file) for a policy reference; raises UnknownNameError for bad names."""
    if is_path_like(ref):
        path = Path(ref).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        return str(path), path
    shipped = shipped_policies()
    if ref not in shipped:
        raise UnknownNameError("policy", ref, shipped)
    if base is None:
        for suffix in (".yaml", ".yml"):
            if Path(ref + suffix).is_file():
                log.warning(
                    "%r is the shipped policy; the file %s here is not used (a name is always "
                    "a shipped policy: write ./%s to use the file)",
                    ref,
                    ref + suffix,
                    ref + suffix,
                )
    return f"<shipped>/{ref}.yaml", Path(shipped[ref])


def _read(display: str, path: Path, text: str | None = None) -> Located:
    if text is not None:
        return _parse(display, text.encode("utf-8"))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError([Problem(display, 0, 0, "", "no such file")]) from None
    except IsADirectoryError:
        raise PolicyError(
            [Problem(display, 0, 0, "", "is a directory, not a policy file")]
        ) from None
    except OSError as err:
        raise PolicyError([Problem(display, 0, 0, "", f"cannot read: {err.strerror}")]) from None
    return _parse(display, raw)


def _parse(display: str, raw: bytes) -> Located:
    data = load_located(decode_policy_bytes(raw, display), display)
    if not isinstance(data, Located):
        kind = _KIND_NAMES.get(type(data), type(data).__name__)
        mark = getattr(data, "mark", None) or Mark(display, 1, 1)
        message = f"a policy is a YAML mapping, not {kind}"
        raise PolicyError([_problem_at(mark, display, "", message)])
    return data


_KIND_NAMES = {
    LocatedList: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _problem_at(mark: Mark | None, file: str, path: str, message: str) -> Problem:
    if mark is None:
        return Problem(file, 0, 0, path, message)
    return Problem(mark.file, mark.line, mark.column, path, message)


# -- extends -------------------------------------------------------------------------------


def _short(path: str) -> str:
    """A path relative to the working directory when that is shorter."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return relative if len(relative) < len(path) else path


def _load_chain(
    ref: str, base: Path | None, seen: list[str], via: Mark | None, text: str | None = None
) -> Located:
    """Load a file (or `text` standing for it) and everything it extends, merged (child over
    parent)."""
    display, path = _resolve(ref, base)
    identity = str(path.resolve())
    if identity in seen:
        chain = " -> ".join(_short(p) for p in [*seen[seen.index(identity) :], identity])
        raise PolicyError([_problem_at(via, display, "extends", f"extends cycle: {chain}")])
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise PolicyError(
            [_problem_at(via, display, "extends", f"extends more than {MAX_EXTENDS_DEPTH} deep")]
        )
    data = _read(display, path, text)
    _anchor_test_images(data, path.parent)
    _anchor_calibration(data, path.parent)
    parent_ref = data.get("extends")
    if parent_ref is None:
        _reject_patch_keys(data, display)
        return data
    extends_mark = data.marks["extends"]
    if "id" not in data:
        raise PolicyError(
            [
                _problem_at(
                    data.mark,
                    display,
                    "id",
                    "required field is missing (its own id)",
                )
            ]
        )
    if not isinstance(parent_ref, str) or not parent_ref:
        raise PolicyError(
            [_problem_at(extends_mark, display, "extends", "must be a policy name or a path")]
        )
    try:
        parent = _load_chain(parent_ref, path.parent, [*seen, identity], extends_mark)
    except UnknownNameError as err:
        raise PolicyError(
            [_problem_at(extends_mark, display, "extends", f"unknown parent {err.message[8:]}")]
        ) from None
    except PolicyError as err:
        if any(p.message == "no such file" and p.path == "" for p in err.problems):
            raise PolicyError(
                [_problem_at(extends_mark, display, "extends", f"parent {parent_ref!r} not found")]
            ) from None
        raise
    return _overlay(parent, data, display)


def _anchor_test_images(data: Located, folder: Path) -> None:
    """Test cases name images relative to the file that declares them; make those paths
    absolute here, so inherited tests still find their images."""
    tests = data.get("tests")
    if not isinstance(tests, LocatedList):
        return
    for entry in tests:
        image = entry.get("image") if isinstance(entry, Located) else None
        if isinstance(image, str) and image and not image.startswith("data:"):
            entry["image"] = str(folder / Path(image).expanduser())


def _anchor_calibration(data: Located, folder: Path) -> None:
    """A policy's calibration file is named relative to the policy file that names it."""
    value = data.get("calibration")
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        data["calibration"] = str(folder / value)


def _entry_error(entry: Located, index: int, key: str, file: str, message: str) -> PolicyError:
    """A problem with `key` of the category entry at `index` of the file being overlaid."""
    return PolicyError([_problem_at(entry.marks[key], file, f"categories[{index}].{key}", message)])


def _reject_patch_keys(data: Located, display: str) -> None:
    categories = data.get("categories")
    if isinstance(categories, LocatedList):
        for index, entry in enumerate(categories):
            if isinstance(entry, Located) and "remove" in entry:
                raise _entry_error(
                    entry,
                    index,
                    "remove",
                    display,
                    "'remove' only applies in a policy that extends another",
                )


def _overlay(parent: Located, child: Located, display: str) -> Located:
    data = dict(parent)
    marks = dict(parent.marks)
    for key, value in child.items():
        if key == "extends":
            continue
        mark = child.marks[key]
        if key == "categories" and isinstance(value, LocatedList):
            data[key] = _overlay_categories(parent.get(key), value, display)
        elif key == "exceptions" and isinstance(value, Located):
            data[key] = _overlay_exceptions(parent.get(key), value)
        elif key == "actions" and isinstance(value, LocatedList):
            data[key] = _union(parent.get(key), value)
        elif key in (
            "output",
            "metadata",
            "postprocess_failure",
            "video",
            "aggregation",
        ) and isinstance(value, Located):
            base = parent.get(key)
            if isinstance(base, Located):
                merged = located({**base, **value}, value.mark, {**base.marks, **value.marks})
                data[key] = merged
            else:
                data[key] = value
        else:
            data[key] = value
        marks[key] = mark
    return located(data, child.mark, marks)


def _union(parent: Any, child: LocatedList) -> LocatedList:
    """Custom actions add up across `extends`: the parent's steps still use the parent's."""
    if not isinstance(parent, LocatedList):
        return child
    merged = LocatedList(parent)
    merged.mark, merged.marks = child.mark, list(parent.marks)
    for item, mark in zip(child, child.marks, strict=True):
        if item not in merged:
            merged.append(item)
            merged.marks.append(mark)
    return merged


def _overlay_categories(parent: Any, patches: LocatedList, display: str) -> LocatedList:
    if not isinstance(parent, LocatedList):
        return patches
    items: list[Any] = list(parent)
    item_marks = list(parent.marks)

    def position(category_id: Any) -> int | None:
        for index, item in enumerate(items):
            if isinstance(item, dict) and item.get("id") == category_id:
                return index
        return None

    patched: set[Any] = set()
    for index, patch in enumerate(patches):
        mark = patches.marks[index]
        if not isinstance(patch, Located) or "id" not in patch or not isinstance(patch["id"], str):
            items.append(patch)  # validation reports what is wrong with it
            item_marks.append(mark)
            continue
        if patch["id"] in patched:
            raise _entry_error(
                patch, index, "id", display, f"duplicate category id {patch['id']!r}"
            )
        patched.add(patch["id"])
        if not isinstance(patch.get("remove", False), bool):
            raise _entry_error(patch, index, "remove", display, "must be true or false")
        at = position(patch["id"])
        if patch.get("remove") is True:
            if at is None:
                raise _entry_error(
                    patch,
                    index,
                    "id",
                    display,
                    f"cannot remove {patch['id']!r}: the parent has no such category",
                )
            del items[at], item_marks[at]
            continue
        fields = {k: v for k, v in patch.items() if k != "remove"}
        field_marks = {k: v for k, v in patch.marks.items() if k != "remove"}
        if at is None:
            items.append(located(fields, patch.mark, field_marks))
            item_marks.append(mark)
        else:
            base = items[at]
            base_marks = base.marks if isinstance(base, Located) else {}
            merged = {**base, **fields}
            keep_levels_of_kept_guidelines(base, merged, fields)
            items[at] = located(merged, patch.mark, {**base_marks, **field_marks})
            item_marks[at] = mark
    return located_list(items, patches.mark, item_marks)


def _overlay_exceptions(parent: Any, child: Located) -> Located:
    data = dict(parent) if isinstance(parent, Located) else {}
    marks = dict(parent.marks) if isinstance(parent, Located) else {}
    for key, value in child.items():
        if value is None or (isinstance(value, dict) and value.get("status", 0) is None):
            data.pop(key, None)
            marks.pop(key, None)
        else:
            data[key] = value
            marks[key] = child.marks[key]
    return located(data, child.mark, marks)


# -- validation ----------------------------------------------------------------------------

_FIELD_MODELS: dict[str, type[BaseModel]] = {
    "categories": Category,
    "exceptions": CategoryException,
    "output": OutputOptions,
    "postprocess": PostprocessStep,
    "postprocess_failure": FailurePolicy,
    "video": VideoOptions,
    "aggregation": AggregationOptions,
    "none_category": Policy.model_fields["none_category"].annotation,  # type: ignore[dict-item]
}


def _walk(data: Any, loc: tuple[str | int, ...]) -> tuple[Mark | None, str]:
    """Follow a validation location through located data: (mark of the deepest value found,
    display path of the whole location)."""
    mark: Mark | None = getattr(data, "mark", None)
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, LocatedList) and isinstance(part, int) and part < len(node):
            item = node[part]
            label = item.get("id") if isinstance(item, dict) else None
            parts.append(f"[{label}]" if isinstance(label, str) else f"[{part}]")
            mark, node = node.marks[part], item
        elif isinstance(node, Located) and isinstance(part, str) and part in node:
            parts.append(f".{part}" if parts else part)
            mark, node = node.marks[part], node[part]
        else:
            if isinstance(part, str):
                parts.append(f".{part}" if parts else part)
            else:
                parts.append(f"[{part}]")
            node = None  # the rest of the path is named, but has no place in the file
    return mark, "".join(parts)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None`, `list[X]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: tuple[str | int, ...], root: type[BaseModel] = Policy) -> list[str]:
    model: type[BaseModel] = root
    for index, part in enumerate(loc[:-1]):
        if root is Policy and isinstance(part, str) and index == 0 and part in _FIELD_MODELS:
            model = _FIELD_MODELS[part]
        elif isinstance(part, str):
            fields = {f.alias or name: f for name, f in model.model_fields.items()}
            if part in fields:
                model = _model_in(fields[part].annotation) or model
    keys = {field.alias or name for name, field in model.model_fields.items()}
    if model is Policy:
        keys.add("extends")
    if model is Category:
        keys.add("remove")
    return sorted(keys)


def _validation_problems(
    err: ValidationError,
    data: Located,
    file: str,
    prefix: tuple[str | int, ...] = (),
    root: type[BaseModel] = Policy,
) -> list[Problem]:
    problems = []
    for item in err.errors():
        loc = prefix + tuple(item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, LocatedValueError):
            for where, message in cause.problems:
                path_loc = prefix + tuple(int(p) if p.isdigit() else p for p in where.split("."))
                mark, path = _walk(data, path_loc)
                problems.append(_problem_at(mark, file, path, message))
            continue
        message = plain_message(item)
        mark, path = _walk(data, loc)
        if item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "extra_forbidden":
            allowed = _allowed_keys(tuple(item["loc"]), root)
            message = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        problems.append(_problem_at(mark, file, path, message))
    return problems


def load_policy(ref: str | Path, *, host: PluginHost | None = None) -> Policy:
    """Load, resolve and validate a policy by shipped name or path, optionally at an audience
    level (`NAME@LEVEL`, `path.yaml@LEVEL`: see `policy_engine.audience`). Raises PolicyError,
    or AudienceError for a level the policy does not have."""
    ref, level = split_level(str(ref))
    policy = _validated(_resolve(ref, None)[0], _load_chain(ref, None, [], None), host)
    if level is None:
        return policy
    try:
        derived = at_level(policy, level)
    except AudienceError as err:
        if policy.audiences is not None:
            raise
        with_levels = [name for name in shipped_policies() if _has_levels(name)]
        hint = f"; shipped policies with levels: {', '.join(with_levels)}" if with_levels else ""
        raise AudienceError(err.message + hint) from None
    check_policy(derived, host=host)
    return derived


def _has_levels(name: str) -> bool:
    try:
        return load_policy(name).audiences is not None
    except PolicyEngineError:
        return False


def load_policy_text(
    text: str, path: str | Path = "policy.yaml", *, host: PluginHost | None = None
) -> Policy:
    """Load a policy from YAML `text`, as if it were the file at `path` (an editor's unsaved
    buffer): problems name `path`, and a relative `extends` or test image is found beside it.
    The file itself is not read. Raises PolicyError."""
    ref = str(path)
    if not is_path_like(ref):
        ref = f"./{ref}"
    return _validated(str(path), _load_chain(ref, None, [], None, text), host)


MAX_PROBLEMS = 50
"""A policy with more problems reports this many and how many more there are."""


def _validated(display: str, data: Located, host: PluginHost | None) -> Policy:
    """The Policy, or every problem found in one go: the file's own problems and, for the parts
    that are valid, the plugins' (formats, post-processors and their params)."""
    host = host or get_host()
    try:
        policy = Policy.model_validate(dict(data))
    except ValidationError as err:
        problems = _validation_problems(err, data, display)
        partial = _without_broken_keys(data, err)
        if partial is not None:
            for where, message in partial.problems():
                loc = tuple(int(p) if p.isdigit() else p for p in where.split("."))
                mark, path = _walk(data, loc)
                problems.append(_problem_at(mark, display, path, message))
            problems += _plugin_problems(partial, data, display, host)
        raise PolicyError(_capped(problems)) from None
    problems = _plugin_problems(policy, data, display, host)
    if problems:
        raise PolicyError(_capped(problems))
    return policy


def _without_broken_keys(data: Located, err: ValidationError) -> Policy | None:
    """The policy without the top-level keys that have problems (their defaults instead), to
    check the rest; None when that is not possible (a required key is broken)."""
    broken = {item["loc"][0] for item in err.errors() if item["loc"]}
    rest = {k: v for k, v in data.items() if k not in broken}
    try:
        return Policy.model_validate(rest, context={"partial": True})
    except ValidationError:
        return None


def _capped(problems: list[Problem]) -> list[Problem]:
    unique = list(dict.fromkeys(problems))
    if len(unique) <= MAX_PROBLEMS:
        return unique
    rest = len(unique) - MAX_PROBLEMS
    file = unique[0].file
    return [*unique[:MAX_PROBLEMS], Problem(file, 0, 0, "", f"… and {rest} more problems")]


def check_policy(policy: Policy, *, host: PluginHost | None = None) -> None:
    """Run the plugin checks on a Policy built in code (no file): raises PolicyError."""
    problems = _plugin_problems(policy, Located(), "<policy>", host or get_host())
    if problems:
        raise PolicyError(problems)


def _plugin_problems(policy: Policy, data: Located, file: str, host: PluginHost) -> list[Problem]:
    """Checks that need registered plugins: prompt format, post-processor names and params."""
    problems: list[Problem] = []
    try:
        fmt = host.prompt_format(policy.prompt_format)
    except UnknownNameError as err:
        mark, path = _walk(data, ("prompt_format",))
        problems.append(_problem_at(mark, file, path or "prompt_format", err.message))
    else:
        for loc, message in fmt().check(policy):
            mark, path = _walk(data, loc)
            problems.append(_problem_at(mark, file, path, message))
    for index, step in enumerate(policy.postprocess):
        try:
            cls = host.postprocessor(step.name)
        except UnknownNameError as err:
            mark, path = _walk(data, ("postprocess", index, "name"))
            problems.append(_problem_at(mark, file, path, err.message))
            continue
        try:
            params = cls.Params.model_validate(step.params)
        except ValidationError as err:
            problems += _validation_problems(
                err, data, file, ("postprocess", index, "params"), root=cls.Params
            )
            continue
        step.bind(cls, params)
        for loc, message in cls.check(params, policy):
            mark, path = _walk(data, ("postprocess", index, "params", *loc))
            problems.append(_problem_at(mark, file, path, message))
    if policy.calibration is not None:
        # the file must be a calibration; what it was fitted for, the engine checks
        from .calibration import CalibrationError, load_calibration

        try:
            load_calibration(policy.calibration)
        except CalibrationError as err:
            mark, path = _walk(data, ("calibration",))
            problems.append(_problem_at(mark, file, path or "calibration", err.message))
    return problems
