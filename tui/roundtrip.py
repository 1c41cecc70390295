"""Round-trip YAML with ruamel.yaml: edits that keep comments, key order and layout.

`layout_for` finds the indentation that reproduces a file byte for byte; `patch_lines` carries
an edit over to a file the dumper would format differently, touching only the changed lines.
The tree helpers add keys and items where a reader expects them, with the comments and blank
lines that followed the previous value moved after the new one.
"""

from __future__ import annotations

import copy
import difflib
import io
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

C = TypeVar("C", CommentedMap, CommentedSeq)

LAYOUTS = [(2, 4, 2), (2, 2, 0), (4, 4, 0), (4, 6, 4), (2, 4, 0), (4, 4, 2), (4, 8, 4), (3, 3, 0)]


def yaml_for(mapping: int, sequence: int, offset: int) -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long guideline the author wrote on one line
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    # `O4: null` (drop an inherited exception) reads better than a bare `O4:`
    yaml.representer.add_representer(type(None), represent_null)
    return yaml


def represent_null(representer: Any, _: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def dump(yaml: YAML, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def layout_for(text: str) -> tuple[int, int, int]:
    """The indentation that reproduces `text` byte for byte (or comes closest)."""
    best, best_score = LAYOUTS[0], -1.0
    for layout in LAYOUTS:
        yaml = yaml_for(*layout)
        try:
            dumped = dump(yaml, yaml.load(text))
        except YAMLError:
            return best
        if dumped == text:
            return layout
        score = difflib.SequenceMatcher(None, dumped.splitlines(), text.splitlines()).ratio()
        if score > best_score:
            best, best_score = layout, score
    return best


def patch_lines(source: str, before: str, after: str) -> str:
    """Apply the line changes that turn `before` into `after` to `source`, where `before` is
    `source` as the YAML dumper writes it. Lines the edit did not touch keep the author's
    formatting even where the dumper would write them differently."""
    src, old, new = (
        source.splitlines(keepends=True),
        before.splitlines(True),
        after.splitlines(True),
    )
    to_src: dict[int, int] = {}
    for block in difflib.SequenceMatcher(None, old, src, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            to_src[block.a + k] = block.b + k
    result: list[str] = []
    cursor = 0
    for tag, a1, a2, b1, b2 in difflib.SequenceMatcher(
        None, old, new, autojunk=False
    ).get_opcodes():
        if tag == "equal":
            continue
        # the changed run of `old` lies between two lines that match the source
        start = to_src.get(a1 - 1, -1) + 1 if a1 > 0 else 0
        end = to_src.get(a2) if a2 < len(old) else len(src)
        if end is None or (a1 > 0 and (a1 - 1) not in to_src) or start < cursor or end < start:
            return after  # no safe anchor: fall back to the dumper's text
        result += src[cursor:start]
        result += new[b1:b2]
        cursor = end
    result += src[cursor:]
    return "".join(result)


def child_at(data: CommentedMap, key: str, kind: type[C]) -> C:
    """The collection under `key`, added (empty, where a reader expects it) if missing."""
    value = data.get(key)
    if not isinstance(value, kind):
        value = kind()
        insert_key(data, key, value)
    return value


KEY_ORDER: tuple[str, ...] = (
    *("extends", "id", "version", "description", "prompt_format", "severity_levels"),
    *("none_category", "output", "categories", "exceptions", "postprocess"),
)


def insert_key(data: CommentedMap, key: str, value: Any) -> None:
    """Add a top-level key where a reader expects it: after the keys that come before it in
    the usual order, else at the end."""
    if key in data:
        data[key] = value
        return
    earlier = KEY_ORDER[: KEY_ORDER.index(key)] if key in KEY_ORDER else ()
    keys = list(data)
    position = len(keys)
    if earlier:
        present = [i for i, k in enumerate(keys) if k in earlier]
        later = [i for i, k in enumerate(keys) if k in KEY_ORDER and k not in earlier and k != key]
        if later and (not present or later[0] > present[-1]):
            position = later[0]
        elif present:
            position = present[-1] + 1
    set_new(data, key, value, position)


# Comments and blank lines after a value belong, in ruamel's tree, to the deepest last scalar
# before them. A key or item added after that scalar must take them over, or it would land
# below the blank line and the comment that introduce what follows.


def last_holder(node: Any) -> tuple[Any, Any] | None:
    """(container, key or index) whose trailing comment ends `node`'s text."""
    if isinstance(node, CommentedMap) and node:
        key = list(node)[-1]
        return last_holder(node[key]) or (node, key)
    if isinstance(node, CommentedSeq) and node:
        index = len(node) - 1
        return last_holder(node[index]) or (node, index)
    return None


def slot_of(container: Any) -> int:
    return 2 if isinstance(container, CommentedMap) else 0


def move_trailing(source: tuple[Any, Any] | None, target: tuple[Any, Any]) -> None:
    """Move the comment lines after `source`'s value to after `target`'s, keeping an
    end-of-line comment where it was."""
    if source is None:
        return
    container, key = source
    entry = container.ca.items.get(key)
    slot = slot_of(container)
    token = entry[slot] if entry and len(entry) > slot else None
    if token is None or "\n" not in token.value:
        return
    head, _, tail = token.value.partition("\n")
    if not tail:
        return
    if head.strip():
        kept = copy.copy(token)
        kept.value = head + "\n"
        entry[slot] = kept
    else:
        entry[slot] = None
    moved = copy.copy(token)
    moved.value = "\n" + tail
    moved.column = 0
    new_container, new_key = target
    new_entry = new_container.ca.items.setdefault(new_key, [None, None, None, None])
    new_entry[slot_of(new_container)] = moved


def settle(node: Any) -> None:
    """A collection that was empty when it took over trailing comments has since been filled:
    move those comments to after its last item."""
    if isinstance(node, CommentedMap | CommentedSeq):
        keys = list(node) if isinstance(node, CommentedMap) else list(range(len(node)))
        for key in keys:
            value = node[key]
            settle(value)
            entry = node.ca.items.get(key)
            slot = slot_of(node)
            token = entry[slot] if entry and len(entry) > slot else None
            holder = last_holder(value)
            if token is not None and token.value.startswith("\n") and holder is not None:
                entry[slot] = None
                target, target_key = holder
                items = target.ca.items.setdefault(target_key, [None, None, None, None])
                items[slot_of(target)] = token


def set_new(data: CommentedMap, key: Any, value: Any, position: int | None = None) -> None:
    """Add a key (at the end, or at `position`), taking over the comments that followed the
    value before it."""
    keys = list(data)
    at = len(keys) if position is None else position
    before = (data, keys[at - 1]) if at > 0 else None
    source = last_holder(data[keys[at - 1]]) or before if at > 0 else None
    if position is None:
        data[key] = value
    else:
        data.insert(position, key, value)
    move_trailing(source, last_holder(value) or (data, key))


def append(items: CommentedSeq, value: Any) -> None:
    source = last_holder(items[-1]) or (items, len(items) - 1) if items else None
    items.append(value)
    move_trailing(source, last_holder(value) or (items, len(items) - 1))


def put(data: CommentedMap, key: Any, value: Any) -> None:
    """Set a key: in place when it exists, else added at the end (comments kept in order)."""
    if key in data:
        data[key] = value
    elif data:
        set_new(data, key, value)
    else:
        data[key] = value
