"""One input event as read, before or after decoding, and how far its source was read: what every
source hands to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, NamedTuple


class Record(NamedTuple):
    """One input event: the decoded event, or why it could not be decoded.

    ``origin`` names the source (a file, ``-``, an HTTP request, a Kafka partition); ``line`` is the
    line of an NDJSON source, or the event's position in a document or request.
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
