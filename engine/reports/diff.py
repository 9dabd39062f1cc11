"""What a rule change does to real traffic: the same events through two rule sets, compared.

Each input event goes through both rule sets in one pass; only what differs is looked at closely,
and what is kept is bounded (counts, and a few examples per field), so memory does not grow with
the input.

Outputs of one event are paired by rule and kind: first those with the same Topsort ``id``,
then the rest in the order the rule made them. A pair whose Topsort events differ is *changed*
(and compared field by field); an output without a partner was *added* or *removed*. Topsort
events added or removed as a whole count under their rule, not under fields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine import Engine
from .field_paths import bounded, field_values, rejection_key
from ..outcome import Emitted, Outcome, Rejection
from ..record import Record

FailOn = Literal["changed", "rejected", "never"]
ARROW = "→"
MAX_REASONS = 100
"""Distinct rejection reasons kept per rule (reasons may quote values); the rest are counted together."""
OTHER_REASONS = ("*", "(other reasons)")


@dataclass
class _RuleChanges:
    before: int = 0
    after: int = 0
    added: int = 0
    removed: int = 0
    changed: int = 0
    rejected_before: int = 0
    rejected_after: int = 0
    new_rejections: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # -> [count, example]

    def add_new_rejection(self, key: tuple[str, str], message_id: str | None) -> None:
        if key not in self.new_rejections and len(self.new_rejections) >= MAX_REASONS:
            key = OTHER_REASONS
        entry = self.new_rejections.setdefault(key, [0, message_id])
        entry[0] += 1

    @property
    def differs(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.new_rejections
                    or self.rejected_before != self.rejected_after)


@dataclass
class _FieldChanges:
    gained: int = 0
    lost: int = 0
    changed: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


class RuleSetDiff:
    """Accumulates the differences between two rule sets' outcomes, event by event."""

    def __init__(self, examples: int = 3, kinds: dict[str, str] | None = None) -> None:
        self.examples = examples
        self.kinds = kinds or {}
        self.events = 0
        self.changed = 0
        self.transitions: Counter[str] = Counter()
        self._rules: dict[str | None, _RuleChanges] = {}
        self._fields: dict[str, _FieldChanges] = {}

    def add(self, before: Outcome, after: Outcome) -> None:
        """Count one input event by its outcome under the old rules and under the new ones."""
        self.events += 1
        if before == after:
            for emitted in before.emitted:
                changes = self._rule(emitted.rule)
                changes.before += 1
                changes.after += 1
            for rejection in before.rejected:
                changes = self._rule(rejection.rule)
                changes.rejected_before += 1
                changes.rejected_after += 1
            return
        self.changed += 1
        self.transitions[f"{before.verdict}{ARROW}{after.verdict}"] += 1
        self._outputs(before.emitted, after.emitted, after.message_id or before.message_id)
        self._rejections(before.rejected, after.rejected, after.message_id or before.message_id)

    def failed(self, fail_on: FailOn) -> bool:
        """Whether a CI gate set to ``fail_on`` fails: any changed event, or any new rejection."""
        if fail_on == "changed":
            return self.changed > 0
        if fail_on == "rejected":
            return any(changes.new_rejections for changes in self._rules.values())
        return False

    def report(self) -> dict[str, Any]:
        """The report: ``events``, ``changed``, ``transitions``, ``rules`` and ``fields``."""
        rules = []
        for name, changes in sorted(self._rules.items(), key=lambda item: (item[0] is not None, item[0] or "")):
            rules.append({
                "rule": name, "kind": self.kinds.get(name) if name is not None else None,
                "before": changes.before, "after": changes.after,
                "added": changes.added, "removed": changes.removed, "changed": changes.changed,
                "rejected": {"before": changes.rejected_before, "after": changes.rejected_after},
                "new_rejections": [
                    {"path": path, "reason": reason, "count": count, "example": example}
                    for (path, reason), (count, example) in sorted(
                        changes.new_rejections.items(), key=lambda item: -item[1][0])
                ],
            })
        fields = {
            path: {"gained": found.gained, "lost": found.lost, "changed": found.changed, "examples": found.examples}
            for path, found in sorted(self._fields.items())
        }
        return {"events": self.events, "changed": self.changed,
                "transitions": dict(self.transitions.most_common()), "rules": rules, "fields": fields}

    def _rule(self, name: str | None) -> _RuleChanges:
        changes = self._rules.get(name)
        if changes is None:
            changes = self._rules[name] = _RuleChanges()
        return changes

    def _outputs(self, before: Sequence[Emitted], after: Sequence[Emitted], message_id: str | None) -> None:
        groups: dict[tuple[str, str], tuple[list[Emitted], list[Emitted]]] = {}
        for side, outputs in ((0, before), (1, after)):
            for emitted in outputs:
                groups.setdefault((emitted.rule, emitted.kind), ([], []))[side].append(emitted)
        for (name, kind), (old, new) in groups.items():
            changes = self._rule(name)
            changes.before += len(old)
            changes.after += len(new)
            pairs, removed, added = _pair(old, new)
            changes.removed += removed
            changes.added += added
            for was, now in pairs:
                if was.event != now.event:
                    changes.changed += 1
                    self._compare_fields(kind, name, was.event, now.event, message_id)

    def _compare_fields(self, kind: str, rule: str, was: dict[str, Any], now: dict[str, Any],
                        message_id: str | None) -> None:
        old, new = field_values(was), field_values(now)
        for path in dict.fromkeys([*old, *new]):
            before, after = old.get(path), new.get(path)
            if before == after:
                continue
            name = bounded(f"{kind}.{path}", self._fields)
            found = self._fields.get(name)
            if found is None:
                found = self._fields[name] = _FieldChanges()
            if path not in old:
                found.gained += 1
            elif path not in new:
                found.lost += 1
            else:
                found.changed += 1
            if len(found.examples) < self.examples:
                found.examples.append({"messageId": message_id, "rule": rule, "before": before, "after": after})

    def _rejections(self, before: Sequence[Rejection], after: Sequence[Rejection], message_id: str | None) -> None:
        old = Counter(map(rejection_key, before))
        new = Counter(map(rejection_key, after))
        for rejection in before:
            self._rule(rejection.rule).rejected_before += 1
        for rejection in after:
            self._rule(rejection.rule).rejected_after += 1
        for (rule, path, reason), count in (new - old).items():
            changes = self._rule(rule)
            for _ in range(count):
                changes.add_new_rejection((path, reason), message_id)


