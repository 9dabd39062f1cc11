"""Check each mapped output against the Topsort schema; reject what fails, item by item.

Inside an array a rule builds with ``each`` (a purchase's ``items``), only the items that
fail are dropped, each with its own rejection; the output goes on with the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..outcome import Kind
from .schema import json_path, topsort_schema

Violation = tuple[str, str, int | None]
"""(JSON path, reason, index of the dropped array item or None)."""


class OutputValidator:
    """Validates outputs of one kind; built once per rule."""

    def __init__(self, kind: Kind, fanout_arrays: Sequence[tuple[str, ...]] = ()) -> None:
        self._validator = topsort_schema().validator(kind)
        self._arrays = tuple(tuple(path) for path in fanout_arrays)
        self.is_valid = self._validator.is_valid
        """Whether an output is valid as it is (the fast check; :meth:`check` says why not)."""

    def check(self, output: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Violation]]:
        """The output to emit (None if rejected whole) and the problems found."""
        if self._validator.is_valid(output):
            return output, []
        errors = list(self._validator.iter_errors(output))
        by_item: dict[tuple[tuple[str, ...], int], list[Any]] = defaultdict(list)
        whole = []
        for error in errors:
            located = self._array_item(list(error.instance_path))
            if located is None:
                whole.append(error)
            else:
                by_item[located].append(error)
        if whole or not by_item:
            return None, [_problem(error) for error in errors]
        problems = [
            _problem(error, item=index, within=json_path(array)) for (array, index), found in by_item.items()
            for error in found
        ]
        output = _without_items(output, by_item.keys())
        emptied = [array for array, _ in by_item if not _lookup(output, array)]
        if emptied:
            return None, problems + [(json_path(a), "every item was rejected", None) for a in dict.fromkeys(emptied)]
        if self._validator.is_valid(output):
            return output, problems
        return None, problems + [_problem(error) for error in self._validator.iter_errors(output)]

    def _array_item(self, path: list[str | int]) -> tuple[tuple[str, ...], int] | None:
        for array in self._arrays:
            depth = len(array)
            if len(path) > depth and tuple(path[:depth]) == array and isinstance(path[depth], int):
                return array, path[depth]
        return None


def _problem(error: Any, item: int | None = None, within: str | None = None) -> Violation:
    path = list(error.instance_path)
    reason = _shortened(topsort_schema().reason(error))
    missing = _missing_property(error)
    if missing is not None:
        path.append(missing)
        reason = "required, but missing or null"
    if within is not None:
        reason = f"item {item} of {within}: {reason}"
    return json_path(path), reason, item


def _shortened(message: str, keep: int = 120) -> str:
    """A message quoting a huge value (a 5 000-digit string) cut in its middle, ends kept."""
    if len(message) <= 2 * keep + 20:
        return message
    return f"{message[:keep]}… ({len(message) - 2 * keep:,} characters left out) …{message[-keep:]}"


def _lookup(output: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        output = output.get(key) if isinstance(output, dict) else None
    return output


def _missing_property(error: Any) -> str | None:
    kind = getattr(error, "kind", None)
    if type(kind).__name__.endswith("Required"):
        return getattr(kind, "property", None)
    return None


def _without_items(output: dict[str, Any], drop: Any) -> dict[str, Any]:
    by_array: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for array, index in drop:
        by_array[array].add(index)
    output = dict(output)
    for array, indexes in by_array.items():
        parent = output
        for key in array[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        parent[array[-1]] = [item for i, item in enumerate(parent[array[-1]]) if i not in indexes]
    return output
