"""The limits every input is held to, checked before the work they bound is done.

============================  ==============================  ==========================================
limit                         default (flag)                  refused as
============================  ==============================  ==========================================
bytes per input line          16 MiB (``--max-line-bytes``)   ``FILE:LINE: line longer than 16 MiB
                                                              (--max-line-bytes); skipped``: a decode
                                                              rejection keeping the line's first KiB
nesting of one event          128 levels                      ``FILE:LINE: nested deeper than 128
                                                              levels (the limit of an event)``
expansion of a gzipped file   200× past 16 MiB                ``FILE:LINE: gzip expands 698× (… → … so
                              (``--max-gzip-ratio``)          far), past the limit of 200× …``: the rest
                                                              of the file is not read (exit 3)
numbers in Topsort events     signed 64 bits                  validation: ``… is greater than the
                                                              maximum of 9223372036854775807``
JSON document read whole      64 MiB                          (a larger file is read as NDJSON)
rule file, aliases expanded   100 000 values, 64 levels       ``FILE:LINE:COL: error: not valid YAML:
                                                              aliases expand to more than 100,000 …``
JMESPath expression           4 096 characters, 64 levels     ``FILE:LINE:COL: error: rule … field …:
                                                              invalid JMESPath …: nested more than …``
============================  ==============================  ==========================================

orjson reads 1 024 levels but writes only 254, and records (dead letters) wrap the event: 128
leaves room. Request bodies of ``serve`` have limits of their own (Segment's: 32 KB per event,
500 KB per request), stated there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import orjson

MiB = 1024 * 1024

MAX_LINE_BYTES = 16 * MiB
"""Default bytes per NDJSON line (a Segment batch body is at most 500 KB, an event 32 KB)."""
MAX_DEPTH = 128
"""Deepest nesting of arrays and objects in one event. orjson reads 1 024 levels but writes
only 254, and dead-letter records wrap the event, so an event kept must stay well below."""
MAX_GZIP_RATIO = 200
"""Default largest expansion of a gzipped file (JSON events compress 5-20×; zeros 1 000×)."""
GZIP_RATIO_FLOOR = 16 * MiB
"""Decompressed bytes any gzipped file may produce before its ratio is checked."""
MAX_DOCUMENT_BYTES = 64 * MiB
"""The largest JSON document read whole; a larger source is NDJSON."""
INTEGER_RANGE = (-(2**63), 2**63 - 1)
"""The integers a Topsort event may carry (what JSON encoders and Topsort's API take)."""
MAX_YAML_VALUES = 100_000
"""Values a rule file may hold once its aliases are expanded (a 500-byte alias bomb holds 10⁹)."""
MAX_YAML_DEPTH = 64
"""Deepest nesting in a rule file."""
MAX_EXPRESSION_CHARS = 4096
"""The longest JMESPath expression a rule may hold (the bundled rules' longest has a few hundred)."""
MAX_EXPRESSION_DEPTH = 64
"""The deepest nesting of an expression's brackets, and of its syntax tree (``a || b || …`` nests too)."""
KEPT_BYTES = 1024
"""Bytes of a refused over-long line kept in its dead letter."""


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The limits of one read, as the command line set them."""

    max_line_bytes: int = MAX_LINE_BYTES
    max_gzip_ratio: float = MAX_GZIP_RATIO


DEFAULT_LIMITS = InputLimits()

_OPENERS = b"[{"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``raw`` nests deeper than ``limit``.

    Cheap for almost every event: nesting cannot exceed the number of ``[`` and ``{``, counted
    at C speed (about 0.5 ns a byte); only a text with more than ``limit`` of them (a batch body,
    a long list) is scanned properly, its strings cut out with bytes operations rather than a
    regular expression (≈ 4× faster: ≈ 8 µs per event of a 100-event batch body).
    """
    if len(raw) - len(raw.translate(None, _OPENERS)) <= limit:
        return False
    # JSON has backslashes only inside strings: without its escaped backslashes and quotes, every
    # other piece between two quotes is outside a string
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


def encodable(value: Any) -> bool:
    """Whether orjson can write ``value`` (not: deeper than 254 levels, an integer beyond 64 bits,
    a lone surrogate). For the rare paths only: it encodes the whole value."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def size(count: float) -> str:
    """``16777216`` -> ``16 MiB``: byte counts as people read them."""
    for unit in ("bytes", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "bytes" or count == int(count) else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} GiB"
