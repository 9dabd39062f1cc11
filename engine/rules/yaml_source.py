"""Load a YAML file and remember where every value sits, for errors that name line and column."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import YamlSyntaxError
from ..limits import MAX_YAML_DEPTH, MAX_YAML_VALUES

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based
    quoted: bool = False  # a quoted scalar: its text starts one column later


@dataclass(slots=True)
class YamlDocument:
    """A parsed YAML document with the position of every value and mapping key."""

    file: str
    data: Any
    values: dict[Path_, Position] = field(default_factory=dict)
    keys: dict[Path_, Position] = field(default_factory=dict)
    duplicates: list[tuple[Path_, Position]] = field(default_factory=list)

    def position(self, path: Path_, *, key: bool = False) -> Position | None:
        """Where ``path`` is (its key when ``key``), else its nearest located ancestor."""
        if key and path in self.keys:
            return self.keys[path]
        while path:
            if path in self.values:
                return self.values[path]
            path = path[:-1]
        return self.values.get(())


def _with_text_timestamps(loader: type) -> type:
    """``loader`` keeping a date or time written unquoted (``2026-11-27``) as the text it is: rule files
    describe JSON, which has no date type (a date object used to reach events quoted twice)."""
    subclass = type(loader.__name__, (loader,), {"yaml_constructors": dict(loader.yaml_constructors)})
    subclass.add_constructor("tag:yaml.org,2002:timestamp", lambda self, node: self.construct_scalar(node))
    return subclass


_SAFE_LOADER = _with_text_timestamps(yaml.SafeLoader)
# libyaml's parser where PyYAML was built with it (its wheels are): same nodes and marks, ~3x faster
_FAST_LOADER = _with_text_timestamps(getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_yaml(path: str | Path) -> YamlDocument:
    """Parse one YAML document, keeping positions. Raises :class:`YamlSyntaxError`."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return _load(str(path), text, _FAST_LOADER)
    except YamlSyntaxError:
        if not hasattr(yaml, "CSafeLoader"):
            raise
        return _load(str(path), text, _SAFE_LOADER)  # PyYAML's own messages say what it found instead


def _load(path: str, text: str, loader_class: Any) -> YamlDocument:
    loader = loader_class(text)
    doc = YamlDocument(path, None)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node)
            _walk(node, (), doc)  # before construction, which flattens merge keys (<<) in place
            doc.data = loader.construct_document(node)
            _check_text(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Position(mark.line + 1, mark.column + 1) if mark else None
        context = exc.context or ""
        if exc.context_mark is not None and exc.problem_mark is not None:
            context += f" (started at {exc.context_mark.line + 1}:{exc.context_mark.column + 1})"
        raise YamlSyntaxError(f"{context}: {exc.problem}" if context else str(exc.problem), where) from None
    finally:
        loader.dispose()
    return doc


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand beyond :data:`MAX_YAML_VALUES` values (an alias
    bomb), refer to a node that contains them (recursive) or nest deeper than :data:`MAX_YAML_DEPTH`:
    each at the node where it happens, before anything walks the expanded tree."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # the nodes whose children are being checked: the current node's ancestors
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 1)]
    while stack:
        node, children_done, depth = stack.pop()
        if not children_done:
            if id(node) in sizes:
                continue
            if id(node) in open_:
                raise YamlSyntaxError("an alias refers to a node that contains it (recursive aliases)", _at(node))
            if depth > MAX_YAML_DEPTH:
                raise YamlSyntaxError(f"nested more than {MAX_YAML_DEPTH} levels deep", _at(node))
            open_.add(id(node))
            stack.append((node, True, depth))
            stack.extend((child, False, depth + 1) for child in _children(node) if id(child) not in sizes)
            continue
        open_.discard(id(node))
        size = 1 + sum(sizes[id(child)] for child in _children(node))
        if size > MAX_YAML_VALUES:
            raise YamlSyntaxError(
                f"aliases expand to more than {MAX_YAML_VALUES:,} values here (an alias bomb?)", _at(node)
            )
        sizes[id(node)] = size


def _check_text(doc: YamlDocument) -> None:
    """Refuse a string JSON cannot carry (a lone surrogate, ``"\\ud800"``): no output could be sent."""
    stack: list[tuple[Path_, Any]] = [((), doc.data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise YamlSyntaxError("a string holds a lone surrogate, which JSON cannot carry",
                                      doc.position(path)) from None
        elif isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _at(node: yaml.Node) -> Position:
    quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
    return Position(node.start_mark.line + 1, node.start_mark.column + 1, quoted)


def _walk(node: yaml.Node, path: Path_, doc: YamlDocument) -> None:
    doc.values[path] = _at(node)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            if key in seen:
                doc.duplicates.append((child, _at(key_node)))
            seen.add(key)
            doc.keys[child] = _at(key_node)
            _walk(value_node, child, doc)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), doc)
