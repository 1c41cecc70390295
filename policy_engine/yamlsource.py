"""Safe YAML reading that remembers where every value came from.

Mappings load as `Located` dicts and sequences as `LocatedList`s that carry the (line, column) of
each entry, so a validation error on `categories.3.severity` can name the line it stands on, even
after `extends` merged values from several files.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import PolicyError, Problem

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000  # after alias expansion: stops "billion laughs" documents
MAX_DEPTH = 64  # nesting, after alias expansion; a policy needs about 5


class Mark:
    """Where a value stands: file, 1-based line and column."""

    __slots__ = ("column", "file", "line")

    def __init__(self, file: str, line: int, column: int) -> None:
        self.file, self.line, self.column = file, line, column

    @classmethod
    def of(cls, file: str, node: Node) -> Mark:
        return cls(file, node.start_mark.line + 1, node.start_mark.column + 1)


class Located(dict[str, Any]):
    """A mapping with the mark of itself (`mark`) and of each key's value (`marks`)."""

    mark: Mark
    marks: dict[str, Mark]


class LocatedList(list[Any]):
    """A sequence with its own mark and the mark of each item."""

    mark: Mark
    marks: list[Mark]


def located(data: dict[str, Any], mark: Mark, marks: dict[str, Mark]) -> Located:
    result = Located(data)
    result.mark, result.marks = mark, dict(marks)
    return result


def located_list(items: list[Any], mark: Mark, marks: list[Mark]) -> LocatedList:
    result = LocatedList(items)
    result.mark, result.marks = mark, list(marks)
    return result


_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Constructor(SafeConstructor):
    filename = "<policy>"

    def construct_document(self, node: Node) -> Any:
        return self._build(node)

    def _build(self, node: Node) -> Any:
        mark = Mark.of(self.filename, node)
        if isinstance(node, MappingNode | SequenceNode) and node.tag not in _COLLECTION_TAGS:
            # A tag on a mapping or sequence (`!!python/object/apply:…`, `!!set`) must not be
            # silently dropped: reject it like an unknown tag on a scalar.
            raise ConstructorError(
                None,
                None,
                f"could not determine a constructor for the tag {node.tag!r}",
                node.start_mark,
            )
        if isinstance(node, MappingNode):
            self.flatten_mapping(node)
            data: dict[str, Any] = {}
            marks: dict[str, Mark] = {}
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise ConstructorError(
                        None, None, f"keys must be strings, not {key!r}", key_node.start_mark
                    )
                if key in data:
                    raise ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                data[key] = self._build(value_node)
                # A block value that starts on a later line is reported at its key's line.
                same_line = value_node.start_mark.line == key_node.start_mark.line
                marks[key] = Mark.of(self.filename, value_node if same_line else key_node)
            return located(data, mark, marks)
        if isinstance(node, SequenceNode):
            items = [self._build(child) for child in node.value]
            return located_list(items, mark, [Mark.of(self.filename, c) for c in node.value])
        assert isinstance(node, ScalarNode)
        return self.construct_object(node, deep=True)


class _Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _Constructor,
    yaml.resolver.Resolver,
):
    def __init__(self, stream: str, filename: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Constructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.filename = filename
        self._depth = self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        """Stop at MAX_DEPTH or MAX_NODES while composing, before they cost time or the stack."""
        self._depth += 1
        self._nodes += 1
        try:
            problem = None
            if self._depth > MAX_DEPTH + 1:  # the document's root is depth 0
                problem = f"values are nested more than {MAX_DEPTH} levels deep"
            elif self._nodes > MAX_NODES:
                problem = f"document has more than {MAX_NODES:,} values"
            if problem:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ComposerError(None, None, problem, mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _measure(
    node: Node, memo: dict[int, tuple[int, int] | None], depth: int = 0
) -> tuple[int, int]:
    """(size, height) of the document with every alias expanded, without expanding it.

    Also rejects recursive aliases and values nested more than MAX_DEPTH deep (counting through
    aliases), which would otherwise overflow the stack when the policy is built or serialized.
    """
    key = id(node)
    if key in memo:
        measured = memo[key]
        if measured is None:  # still measuring this node: an alias inside its own anchor
            raise ConstructorError(
                None, None, "recursive alias: a value contains itself", node.start_mark
            )
    else:
        memo[key] = None
        children: list[Node] = []
        if isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, SequenceNode):
            children = list(node.value)
        total, height = 1, 0
        for child in children:
            child_total, child_height = _measure(child, memo, depth + 1)
            total, height = total + child_total, max(height, child_height + 1)
        measured = memo[key] = (total, height)
    if depth + measured[1] > MAX_DEPTH:
        raise ConstructorError(
            None, None, f"values are nested more than {MAX_DEPTH} levels deep", node.start_mark
        )
    return measured


def _problem(file: str, message: str, mark: Any = None) -> PolicyError:
    if mark is None:
        return PolicyError([Problem(file, 0, 0, "", message)])
    return PolicyError([Problem(file, mark.line + 1, mark.column + 1, "", message)])


def decode_policy_bytes(raw: bytes, file: str) -> str:
    """Check size and encoding; return the text. Raises PolicyError."""
    if len(raw) > MAX_FILE_BYTES:
        raise _problem(
            file, f"file is {len(raw):,} bytes; policy files are limited to {MAX_FILE_BYTES:,}"
        )
    if b"\x00" in raw:
        raise _problem(file, "binary file (contains NUL bytes); a policy is a UTF-8 YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PolicyError(
            [Problem(file, line, 0, "", f"not UTF-8 (byte 0x{raw[err.start]:02x})")]
        ) from None
    return text.removeprefix("\ufeff")


def load_located(text: str, file: str) -> Any:
    """Parse one YAML document safely into Located/LocatedList values. Raises PolicyError."""
    loader = _Loader(text, file)
    try:
        node = loader.get_single_node()
        if node is None:
            raise _problem(file, "the file is empty; a policy is a YAML mapping")
        if _measure(node, {})[0] > MAX_NODES:
            raise _problem(file, f"document expands to more than {MAX_NODES:,} values (aliases)")
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        message = err.problem or err.context or "invalid YAML"
        if "could not determine a constructor for the tag" in message:
            message = (
                f"YAML tag {_tag_of(err)} is not allowed: policy files are loaded safely, "
                "without constructing objects"
            )
        raise _problem(file, message, err.problem_mark or err.context_mark) from None
    except yaml.YAMLError as err:
        raise _problem(file, f"invalid YAML: {err}") from None
    except RecursionError:
        raise _problem(file, "values are nested too deeply") from None
    finally:
        loader.dispose()
    return data


def _tag_of(err: yaml.MarkedYAMLError) -> str:
    problem = err.problem or ""
    start = problem.find("'")
    return problem[start:] if start >= 0 else problem
