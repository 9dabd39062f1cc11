"""The engine: rule folders in, one pure function from a Segment event to its outcome."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rules.loader import RuleSet, load_rules
from .outcome import Emitted, Outcome, Rejection, failure_rejection
from .paths import BUNDLED_RULES
from .rules.routing import Router
from .rules.rule import Rule
from .record import Record


class Engine:
    """Maps Segment events to Topsort events with a set of rules.

    >>> engine = Engine.from_folders()          # the bundled default rules
    >>> outcome = engine.process({"type": "track", "event": "Product Viewed", ...})

    :meth:`process` does no I/O and keeps no state, so one engine serves many threads.
    """

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._router = Router(rules.rules)

    @classmethod
    def from_folders(cls, *folders: str | Path) -> Engine:
        """Load rule folders in order (later ones override rules by name); none means the bundled rules."""
        return cls(load_rules(folders or (BUNDLED_RULES,)))

    def process(self, event: Any) -> Outcome:
        """The outcome of one decoded Segment event: emitted, rejected, or skipped.

        Total: whatever goes wrong for this event (a value no rule or validator can take, too
        deep, too large) becomes its rejection, naming the rule at work; it never raises. Every
        emitted event is valid against the Topsort schema, whose integers are bounded to what
        JSON encoders write, so it can be encoded.
        """
        if not isinstance(event, dict):
            reason = f"a Segment event is a JSON object, not {type(event).__name__}"
            return Outcome(None, rejected=(Rejection(None, "$", reason),))
        message_id = event.get("messageId")
        emitted: list[Emitted] = []
        rejected: list[Rejection] = []
        for rule in self._router.route(event):
            try:  # free in CPython 3.11+ until something raises
                if rule.wants(event):
                    rule.apply(event, emitted, rejected)
            except Exception as exc:  # noqa: BLE001 - the boundary: a rule that fails is its rejection
                rejected.append(failure_rejection(rule.name, exc))  # and the rules after it still run
        return Outcome(
            message_id if isinstance(message_id, str) else None, tuple(emitted), tuple(rejected)
        )

    def process_record(self, record: Record) -> Outcome:
        """The outcome of one input line: a decoding failure is a rejection like any other."""
        if record.error is not None:
            return Outcome(None, rejected=(Rejection(None, "$", record.error),))
        return self.process(record.event)

    def rule(self, name: str) -> Rule:
        """The rule named ``name`` (enabled or not)."""
        for rule in self.rules.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)
