"""Route an event to the rules that may want it with one dictionary lookup, not by trying every rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .rule import TRACK, Rule


class Router:
    """Maps (type, track event name) to the enabled rules for it, in rule order."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        rules = [rule for rule in rules if rule.enabled]
        by_type: dict[str, list[Rule]] = {}
        named: dict[tuple[str, str], list[Rule]] = {}
        for rule in rules:
            for kind in rule.types:
                if rule.events is None or kind != TRACK:
                    by_type.setdefault(kind, []).append(rule)
                else:
                    for name in rule.events:
                        named.setdefault((kind, name), []).append(rule)
        order = {id(rule): position for position, rule in enumerate(rules)}
        self._by_type = {kind: tuple(found) for kind, found in by_type.items()}
        self._named = {
            key: tuple(sorted(found + by_type.get(key[0], []), key=lambda rule: order[id(rule)]))
            for key, found in named.items()
        }

    def route(self, event: dict[str, Any]) -> tuple[Rule, ...]:
        """The rules whose type (and track event name) match ``event``."""
        kind = event.get("type")
        if not isinstance(kind, str):
            return ()
        name = event.get("event")
        if kind == TRACK and isinstance(name, str):
            found = self._named.get((kind, name))
            if found is not None:
                return found
        return self._by_type.get(kind, ())
