"""One input event as read, before or after decoding, and how far its source was read: what every
source hands to the pipeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from .limits import MAX_DEPTH, too_deep


class Record(NamedTuple):
    """One input event: the decoded event, or why it could not be decoded.

    ``origin`` names the source (a file, ``-``, an HTTP request, a Kafka partition); ``line`` is the
    line of an NDJSON source, or the event's position in a document or request. A record with
    neither ``event`` nor ``error`` is *undecoded*: ``raw`` is one event's JSON, for the map stage
    to decode (:func:`decode`), in a worker process when there are some.
    """

    origin: str
    line: int
    raw: bytes
    event: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far a source was read: the offset just past the last line taken, and its number.

    For a JSON document ``line`` counts the events taken. ``head`` is the source's first bytes
    (up to a few hundred), to tell the same source, perhaps grown since, from another one put
    in its place. Offsets of gzipped sources count decompressed bytes.
    """

    offset: int
    line: int
    head: bytes = b""


class SourceFault(NamedTuple):
    """A source (or the rest of one) that could not be read: damaged, unreadable, a gzip bomb.

    ``line`` is the last line read before the damage (0: none), None when the file never opened.
    """

    origin: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}:{self.line}: {self.reason}" if self.line else f"{self.origin}: {self.reason}"


OnFault = Callable[[SourceFault], None]


def decode(record: Record, *, check_depth: bool = True) -> Record:
    """``record`` with its event decoded from ``raw``, or with why it cannot be (not JSON, nested
    too deep); a record already decoded (or refused) is returned as it is."""
    if record.event is not None or record.error is not None:
        return record
    try:
        event = orjson.loads(record.raw)
    except orjson.JSONDecodeError as exc:
        return record._replace(error=f"{record.origin}:{record.line}: not valid JSON: {exc}")
    if check_depth and too_deep(record.raw):
        return record._replace(error=too_deep_reason(record.origin, record.line))
    return record._replace(event=event)


def too_deep_reason(origin: str, line: int) -> str:
    """Why an event nested deeper than any input may be is refused."""
    return f"{origin}:{line}: nested deeper than {MAX_DEPTH} levels (the limit of an event)"
