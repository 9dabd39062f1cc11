"""The depth check every input passes before it is parsed: exact on any JSON text, whatever its strings hold."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.limits import too_deep

_TRICKY = st.text(alphabet='[]{}"\\ab', max_size=8)
"""Strings full of what the check must not count: brackets, quotes and backslashes (escaped once encoded)."""
_VALUES = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | _TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TRICKY, inner, max_size=4),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(_VALUES, st.integers(0, 6), st.integers(1, 8))
def test_depth_is_judged_exactly_past_brackets_quotes_and_backslashes_in_strings(value: Any, wrap: int,
                                                                                  limit: int) -> None:
    for level in range(wrap):
        value = [value, '"]]\\'] if level % 2 else {'k\\"[{': value}
    raw = orjson.dumps(value)
    assert too_deep(raw, limit) == (_depth(value) > limit)


def test_a_batch_body_of_many_shallow_events_is_not_too_deep() -> None:
    event = {"type": "track", "properties": {"products": [{"id": "p[1", "q": '"}'}] * 3}, "context": {"ip": "\\"}}
    body = orjson.dumps({"batch": [event] * 200})
    assert not too_deep(body)
    assert too_deep(body, limit=5) and not too_deep(body, limit=6)  # body, batch, event, properties, products, product
