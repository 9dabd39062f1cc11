"""The naive baseline: the same rule files, interpreted the straightforward way.

Per event: ``json.loads``; the rule specs walked as plain data, every expression evaluated with
``jmespath.search`` (with the engine's custom functions); every value fitted to the Topsort schema
by walking the schema document; every output validated with python-jsonschema; ``json.dumps``.
Nothing is compiled ahead except the python-jsonschema validators, built once per kind.

It gives the engine's outputs (see ``tests/test_benchmarks.py``), so the benchmark compares equal work.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jmespath
import jsonschema
import yaml
from jmespath.exceptions import JMESPathError

from engine.topsort.coercion import COERCIONS
from engine.compile.functions import FUNCTIONS
from engine.outcome import KINDS
from engine.paths import BUNDLED_RULES, TOPSORT_SCHEMA

Mapped = tuple[str, str, dict[str, Any]]
"""(kind, rule name, Topsort event)."""

_SPEC_KEYS = frozenset(("from", "const", "first", "merge", "fields", "each", "item", "if", "lookup", "default", "as"))
_DEFINITION = {"impressions": "impression", "clicks": "click", "purchases": "purchase", "pageviews": "pageview"}
_OPTIONS = jmespath.Options(custom_functions=FUNCTIONS)


class _Failed(Exception):
    """An expression failed on this event: the output is rejected."""


class NaiveInterpreter:
    """Interprets rule files as data; :meth:`process` maps one decoded Segment event."""

    def __init__(self, folder: str | Path = BUNDLED_RULES) -> None:
        self.rules = [rule for rule in _read_rules(Path(folder)) if rule.get("enabled", True)]
        self.schema = json.loads(Path(TOPSORT_SCHEMA).read_text())
        self._defs = self.schema["$defs"]
        checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
        self._validators = {
            kind: jsonschema.Draft202012Validator(
                {"$schema": self.schema["$schema"], "$defs": self._defs, "$ref": f"#/$defs/{_DEFINITION[kind]}"},
                format_checker=checker,
            )
            for kind in KINDS
        }

    def process_line(self, line: bytes | str) -> list[str]:
        """One NDJSON line in, the JSON text of each Topsort event it makes out."""
        return [json.dumps(event) for _, _, event in self.process(json.loads(line))]

    def process(self, event: Any) -> list[Mapped]:
        """The valid Topsort events made of ``event`` by every rule that wants it, in rule order."""
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return []
        return [mapped for rule in self.rules if self._wants(rule, event) for mapped in self._apply(rule, event)]

    def _wants(self, rule: dict[str, Any], event: dict[str, Any]) -> bool:
        when = rule["when"]
        types = [when["type"]] if isinstance(when["type"], str) else when["type"]
        if event["type"] not in types:
            return False
        if "event" in when:
            names = [when["event"]] if isinstance(when["event"], str) else when["event"]
            if event.get("event") not in names:
                return False
        if "if" in when:
            try:
                return _truthy(jmespath.search(when["if"], event, options=_OPTIONS))
            except JMESPathError:
                return False
        return True

    def _apply(self, rule: dict[str, Any], event: dict[str, Any]) -> Iterator[Mapped]:
        kind = rule["emit"]
        node = {"$ref": f"#/$defs/{_DEFINITION[kind]}"}
        contexts = [event]
        if "each" in rule:
            try:
                elements = jmespath.search(rule["each"], event, options=_OPTIONS)
            except JMESPathError:
                return
            if not isinstance(elements, list) or not elements:
                return
            item = rule.get("item", "item")
            contexts = [{**event, item: element, "index": index} for index, element in enumerate(elements)]
        for context in contexts:
            try:
                output = self._top(rule["fields"], context, node)
            except _Failed:
                continue
            valid = self._validate(kind, output, _fanout_arrays(rule["fields"]))
            if valid is not None:
                yield kind, rule["name"], valid

    def _top(self, fields: dict[str, Any], context: Any, node: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, spec in fields.items():
            value = self._field(spec, context, self._child(node, key))
            if value is not None and value != "":
                out[key] = value
        return out

    def _field(self, spec: Any, context: Any, node: dict[str, Any] | None, fit: bool = True) -> Any:
        if isinstance(spec, str):
            value = _search(spec, context)
        elif isinstance(spec, dict) and not _SPEC_KEYS.isdisjoint(spec):
            value = self._spec(spec, context, node)
        else:
            return self._object(spec, context, node)
        return self._fit(value, node) if fit else value

    def _object(self, fields: dict[str, Any], context: Any, node: dict[str, Any] | None) -> Any:
        out = {}
        for key, spec in fields.items():
            value = self._field(spec, context, self._child(node, key))
            if value is not None:
                out[key] = value
        return out or None

    def _spec(self, spec: dict[str, Any], context: Any, node: dict[str, Any] | None) -> Any:
        if "if" in spec and not _truthy(_search(spec["if"], context)):
            return None
        if "each" not in spec:
            return self._finish(spec, self._source(spec, context, node))
        elements = _search(spec["each"], context)
        if not isinstance(elements, list):
            return None
        element_node = self._resolve(node).get("items") if node is not None else None
        item = spec.get("item", "item")
        out = []
        for index, element in enumerate(elements):
            inner = {**context, item: element, "index": index}
            value = self._finish(spec, self._source(spec, inner, element_node, item))
            if value is not None:
                out.append(value)
        return out

    def _source(self, spec: dict[str, Any], context: Any, node: dict[str, Any] | None, item: str = "item") -> Any:
        if "from" in spec:
            return _search(spec["from"], context)
        if "const" in spec:
            return copy.deepcopy(spec["const"])
        if "fields" in spec:
            return self._object(spec["fields"], context, node)
        if "first" in spec:
            for part in spec["first"]:
                value = self._field(part, context, node, fit=False)
                if value is not None and value != "":
                    return value
            return None
        if "merge" in spec:
            result = None
            for part in spec["merge"]:
                value = self._field(part, context, node, fit=False)
                if value is None:
                    continue
                result = {**result, **value} if isinstance(result, dict) and isinstance(value, dict) else value
            return result
        return context.get(item)

    @staticmethod
    def _finish(spec: dict[str, Any], value: Any) -> Any:
        if "lookup" in spec:
            value = spec["lookup"].get(value) if isinstance(value, (str, int, float, bool)) else None
        if "as" in spec:
            value = COERCIONS[spec["as"]](value)
        if "default" in spec and value is None:
            value = spec["default"]
        return value

    # -- the Topsort schema, walked as a document ------------------------------------------------

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if not ref:
            return schema
        base = self._resolve(self._defs[ref.removeprefix("#/$defs/")])
        merged = {**base, **{k: v for k, v in schema.items() if k != "$ref"}}
        merged["properties"] = {**base.get("properties", {}), **schema.get("properties", {})}
        return merged

    def _child(self, node: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
        if node is None:
            return None
        schema = self._resolve(node)
        found = schema.get("properties", {}).get(key)
        if found is not None:
            return found
        additional = schema.get("additionalProperties")
        return additional if isinstance(additional, dict) else None

    def _fit(self, value: Any, node: dict[str, Any] | None) -> Any:
        """Segment's fitting: nulls and unknown keys dropped, scalars coerced to the declared type."""
        if node is None or value is None:
            return value
        schema = self._resolve(node)
        types = schema.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, dict):
            return self._fit_object(value, schema) if "object" in types else value
        if isinstance(value, list):
            return self._fit_array(value, schema) if "array" in types else value
        for name in ("string", "integer", "number"):
            if name in types:
                return COERCIONS[name](value)
        return value

    def _fit_object(self, value: dict[str, Any], schema: dict[str, Any]) -> Any:
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        closed = additional is False or schema.get("unevaluatedProperties") is False
        out = {}
        for key, item in value.items():
            if item is None:
                continue
            if key in properties:
                item = self._fit(item, properties[key])
            elif closed:
                continue
            elif isinstance(additional, dict):
                item = self._fit(item, additional)
            if item is not None:
                out[key] = item
        return out or None

    def _fit_array(self, value: list[Any], schema: dict[str, Any]) -> list[Any]:
        items = schema.get("items")
        fitted = (self._fit(item, items) if isinstance(items, dict) else item for item in value if item is not None)
        return [item for item in fitted if item is not None]

    # -- validation ------------------------------------------------------------------------------

    def _validate(self, kind: str, output: dict[str, Any], arrays: list[str]) -> dict[str, Any] | None:
        """The output to emit, without the items of fan-out ``arrays`` that fail; None if rejected."""
        validator = self._validators[kind]
        errors = list(validator.iter_errors(output))
        if not errors:
            return output
        bad: dict[str, set[int]] = {}
        for error in errors:
            path = list(error.absolute_path)
            if len(path) < 2 or path[0] not in arrays or not isinstance(path[1], int):
                return None
            bad.setdefault(path[0], set()).add(path[1])
        output = dict(output)
        for array, indexes in bad.items():
            output[array] = [item for index, item in enumerate(output[array]) if index not in indexes]
            if not output[array]:
                return None
        return None if any(validator.iter_errors(output)) else output


def _read_rules(folder: Path) -> list[dict[str, Any]]:
    """The rules of ``folder`` in file and rule order, each name once (the last one wins)."""
    rules: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml")):
        for rule in yaml.safe_load(file.read_text())["rules"]:
            rules[rule["name"]] = rule
    return list(rules.values())


def _fanout_arrays(fields: dict[str, Any]) -> list[str]:
    """Top-level output arrays built with ``each``: their items are rejected one by one."""
    return [key for key, spec in fields.items() if isinstance(spec, dict) and "each" in spec]


def _search(expression: str, context: Any) -> Any:
    try:
        return jmespath.search(expression, context, options=_OPTIONS)
    except JMESPathError as exc:
        raise _Failed(str(exc)) from None


def _truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, and empty strings, arrays and objects are false."""
    if value is None or value is False:
        return False
    return not isinstance(value, (str, list, dict)) or bool(value)
