"""A compiled rule: which Segment events it wants, and the Topsort events it makes of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .fields import (
    DEFAULT_ITEM,
    Build,
    Evaluate,
    FieldCompiler,
    FieldError,
    Leaf,
    Prepare,
    Report,
    compile_expression_at,
    element_contexts,
    truthy,
)
from .outcome import Kind
from .topsort_schema import topsort_schema
from .validation import OutputValidator
from .yaml_source import Path_

TRACK = "track"


class Output(NamedTuple):
    """One output of a rule for one event, before validation; ``item`` is its fan-out index."""

    item: int | None
    event: dict[str, Any] | None = None
    error: FieldError | None = None


@dataclass(eq=False)
class Rule:
    """One rule of a rule file, compiled. Build it with :func:`compile_rule`."""

    name: str
    kind: Kind
    file: str
    line: int | None
    enabled: bool
    types: frozenset[str]
    events: frozenset[str] | None
    condition: Evaluate | None
    each: Evaluate | None
    item: str
    build: Build
    prepare: Prepare
    leaves: list[Leaf]
    validator: OutputValidator
    spec: dict[str, Any]
    tests: list[dict[str, Any]] = field(default_factory=list)

    def mismatch(self, event: dict[str, Any]) -> str | None:
        """Why this rule does not want ``event``, or None when it does."""
        kind = event.get("type")
        if kind not in self.types:
            return f"type is {kind!r}, the rule wants {' or '.join(sorted(self.types))}"
        if self.events is not None and kind == TRACK and event.get("event") not in self.events:
            return f"event is {event.get('event')!r}, the rule wants {' or '.join(sorted(self.events))}"
        if self.condition is not None:
            try:
                holds = truthy(self.condition(event))
            except FieldError as exc:
                return f"'if' failed, so the rule does not take the event: {exc.reason}"
            if not holds:
                return f"'if' is false: {self.spec['when']['if']}"
        return None

    def wants(self, event: dict[str, Any]) -> bool:
        """The predicate alone (type and event name are the router's job); one that fails is false."""
        if self.condition is None:
            return True
        try:
            return truthy(self.condition(event))
        except FieldError:
            return False

    def contexts(self, event: dict[str, Any]) -> list[tuple[int | None, dict[str, Any]]]:
        """What the fields are evaluated against: the event, or with ``each`` one context per
        element (the event plus the element under the rule's ``item`` name and its ``index``).

        Raises :class:`FieldError` when ``each`` does not give a non-empty list.
        """
        if self.each is None:
            return [(None, event)]
        elements = self._elements(event)
        return [(index, {**event, self.item: element, "index": index}) for index, element in enumerate(elements)]

    def _elements(self, event: dict[str, Any]) -> list[Any]:
        elements = self.each(event) if self.each else None
        if not isinstance(elements, list) or not elements:
            got = "nothing" if elements is None else "an empty list" if elements == [] else type(elements).__name__
            raise FieldError("each", f"{self.spec['each']!r} should be a non-empty list, got {got}")
        return elements

    def outputs(self, event: dict[str, Any]) -> list[Output]:
        """Map ``event`` (already known to match) to this rule's unvalidated outputs."""
        if self.each is None:
            try:
                return [Output(None, self.build(event))]
            except FieldError as exc:
                return [Output(None, error=exc)]
        try:
            elements = self._elements(event)
            prepared = self.prepare(event)
        except FieldError as exc:
            return [Output(None, error=exc)]
        outputs = []
        for index, context in enumerate(element_contexts(event, self.item, elements)):
            try:
                outputs.append(Output(index, self.build(context, prepared)))
            except FieldError as exc:
                outputs.append(Output(index, error=exc))
        return outputs


def compile_rule(spec: dict[str, Any], file: str, ypath: Path_, line: int | None, report: Report) -> Rule:
    """Compile one schema-valid rule entry; problems go to ``report(ypath, message, field=...)``."""
    kind: Kind = spec["emit"]
    when = spec["when"]
    types = frozenset(_many(when["type"]))
    events = frozenset(_many(when["event"])) if "event" in when else None
    if events is not None and types != {TRACK}:
        report((*ypath, "when", "event"), "'event' names track events, so 'type' must be track alone")
    condition = (
        compile_expression_at(when["if"], (*ypath, "when", "if"), "when.if", report) if "if" in when else None
    )
    each = compile_expression_at(spec["each"], (*ypath, "each"), "each", report) if "each" in spec else None
    compiler = FieldCompiler(kind, report)
    item = spec.get("item", DEFAULT_ITEM)
    per_item = frozenset({item, "index", "@"}) if each is not None else frozenset()
    build, prepare, leaves = compiler.top(spec["fields"], (*ypath, "fields"), topsort_schema().node(kind), per_item)
    return Rule(
        name=spec["name"],
        kind=kind,
        file=file,
        line=line,
        enabled=spec.get("enabled", True),
        types=types,
        events=events,
        condition=condition,
        each=each,
        item=item,
        build=build,
        prepare=prepare,
        leaves=leaves,
        validator=OutputValidator(kind, compiler.fanout_arrays),
        spec=spec,
        tests=spec.get("tests", []),
    )


def _many(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
