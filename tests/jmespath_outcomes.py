"""Compare what two JMESPath evaluations give, down to types, key order and exceptions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def typed(value: Any) -> Any:
    """``value`` with every type and every key order made explicit, so ``1``, ``1.0`` and
    ``True`` differ, as do ``{"a":…,"b":…}`` and ``{"b":…,"a":…}``."""
    if isinstance(value, dict):
        return ("object", [(key, typed(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [typed(item) for item in value])
    if isinstance(value, float) and value != value:
        return ("float", "nan")  # NaN equals nothing, not even itself
    if value is None or isinstance(value, (str, int, float)):
        return (type(value).__name__, value)
    return (type(value).__name__,)


def outcome(evaluate: Callable[[], Any]) -> tuple[str, Any]:
    """What running ``evaluate()`` gives: its typed result, or its exception's type and text."""
    try:
        return ("result", typed(evaluate()))
    except Exception as error:  # noqa: BLE001 - any exception is an outcome to compare
        return ("error", (type(error), str(error)))
