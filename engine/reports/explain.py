"""Explain what the rules make of one event: each rule, why it matched or not, each field's value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..errors import FieldError
from ..outcome import Emitted, Rejection, failure_rejection
from ..rules.rule import Output, Rule


@dataclass
class FieldValue:
    field: str
    spec: Any
    value: Any = None
    error: str | None = None


@dataclass
class OutputExplanation:
    item: int | None
    fields: list[FieldValue]
    emitted: Emitted | None
    rejected: list[Rejection]


@dataclass
class RuleExplanation:
    rule: Rule
    matched: bool
    why: str
    outputs: list[OutputExplanation] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def explain(engine: Engine, event: Any) -> list[RuleExplanation]:
    """One explanation per rule of ``engine``, in rule order, disabled rules included."""
    if not isinstance(event, dict):
        return []
    return [_explain_safely(rule, event) for rule in engine.rules.rules]


def _explain_safely(rule: Rule, event: dict[str, Any]) -> RuleExplanation:
    """The explanation of one rule; where mapping raises, the rejection :meth:`Engine.process` makes."""
    try:
        return _explain_rule(rule, event)
    except Exception as exc:  # noqa: BLE001 - the same boundary as Engine.process
        return RuleExplanation(rule, True, "matched", rejected=[failure_rejection(rule.name, exc)])


def _explain_rule(rule: Rule, event: dict[str, Any]) -> RuleExplanation:
    if not rule.enabled:
        why = rule.mismatch(event)
        return RuleExplanation(rule, False, "disabled" + (f" (and {why})" if why else " (it would match)"))
    why = rule.mismatch(event)
    if why is not None:
        return RuleExplanation(rule, False, why)
    explanation = RuleExplanation(rule, True, "matched")
    try:
        contexts = rule.contexts(event)
    except FieldError as exc:
        _, explanation.rejected = rule.judge(Output(None, error=exc))
        return explanation
    for index, context in contexts:
        values = [_value(leaf.path, leaf.spec, leaf.evaluate, context) for leaf in rule.leaves]
        try:
            output = Output(index, event=rule.build(context))
        except FieldError as exc:
            output = Output(index, error=exc)
        emitted, rejected = rule.judge(output)
        explanation.outputs.append(OutputExplanation(index, values, emitted, rejected))
    return explanation


def _value(path: str, spec: Any, evaluate: Any, context: dict[str, Any]) -> FieldValue:
    try:
        return FieldValue(path, spec, evaluate(context))
    except FieldError as exc:
        return FieldValue(path, spec, error=exc.reason)