def diff_records(records: Iterable[Record], before: Engine, after: Engine, examples: int = 3) -> RuleSetDiff:
    """Run every record through both engines, once each, and accumulate what differs."""
    found = RuleSetDiff(examples, _rule_kinds(before, after))
    add, old, new = found.add, before.process, after.process
    for record in records:
        if record.error is not None:
            outcome = before.process_record(record)
            add(outcome, outcome)
            continue
        event = record.event
        add(old(event), new(event))
    return found


def _rule_kinds(before: Engine, after: Engine) -> dict[str, str]:
    """Each rule's kind, ``old→new`` where the two rule sets differ on it."""
    old = {rule.name: rule.kind for rule in before.rules.rules}
    new = {rule.name: rule.kind for rule in after.rules.rules}
    kinds = {}
    for name in dict.fromkeys([*old, *new]):
        was, now = old.get(name), new.get(name)
        kinds[name] = was if now in (None, was) else now if was is None else f"{was}{ARROW}{now}"
    return kinds


def _pair(old: list[Emitted], new: list[Emitted]) -> tuple[list[tuple[Emitted, Emitted]], int, int]:
    """Pairs of one rule's outputs for one event (same id first, then in order), removed, added."""
    if len(old) == 1 and len(new) == 1:
        return [(old[0], new[0])], 0, 0
    by_id: dict[Any, list[int]] = {}
    for position, emitted in enumerate(new):
        by_id.setdefault(_id(emitted), []).append(position)
    taken = [False] * len(new)
    pairs: list[tuple[Emitted, Emitted]] = []
    unpaired: list[Emitted] = []
    for emitted in old:
        candidates = by_id.get(_id(emitted)) if _id(emitted) is not None else None
        if candidates:
            position = candidates.pop(0)
            taken[position] = True
            pairs.append((emitted, new[position]))
        else:
            unpaired.append(emitted)
    rest = [emitted for position, emitted in enumerate(new) if not taken[position]]
    pairs.extend(zip(unpaired, rest))
    matched = min(len(unpaired), len(rest))
    return pairs, len(unpaired) - matched, len(rest) - matched


def _id(emitted: Emitted) -> Any:
    identifier = emitted.event.get("id")
    return identifier if isinstance(identifier, str) else None
