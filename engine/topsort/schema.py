"""The Topsort Events v2 schema, loaded once: a fast validator and a field tree per kind.

The field tree (:class:`SchemaNode`) is what the rule compiler consults to reject unknown
output fields, constants Topsort would refuse and rules that cannot meet a kind's alternatives
(an impression is sponsored or organic) at load time, and to coerce values to the types Topsort
declares. :meth:`TopsortSchema.reason` words a validation error for a rejection or a 400.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from ..limits import INTEGER_RANGE
from ..outcome import KINDS, Kind
from ..paths import TOPSORT_SCHEMA

_DEFINITION = {"impressions": "impression", "clicks": "click", "purchases": "purchase", "pageviews": "pageview"}


@dataclass(frozen=True, slots=True)
class Alternative:
    """One branch of an ``anyOf`` that only requires fields, e.g. sponsored: ``resolvedBidId``."""

    fields: tuple[str, ...]
    label: str | None = None

    def __str__(self) -> str:
        return " and ".join(self.fields) + (f" ({self.label})" if self.label else "")


def json_path(parts: Sequence[str | int]) -> str:
    """``['items', 2, 'unitPrice']`` -> ``$.items[2].unitPrice``."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def needs(alternatives: Sequence[Alternative]) -> str:
    """``needs resolvedBidId (sponsored) or entity (organic)``."""
    return "needs " + " or ".join(map(str, alternatives))


@dataclass(frozen=True, slots=True)
class SchemaNode:
    """What the schema says of one place in a Topsort event."""

    types: frozenset[str] = frozenset()
    properties: Mapping[str, SchemaNode] = field(default_factory=dict)
    closed: bool = False
    values: SchemaNode | None = None  # schema of the values of an open object
    items: SchemaNode | None = None
    alternatives: tuple[Alternative, ...] = ()  # an object must hold the fields of one of these
    schema: Mapping[str, Any] = field(default_factory=dict, compare=False)  # as written, $refs kept

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
        self._places: dict[bytes, Any] = {}  # validators of single places, by their schema
        self._choices: dict[tuple[str | int, ...], str] = {}  # worded anyOf of choices, by schema path

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

    def reason(self, error: Any) -> str:
        """The reason to give for a validation ``error`` of a validator of this schema: the
        library's message, except that an unmet choice of required fields says which fields and
        which kind of event each makes (``needs resolvedBidId (sponsored) or entity (organic)``)."""
        if type(error.kind).__name__ == "AnyOf":
            where = tuple(error.schema_path)
            worded = self._choices.get(where)
            if worded is None:
                branches = self._at(where)
                alternatives = _alternatives({"anyOf": branches}) if isinstance(branches, list) else ()
                worded = self._choices[where] = needs(alternatives) if alternatives else ""
            if worded:
                return worded
        return error.message

    def refusal(self, node: SchemaNode, value: Any, *, partial: bool = False) -> str | None:
        """Why ``value`` is refused at ``node``'s place, or None when it is valid there.

        With ``partial`` the value is one part of what is built there (a part of a ``merge``):
        keys missing at its top level may come from the other parts, so they are not held against it.
        """
        validator = self._place_validator(orjson.dumps(node.schema, option=orjson.OPT_SORT_KEYS))
        try:
            errors = list(validator.iter_errors(value))
        except ValueError as exc:  # a YAML date, say: no JSON value
            return f"not a JSON value ({exc})"
        reasons = []
        for error in errors:
            if partial and not list(error.instance_path) and type(error.kind).__name__ in ("Required", "AnyOf"):
                continue
            where = json_path(error.instance_path).removeprefix("$").removeprefix(".")
            reasons.append((f"at {where}: " if where else "") + self.reason(error))
        return "; ".join(reasons) or None

    def _place_validator(self, schema: bytes) -> Any:
        found = self._places.get(schema)
        if found is None:
            place = {"$schema": self.document["$schema"], "$defs": self.document["$defs"], **orjson.loads(schema)}
            found = self._places[schema] = jsonschema_rs.validator_for(place, validate_formats=True)
        return found

    def _at(self, schema_path: Sequence[str | int]) -> Any:
        found: Any = self.document
        for part in schema_path:
            try:
                found = found[part]
            except (KeyError, IndexError, TypeError):
                return None
        return found


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


def _node(written: Mapping[str, Any], defs: Mapping[str, Any]) -> SchemaNode:
    schema = _resolved(written, defs)
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
        alternatives=_alternatives(schema),
        schema=written,
    )


def _alternatives(schema: Mapping[str, Any]) -> tuple[Alternative, ...]:
    """The branches of ``schema``'s ``anyOf`` when each only requires fields (else none)."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list) or not all(
        isinstance(b, dict) and b.keys() <= {"required", "title"} and b.get("required") for b in branches
    ):
        return ()
    return tuple(Alternative(tuple(b["required"]), b.get("title")) for b in branches)


def _resolved(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """Fold a local ``$ref`` into the schema that holds it (properties and closedness merge)."""
    ref = schema.get("$ref")
    if not ref:
        return dict(schema)
    base = _resolved(defs[ref.removeprefix("#/$defs/")], defs)
    merged = {**base, **{k: v for k, v in schema.items() if k != "$ref"}}
    merged["properties"] = {**base.get("properties", {}), **schema.get("properties", {})}
    return merged
