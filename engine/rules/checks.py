"""Warnings about rule sets that would count one user action twice."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from ..errors import Problem
from .rule import Rule

CO_FIRING: tuple[frozenset[str], ...] = (frozenset({"Product Clicked", "Product Added"}),)
"""Track events that one user action often fires together (Segment's Topsort guide warns of this pair)."""


def double_count_warnings(rules: Sequence[Rule]) -> list[Problem]:
    """A warning for each pair of enabled rules that emit the same kind for one user action."""
    enabled = [rule for rule in rules if rule.enabled]
    warnings = []
    for first, second in combinations(enabled, 2):
        if first.kind != second.kind:
            continue
        why = _overlap(first, second)
        if why:
            warnings.append(
                Problem(
                    second.file, second.line, None, second.name, None,
                    f"{why}; with rule '{first.name}' ({first.file}:{first.line}) both emit {first.kind}, "
                    f"so one user action is counted twice. Disable one (enabled: false) unless their 'if' "
                    f"conditions never hold together.",
                    "warning",
                )
            )
    return warnings


def _triggers(rule: Rule) -> set[tuple[str, str | None]]:
    return {(kind, name) for kind in rule.types for name in (rule.events or [None])}


def _overlap(first: Rule, second: Rule) -> str | None:
    for kind, name in _triggers(first):
        for other_kind, other_name in _triggers(second):
            if kind != other_kind:
                continue
            if name == other_name or name is None or other_name is None:
                event = name or other_name
                return f"the same {kind} event{f' ({event!r})' if event else ''} triggers both rules"
            if frozenset({name, other_name}) in CO_FIRING:
                return f"{name!r} and {other_name!r} often fire together for one user action"
    return None
