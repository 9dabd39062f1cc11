"""``test --coverage``: which fields and branches of each rule its inline tests exercise.

The engine runs generated code (see :mod:`engine.compile.codegen`) that records nothing, and must stay
that way. Coverage is a separate evaluation, made only when asked: each test event is walked
through the rule's field specs with the compiled JMESPath expressions, in the order the engine
applies them (``if``, ``each``, the source, ``lookup``, ``as``, ``default``), noting each branch
taken: ``when.if`` and ``if`` true or false, which ``first`` candidate gave the value (or none),
a ``lookup`` hit or miss (a value not in the table), ``default`` used or not.

A branch is named by where it is in the rule's ``fields``: ``placement.merge[0].position: first[1]
properties.position`` is the second candidate of ``position`` in the first part of ``placement``'s merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..topsort.coercion import COERCIONS
from ..compile.expressions import JMESPathError, compile_expression
from ..compile.fields import DEFAULT_ITEM, LOOKUP_KEYS, SOURCES, is_spec, truthy
from ..errors import FieldError
from .rule import TRACK, Rule


@dataclass
class RuleTestCoverage:
    """What the inline tests of one rule exercised: ``fields`` and ``branches`` by name, each
    with the number of test outputs (or test events, for ``when``) that exercised it."""

    rule: Rule
    tests: int
    fields: dict[str, int] = field(default_factory=dict)
    branches: dict[str, int] = field(default_factory=dict)

    @property
    def untested_fields(self) -> list[str]:
        return [name for name, hits in self.fields.items() if not hits]

    @property
    def untested_branches(self) -> list[str]:
        return [name for name, hits in self.branches.items() if not hits]


def rule_test_coverage(rules: Sequence[Rule]) -> list[RuleTestCoverage]:
    """The coverage of every rule by its own inline tests (rules without tests: nothing exercised)."""
    found = []
    for rule in rules:
        coverage = RuleTestCoverage(rule, len(rule.tests))
        _declare_rule(rule, coverage)
        for test in rule.tests:
            event = test.get("event")
            if isinstance(event, dict):
                _exercise(rule, event, coverage)
        found.append(coverage)
    return found


def render_test_coverage(found: Sequence[RuleTestCoverage]) -> str:
    """The report ``test --coverage`` prints: per rule, fields and branches exercised and those not."""
    lines = ["Test coverage (fields that got a value, branches taken, in the rules' own inline tests)", ""]
    for coverage in found:
        rule = coverage.rule
        fields = sum(1 for hits in coverage.fields.values() if hits)
        branches = sum(1 for hits in coverage.branches.values() if hits)
        lines.append(f"{rule.name} ({_relative(rule.file)}:{rule.line}): {coverage.tests} test(s); "
                     f"fields {fields}/{len(coverage.fields)}; branches {branches}/{len(coverage.branches)}")
        if not coverage.tests:
            continue
        if coverage.untested_fields:
            lines.append("  untested fields: " + ", ".join(coverage.untested_fields))
        for branch in coverage.untested_branches:
            lines.append(f"  untested branch: {branch}")
    untested = [coverage.rule.name for coverage in found if not coverage.tests]
    lines += ["", "Rules without tests: " + (", ".join(untested) if untested else "none")]
    return "\n".join(lines) + "\n"


def _relative(file: str) -> str:
    try:
        return str(Path(file).resolve().relative_to(Path.cwd()))
    except ValueError:
        return file


def _declare_rule(rule: Rule, coverage: RuleTestCoverage) -> None:
    if rule.condition is not None:
        coverage.branches["when: if true"] = coverage.branches["when: if false"] = 0
    for leaf in rule.leaves:
        coverage.fields[leaf.path] = 0
        _declare(leaf.spec, leaf.path, coverage)


def _declare(spec: Any, at: str, coverage: RuleTestCoverage) -> None:
    """List every field and branch of ``spec`` at ``at``, exercised or not."""
    if not isinstance(spec, dict):
        return
    if not is_spec(spec):
        _declare_fields(spec, at, coverage)
        return
    if "if" in spec:
        coverage.branches[f"{at}: if true"] = coverage.branches[f"{at}: if false"] = 0
    source = next((key for key in SOURCES if key in spec), None)
    if source == "fields":
        _declare_fields(spec["fields"], at, coverage)
    elif source in ("first", "merge"):
        for index, part in enumerate(spec[source]):
            if source == "first":
                coverage.branches[_candidate(at, index, part)] = 0
            _declare(part, f"{at}.{source}[{index}]", coverage)
        if source == "first":
            coverage.branches[f"{at}: first: none"] = 0
    for key, branches in (("lookup", ("lookup hit", "lookup miss")), ("default", ("default used", "default not used"))):
        if key in spec:
            for branch in branches:
                coverage.branches[f"{at}: {branch}"] = 0


def _declare_fields(fields: dict[str, Any], at: str, coverage: RuleTestCoverage) -> None:
    for key, child in fields.items():
        coverage.fields[f"{at}.{key}"] = 0
        _declare(child, f"{at}.{key}", coverage)


def _exercise(rule: Rule, event: dict[str, Any], coverage: RuleTestCoverage) -> None:
    """Walk one test event through the rule, counting what it exercises."""
    kind = event.get("type")
    if kind not in rule.types or (rule.events is not None and kind == TRACK and event.get("event") not in rule.events):
        return
    if rule.condition is not None:
        holds = rule.wants(event)
        _hit(coverage, "when", "if true" if holds else "if false")
        if not holds:
            return
    try:
        contexts = rule.contexts(event)
    except FieldError:
        return
    for _, context in contexts:
        for leaf in rule.leaves:
            try:
                value = _value(leaf.spec, context, leaf.path, coverage)
            except JMESPathError:
                continue
            _filled(coverage, leaf.path, value)


def _value(spec: Any, context: Any, at: str, coverage: RuleTestCoverage) -> Any:
    """A field's value, as the generated code computes it (before fitting to the Topsort schema,
    which decides no branch), counting the branches taken."""
    if isinstance(spec, str):
        return compile_expression(spec)(context)
    if not isinstance(spec, dict):
        return None
    if not is_spec(spec):
        return _object(spec, context, at, coverage)
    if "if" in spec:
        holds = truthy(compile_expression(spec["if"])(context))
        _hit(coverage, at, "if true" if holds else "if false")
        if not holds:
            return None
    if "each" not in spec:
        return _finish(spec, context, at, coverage)
    elements = compile_expression(spec["each"])(context)
    if not isinstance(elements, list):
        return None
    item = spec.get("item", DEFAULT_ITEM)
    made = [_finish(spec, {**context, item: element, "index": index}, at, coverage)
            for index, element in enumerate(elements)]
    return [value for value in made if value is not None]


def _finish(spec: dict[str, Any], context: Any, at: str, coverage: RuleTestCoverage) -> Any:
    value = _source(spec, context, at, coverage)
    if "lookup" in spec:
        table = spec["lookup"]
        known = isinstance(value, LOOKUP_KEYS) and value in table
        if value is not None:
            _hit(coverage, at, "lookup hit" if known else "lookup miss")
        value = table[value] if known else None
    if "as" in spec:
        value = COERCIONS[spec["as"]](value)
    if "default" in spec:
        _hit(coverage, at, "default used" if value is None else "default not used")
        value = spec["default"] if value is None else value
    return value


def _source(spec: dict[str, Any], context: Any, at: str, coverage: RuleTestCoverage) -> Any:
    source = next((key for key in SOURCES if key in spec), None)
    if source is None:
        return context.get(spec.get("item", DEFAULT_ITEM)) if isinstance(context, dict) else None
    if source == "from":
        return compile_expression(spec["from"])(context)
    if source == "const":
        return spec["const"]
    if source == "fields":
        return _object(spec["fields"], context, at, coverage)
    result = None
    for index, part in enumerate(spec[source]):
        value = _value(part, context, f"{at}.{source}[{index}]", coverage)
        if source == "first":
            if value is not None and value != "":
                _count(coverage.branches, _candidate(at, index, part))
                return value
        elif value is not None:
            result = {**result, **value} if isinstance(result, dict) and isinstance(value, dict) else value
    if source == "first":
        _hit(coverage, at, "first: none")
    return result


def _object(fields: dict[str, Any], context: Any, at: str, coverage: RuleTestCoverage) -> Any:
    made = {}
    for key, child in fields.items():
        value = _value(child, context, f"{at}.{key}", coverage)
        _filled(coverage, f"{at}.{key}", value)
        if value is not None:
            made[key] = value
    return made or None


def _candidate(at: str, index: int, part: Any) -> str:
    return f"{at}: first[{index}]" + (f" {part}" if isinstance(part, str) else "")


def _hit(coverage: RuleTestCoverage, at: str, branch: str) -> None:
    _count(coverage.branches, f"{at}: {branch}")


def _filled(coverage: RuleTestCoverage, at: str, value: Any) -> None:
    if value is not None and value != "":
        _count(coverage.fields, at)


def _count(counts: dict[str, int], name: str) -> None:
    counts[name] = counts.get(name, 0) + 1
