"""What arrives and what the rules make of it: the data-quality view of a stream of Segment events.

Counts every (type, track event name) seen with the rules that took it, or none; per rule the
events it matched, the Topsort events it emitted and rejected (with the commonest reasons), and
how often each output field was filled. Memory is bounded: event names and rejection reasons
beyond a few thousand distinct ones are counted together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from .field_paths import count_fields, rejection_key
from ..outcome import Outcome
from ..record import Record

MAX_ARRIVALS = 10_000
"""Distinct (type, event name) pairs kept; the rest are counted as OTHER."""
MAX_REASONS = 1_000
"""Distinct rejection reasons kept per rule; the rest are counted as OTHER."""
OTHER = "(other)"
NOT_JSON = "(not valid JSON)"
NOT_AN_OBJECT = "(not an object)"
NO_TYPE = "(no type)"


@dataclass
class _Arrival:
    count: int = 0
    none: int = 0
    rules: Counter[str] = field(default_factory=Counter)


@dataclass
class _RuleUse:
    matched: int = 0
    emitted: int = 0
    rejected: int = 0
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)
    filled: Counter[str] = field(default_factory=Counter)
    lengths: Counter[str] = field(default_factory=Counter)


class Coverage:
    """Accumulates, event by event, what arrives and what the rules of ``engine`` make of it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events = 0
        self.outcomes: Counter[str] = Counter()
        self._arrivals: dict[tuple[str, str | None], _Arrival] = {}
        self._rules = {rule.name: _RuleUse() for rule in engine.rules.rules}

    def add(self, event: Any, outcome: Outcome, decoded: bool = True) -> None:
        """Count one input event (``decoded`` False for a line that was not JSON) and its outcome."""
        self.events += 1
        self.outcomes[outcome.verdict] += 1
        arrival = self._arrival(_arrival_key(event, decoded))
        arrival.count += 1
        took = dict.fromkeys([e.rule for e in outcome.emitted] + [r.rule for r in outcome.rejected if r.rule])
        if not took:
            arrival.none += 1
        for name in took:
            arrival.rules[name] += 1
            self._rules[name].matched += 1
        for emitted in outcome.emitted:
            use = self._rules[emitted.rule]
            use.emitted += 1
            count_fields(emitted.event, use.filled, use.lengths)
        for rejection in outcome.rejected:
            if rejection.rule is None:
                continue
            use = self._rules[rejection.rule]
            use.rejected += 1
            _, path, reason = rejection_key(rejection)
            key = (path, reason) if (path, reason) in use.reasons or len(use.reasons) < MAX_REASONS else (OTHER, OTHER)
            use.reasons[key] += 1

    def report(self, top: int = 5) -> dict[str, Any]:
        """``events``, ``outcomes``, ``arrivals`` (by volume) and ``rules`` (with field fill rates)."""
        arrivals = [
            {"type": kind, "event": name, "count": found.count, "rules": dict(found.rules.most_common()),
             "none": found.none}
            for (kind, name), found in sorted(self._arrivals.items(), key=lambda item: (-item[1].count, item[0]))
        ]
        rules = {}
        for rule in self.engine.rules.rules:
            use = self._rules[rule.name]
            rules[rule.name] = {
                "kind": rule.kind, "enabled": rule.enabled, "matched": use.matched, "emitted": use.emitted,
                "rejected": use.rejected,
                "reasons": [{"path": path, "reason": reason, "count": count}
                            for (path, reason), count in use.reasons.most_common(top)],
                "fields": self._fill_rates(use, [leaf.path for leaf in rule.leaves]),
            }
        outcomes = {verdict: self.outcomes[verdict] for verdict in ("emitted", "partly rejected", "rejected", "skipped")}
        return {"events": self.events, "outcomes": outcomes, "arrivals": arrivals, "rules": rules}

    def _fill_rates(self, use: _RuleUse, declared: list[str]) -> dict[str, dict[str, Any]]:
        order = {name: position for position, name in enumerate(declared)}
        top = lambda path: path.split(".")[0].removesuffix("[]")  # noqa: E731
        paths = sorted({*declared, *use.filled}, key=lambda path: (order.get(top(path), len(order)), top(path), path))
        rates = {}
        for path in paths:
            array = path[:path.rindex("[]") + 2] if "[]" in path else None
            of = use.lengths[array] if array else use.emitted
            filled = use.filled[path]
            rates[path] = {"filled": filled, "of": of, "rate": round(filled / of, 4) if of else None}
        return rates

    def _arrival(self, key: tuple[str, str | None]) -> _Arrival:
        found = self._arrivals.get(key)
        if found is None:
            if len(self._arrivals) >= MAX_ARRIVALS:
                key = (OTHER, None)
            found = self._arrivals.setdefault(key, _Arrival())
        return found


def coverage_of(records: Iterable[Record], engine: Engine) -> Coverage:
    """Map every record with ``engine`` and count what arrived and what became of it."""
    found = Coverage(engine)
    for record in records:
        found.add(record.event, engine.process_record(record), decoded=record.error is None)
    return found


def _arrival_key(event: Any, decoded: bool) -> tuple[str, str | None]:
    if not decoded:
        return NOT_JSON, None
    if not isinstance(event, dict):
        return NOT_AN_OBJECT, None
    kind = event.get("type")
    if not isinstance(kind, str):
        return NO_TYPE, None
    name = event.get("event")
    return kind, (name if kind == "track" and isinstance(name, str) else None)
