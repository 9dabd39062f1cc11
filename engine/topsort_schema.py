"""The Topsort Events v2 schema, loaded once: a fast validator and a field tree per kind.

The field tree (:class:`SchemaNode`) is what the rule compiler consults to reject unknown
output fields at load time and to coerce values to the types Topsort declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from .limits import INTEGER_RANGE
from .outcome import KINDS, Kind
from .paths import TOPSORT_SCHEMA

_DEFINITION = {"impressions": "impression", "clicks": "click", "purchases": "purchase", "pageviews": "pageview"}


@dataclass(frozen=True, slots=True)
class SchemaNode:
    """What the schema says of one place in a Topsort event."""

    types: frozenset[str] = frozenset()
    properties: Mapping[str, SchemaNode] = field(default_factory=dict)
    closed: bool = False
    values: SchemaNode | None = None  # schema of the values of an open object
    items: SchemaNode | None = None

    def child(self, key: str) -> SchemaNode | None:
        """The node of ``key`` in this object, or None when the schema does not allow it."""
        found = self.properties.get(key)
        if found is not None:
            return found
        return None if self.closed else (self.values or SchemaNode())


class TopsortSchema:
    """Validators and field trees for each Topsort kind, and for a whole request body."""

    def __init__(self, path: Path = TOPSORT_SCHEMA) -> None:
        self.document: dict[str, Any] = _bounded_numbers(orjson.loads(Path(path).read_bytes()))
        self.path = path
        defs = self.document["$defs"]
        self._nodes = {kind: _node(defs[_DEFINITION[kind]], defs) for kind in KINDS}
        self._validators = {
            kind: jsonschema_rs.validator_for(self.kind_schema(kind), validate_formats=True) for kind in KINDS
        }
        self.request_validator = jsonschema_rs.validator_for(self.document, validate_formats=True)

    def kind_schema(self, kind: Kind) -> dict[str, Any]:
        """A standalone JSON Schema for one event of ``kind``."""
        return {
            "$schema": self.document["$schema"],
            "$defs": self.document["$defs"],
            "$ref": f"#/$defs/{_DEFINITION[kind]}",
        }

    def node(self, kind: Kind) -> SchemaNode:
        return self._nodes[kind]

    def validator(self, kind: Kind) -> Any:
        return self._validators[kind]


@cache
def topsort_schema() -> TopsortSchema:
    """The bundled Topsort schema, loaded on first use."""
    return TopsortSchema()


def _bounded_numbers(schema: Any) -> Any:
    """The schema with every number bounded to :data:`~engine.limits.INTEGER_RANGE` where it
    names no bound itself: validation then refuses, with the bound, what no encoder writes."""
    if isinstance(schema, dict):
        schema = {key: _bounded_numbers(value) for key, value in schema.items()}
        types = schema.get("type", ())
        if {"integer", "number"} & set([types] if isinstance(types, str) else types):
            schema.setdefault("maximum", INTEGER_RANGE[1])
            if "exclusiveMinimum" not in schema:
                schema.setdefault("minimum", INTEGER_RANGE[0])
    elif isinstance(schema, list):
        schema = [_bounded_numbers(value) for value in schema]
    return schema


def _node(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> SchemaNode:
    schema = _resolved(schema, defs)
    types = schema.get("type", ())
    types = frozenset([types] if isinstance(types, str) else types)
    additional = schema.get("additionalProperties")
    closed = additional is False or schema.get("unevaluatedProperties") is False
    return SchemaNode(
        types=types,
        properties={key: _node(sub, defs) for key, sub in schema.get("properties", {}).items()},
        closed=closed,
        values=_node(additional, defs) if isinstance(additional, dict) else None,
        items=_node(schema["items"], defs) if isinstance(schema.get("items"), dict) else None,
    )


def _resolved(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """Fold a local ``$ref`` into the schema that holds it (properties and closedness merge)."""
    ref = schema.get("$ref")
    if not ref:
        return dict(schema)
    base = _resolved(defs[ref.removeprefix("#/$defs/")], defs)
    merged = {**base, **{k: v for k, v in schema.items() if k != "$ref"}}
    merged["properties"] = {**base.get("properties", {}), **schema.get("properties", {})}
    return merged
