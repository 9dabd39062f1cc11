"""Make a mapped value fit its place in the Topsort schema, as Segment does before sending.

Nulls are dropped, keys the schema does not allow inside an object are dropped, and
scalars are coerced to the declared type (``"2"`` -> 2 for an integer, ``123`` -> ``"123"``
for a string). What still does not fit is left for validation to reject, with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .coercion import COERCIONS
from .schema import SchemaNode

Conformer = Callable[[Any], Any]


def conformer(node: SchemaNode | None) -> Conformer | None:
    """A function fitting values to ``node``, or None when there is nothing to do."""
    if node is None:
        return None
    scalar = next((COERCIONS[t] for t in ("string", "integer", "number") if t in node.types), None)
    obj = _object_conformer(node) if "object" in node.types else None
    arr = _array_conformer(node) if "array" in node.types else None
    if obj is None and arr is None:
        return scalar
    if scalar is None and arr is None:
        return obj
    if scalar is None and obj is None:
        return arr

    def fit(value: Any) -> Any:
        if isinstance(value, dict):
            return obj(value) if obj else value
        if isinstance(value, list):
            return arr(value) if arr else value
        return scalar(value) if scalar else value

    return fit


def native_type(node: SchemaNode | None) -> type | None:
    """The Python type a value of ``node`` already has when it needs no fitting (a fast path)."""
    if node is None or len(node.types) != 1:
        return None
    return {"string": str, "integer": int, "boolean": bool}.get(next(iter(node.types)))


def _object_conformer(node: SchemaNode) -> Conformer:
    # per key: its conformer and the type that needs none (so most values are kept without a call)
    fits = {key: (conformer(child), native_type(child)) for key, child in node.properties.items()}
    closed = node.closed
    others = (conformer(node.values), native_type(node.values))

    def fit(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for key, item in value.items():
            if item is None:
                continue
            entry = fits.get(key)
            if entry is None:
                if closed:
                    continue
                entry = others
            fit_item, native = entry
            if fit_item is not None and item.__class__ is not native:
                item = fit_item(item)
                if item is None:
                    continue
            out[key] = item
        return out or None

    return fit


def _array_conformer(node: SchemaNode) -> Conformer:
    fit_item = conformer(node.items)

    def fit(value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if fit_item is None:
            return [item for item in value if item is not None]
        return [fitted for item in value if item is not None and (fitted := fit_item(item)) is not None]

    return fit
