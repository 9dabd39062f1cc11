"""Lines of NDJSON into records: one per event, a batch line (``{"batch": [...]}``) one per event of it.

A source reads lines (:mod:`engine.ingest.files`) and turns each into records here; or, for the map
stage to do it where mapping runs (perhaps in a worker process), it hands over a :class:`LineBlock`,
whole lines as read, which :func:`block_records` turns into the same records, line limits and all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import orjson

from .limits import KEPT_BYTES, size, too_deep
from .record import Record, decode, too_deep_reason


class LineBlock(NamedTuple):
    """Whole NDJSON lines of one source, as read (blank and over-long ones included)."""

    origin: str
    line: int
    """The number of its first line in the source."""
    data: bytes
    max_line_bytes: int
    """The longest line taken (``--max-line-bytes``); a longer one is that line's rejection."""


def block_records(block: LineBlock) -> Iterator[Record]:
    """The records of a block's lines, decoded, as :func:`line_records` and :func:`too_long` make them."""
    origin, limit = block.origin, block.max_line_bytes
    for line, raw in enumerate(block.data.split(b"\n"), start=block.line):
        if len(raw) > limit:
            yield too_long(origin, line, raw, limit)
            continue
        raw = raw.strip()
        if raw:  # decoded here, where it is mapped: no need to look for a batch without decoding
            yield from line_records(origin, line, raw)


def too_long(origin: str, line: int, raw: bytes, limit: int) -> Record:
    """The record of a line longer than ``limit`` bytes: its first KiB (as read) and why it was skipped."""
    error = f"{origin}:{line}: line longer than {size(limit)} (--max-line-bytes); skipped"
    return Record(origin, line, raw[:min(KEPT_BYTES, limit + 1)], error=error)


def undecoded(raw: bytes) -> bool:
    """Whether a (stripped, non-blank) line can be handed over undecoded: it cannot spell
    ``{"batch": ...}``, so it is one event (or none) whatever it holds."""
    return b"batch" not in raw and b"\\u" not in raw


def line_records(origin: str, line: int, raw: bytes) -> list[Record]:
    """The records of one (stripped, non-blank) line, decoded: one, or one per event of a batch line."""
    record = decode_line(origin, line, raw)
    events = batch_events(record.event)
    if events is None:
        return [record]
    return [event_record(origin, line, event) for event in events]


def decode_line(origin: str, line: int, raw: bytes) -> Record:
    """The record of one (stripped, non-blank) input line."""
    record = decode(Record(origin, line, raw), check_depth=False)
    if record.error is None and too_deep(raw) and batch_events(record.event) is None:  # a batch's events are checked one by one
        return Record(origin, line, raw, error=too_deep_reason(origin, line))
    return record


def event_record(origin: str, line: int, event: Any) -> Record:
    """The record of one event of a batch or document, re-encoded; one too deep is refused."""
    try:
        raw = orjson.dumps(event)
    except orjson.JSONEncodeError:  # deeper than orjson writes
        return Record(origin, line, b"", error=too_deep_reason(origin, line))
    if too_deep(raw):
        return Record(origin, line, raw[:KEPT_BYTES], error=too_deep_reason(origin, line))
    return Record(origin, line, raw, event=event)


def batch_events(value: Any) -> list[Any] | None:
    """The events of a Segment batch body ``{"batch": [...]}``, or None for anything else."""
    if isinstance(value, dict) and isinstance(value.get("batch"), list) and "type" not in value:
        return value["batch"]
    return None
