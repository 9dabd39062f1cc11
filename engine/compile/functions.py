"""Custom JMESPath functions available to every rule expression.

Registered once, on :data:`FUNCTIONS`; every expression the engine compiles sees them.
Each one passes ``null`` through, so an optional field that is missing stays missing
instead of raising.

==========================  ===============================================================
``lower(s)``, ``upper(s)``  the string in lower / upper case
``concat(a, b, ...)``       strings and numbers joined into one string; ``null`` if any is null
``stringify_values(o)``     the object with every value made a string (``1`` -> ``"1"``)
==========================  ===============================================================
"""

from __future__ import annotations

from typing import Any

import jmespath.functions
from jmespath.functions import signature

from ..topsort.coercion import to_text


class EngineFunctions(jmespath.functions.Functions):
    """JMESPath's built-in functions plus the engine's own (see the module docstring)."""

    @signature({"types": ["string", "null"]})
    def _func_lower(self, s: str | None) -> str | None:
        return None if s is None else s.lower()

    @signature({"types": ["string", "null"]})
    def _func_upper(self, s: str | None) -> str | None:
        return None if s is None else s.upper()

    @signature({"types": ["string", "number", "null"], "variadic": True})
    def _func_concat(self, *parts: Any) -> str | None:
        if None in parts:
            return None
        return "".join(map(to_text, parts))

    @signature({"types": ["object", "null"]})
    def _func_stringify_values(self, obj: dict[str, Any] | None) -> dict[str, str] | None:
        if obj is None:
            return None
        return {k: to_text(v) for k, v in obj.items() if v is not None}


FUNCTIONS = EngineFunctions()
"""The one registry of custom functions, shared by every compiled expression."""
