"""Run the tests written inside rule files: an input event and the exact outputs or rejections."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..outcome import Emitted, Rejection
from .rule import Rule


@dataclass(frozen=True, slots=True)
class RuleTestResult:
    """One inline test's verdict; ``failure`` explains a failed one (with a diff)."""

    rule: Rule
    name: str
    failure: str | None

    @property
    def passed(self) -> bool:
        return self.failure is None


def run_rule_tests(rules: Sequence[Rule]) -> list[RuleTestResult]:
    """Run every inline test of ``rules`` (disabled rules included)."""
    return [
        RuleTestResult(rule, test.get("name", f"test {index + 1}"), _failure(rule, test))
        for rule in rules
        for index, test in enumerate(rule.tests)
    ]


def _failure(rule: Rule, test: dict[str, Any]) -> str | None:
    event = test["event"]
    emitted: list[Emitted] = []
    rejected: list[Rejection] = []
    if isinstance(event, dict) and rule.mismatch(event) is None:
        rule.apply(event, emitted, rejected)
    problems = []
    outputs = [e.event for e in emitted]
    expected = test.get("expect", [])
    if _canonical(outputs) != _canonical(expected):
        if not isinstance(event, dict) or rule.mismatch(event):
            why = rule.mismatch(event) if isinstance(event, dict) else "the event is not an object"
            problems.append(f"the rule does not take this event: {why}")
        problems.append("outputs differ (- expected, + actual):\n" + _diff(expected, outputs))
    wanted = test.get("reject", [])
    unmatched = list(rejected)
    missing = []
    for want in wanted:
        match = next((r for r in unmatched if _matches(r, want)), None)
        if match is None:
            missing.append(want)
        else:
            unmatched.remove(match)
    if missing or unmatched:
        lines = [f"  expected, not found: {_show(w)}" for w in missing]
        lines += [f"  found, not expected: {_show(r.to_dict())}" for r in unmatched]
        problems.append("rejections differ:\n" + "\n".join(lines))
    return "\n".join(problems) or None


def _matches(rejection: Rejection, want: dict[str, Any]) -> bool:
    return (
        ("path" not in want or want["path"] == rejection.path)
        and ("item" not in want or want["item"] == rejection.item)
        and ("reason" not in want or want["reason"].lower() in rejection.reason.lower())
    )


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _diff(expected: Any, actual: Any) -> str:
    pretty = lambda value: orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    lines = difflib.unified_diff(
        pretty(expected).splitlines(), pretty(actual).splitlines(), "expected", "actual", lineterm="", n=2
    )
    return "\n".join(list(lines)[2:])


def _show(value: dict[str, Any]) -> str:
    return orjson.dumps({k: v for k, v in value.items() if v is not None}).decode()
