"""A compiled rule: which Segment events it wants, and the Topsort events it makes of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..compile.fields import (
    DEFAULT_ITEM,
    Evaluate,
    FieldCompiler,
    FieldError,
    Emit,
    Leaf,
    Output,
    Report,
    Target,
    build_function,
    compile_expression_at,
    fragment,
    mapping_function,
    truthy,
)
from ..outcome import Emitted, Kind, Rejection
from ..topsort.schema import json_path, topsort_schema
from ..topsort.validation import OutputValidator
from .yaml_source import Path_

TRACK = "track"


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
    leaves: list[Leaf]
    shared: frozenset[str]
    fan_out: Emit | None
    validator: OutputValidator
    spec: dict[str, Any]
    tests: list[dict[str, Any]] = field(default_factory=list)
    # apply(event, emitted, rejected): map and validate an event this rule wants, appending what it
    # emits and what it rejects (the engine's hot path; generated at load, see engine.compile.codegen)
    apply: Callable[[dict[str, Any], list[Emitted], list[Rejection]], None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.apply = self._generate(_apply_target(self))

    def _generate(self, target: Target) -> Callable[..., Any]:
        return mapping_function(target, self.leaves, self.shared, self.fan_out, self.item,
                                _no_elements(self.spec.get("each")))

    def judge(self, output: Output) -> tuple[Emitted | None, list[Rejection]]:
        """Validate one output: what it emits (if anything) and what it rejects."""
        prefix = f"item {output.item} of {self.spec['each']}: " if output.item is not None else ""
        if output.error is not None:
            path = "$" if output.error.path == "each" else json_path(output.error.path.split("."))
            return None, [Rejection(self.name, path, prefix + output.error.reason, output.item)]
        valid, problems = self.validator.check(output.event)
        rejected = [
            Rejection(self.name, path, prefix + reason, output.item if output.item is not None else nested)
            for path, reason, nested in problems
        ]
        return (Emitted(self.kind, self.name, valid) if valid is not None else None), rejected

    def _settle(self, output: Output, emitted: list[Emitted], rejected: list[Rejection]) -> None:
        made, refused = self.judge(output)
        if made is not None:
            emitted.append(made)
        rejected.extend(refused)

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
            raise _no_elements(self.spec["each"])(elements)
        return elements

    @cached_property
    def build(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The Topsort event this rule builds in one of its :meth:`contexts` (raises FieldError)."""
        return build_function(self.leaves)


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
    leaves, shared = compiler.top(spec["fields"], (*ypath, "fields"), topsort_schema().node(kind), per_item)
    fan_out = fragment(spec["each"], each, "each") if each is not None else None
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
        leaves=leaves,
        shared=shared,
        fan_out=fan_out,
        validator=OutputValidator(kind, compiler.fanout_arrays),
        spec=spec,
        tests=spec.get("tests", []),
    )


def _apply_target(rule: Rule) -> Target:
    """Validate each output on the spot: valid ones become :class:`Emitted` without a verdict to
    build; the others (and failures) go through :meth:`Rule.judge`."""
    return Target(
        name="apply",
        parameters="ev, emitted, rejected",
        namespace={"_Output": Output, "_valid": rule.validator.is_valid, "_settle": rule._settle,
                   "_new": tuple.__new__, "_Emitted": Emitted, "_kind": rule.kind, "_name": rule.name},
        failed=("_settle(_Output(None, None, _exc), emitted, rejected)", "return"),
        item_failed=("_settle(_Output(_index, None, _exc), emitted, rejected)",),
        made=lambda index: (
            "if _valid(_out): emitted.append(_new(_Emitted, (_kind, _name, _out)))",
            f"else: _settle(_Output({index}, _out), emitted, rejected)",
        ),
    )


def _no_elements(each: str | None) -> Callable[[Any], FieldError]:
    """The error for an ``each`` that gave ``elements``, not a non-empty list."""

    def error(elements: Any) -> FieldError:
        got = "nothing" if elements is None else "an empty list" if elements == [] else type(elements).__name__
        return FieldError("each", f"{each!r} should be a non-empty list, got {got}")

    return error


def _many(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
