"""Type coercions, as Segment applies them: ``"9.99"`` -> 9.99, ``"2"`` -> 2, ``123`` -> ``"123"``.

Each coercion returns the value unchanged when it cannot convert it, so the Topsort
schema check that follows rejects it with a precise reason instead of it vanishing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"-?\d+")
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})"
)
_INTEGER_DIGITS = 19  # longer integer strings are read as floats: validation bounds them, int() may refuse
_SECONDS_BELOW = 10**11  # an epoch number under this is seconds (in ms it would be before 1973)


def to_text(value: Any) -> str:
    """A scalar as Segment would send it as a string: strings as they are, anything else as JSON."""
    kind = value.__class__
    if kind is str:
        return value
    if kind is int:
        return str(value)
    if kind is float and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    if isinstance(value, str):
        return str(value)
    return orjson.dumps(value).decode()


def to_string(value: Any) -> Any:
    if isinstance(value, str) or value is None or isinstance(value, (dict, list)):
        return value
    return to_text(value)


def to_number(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.fullmatch(s := value.strip()):
        if len(s) <= _INTEGER_DIGITS and _INTEGER.fullmatch(s):
            return int(s)
        number = float(s)
        return number if math.isfinite(number) else value
    return value


def to_integer(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        number = to_number(value)
        return to_integer(number) if not isinstance(number, str) else value
    return value


def to_boolean(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def to_datetime(value: Any) -> Any:
    """An RFC 3339 date-time string from any timestamp Segment sends.

    RFC 3339 strings are kept exactly; ISO 8601 forms without a zone are taken as UTC;
    numbers (and numeric strings) are epoch milliseconds, or seconds when below 10^11.
    """
    if isinstance(value, str):
        text = value.strip()
        if _RFC3339.fullmatch(text):
            return text
        if _NUMBER.fullmatch(text):
            return to_datetime(to_number(text))
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return value
        return _format(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value if abs(value) < _SECONDS_BELOW else value / 1000
        try:
            return _format(datetime.fromtimestamp(seconds, timezone.utc))
        except (OverflowError, OSError, ValueError):
            return value
    return value


def _format(moment: datetime) -> str:
    spec = "seconds" if not moment.microsecond else "milliseconds" if not moment.microsecond % 1000 else "microseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


COERCIONS: dict[str, Callable[[Any], Any]] = {
    "string": to_string,
    "number": to_number,
    "integer": to_integer,
    "boolean": to_boolean,
    "datetime": to_datetime,
}
"""The coercions a field's ``as:`` may name."""
