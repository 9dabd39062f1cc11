"""Read Segment events from NDJSON files or stdin, one record per non-blank line, streaming."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

STDIN = "-"


@dataclass(frozen=True, slots=True)
class Record:
    """One input line: the decoded event, or why it could not be decoded."""

    origin: str
    line: int
    raw: bytes
    event: Any = None
    error: str | None = None


def read_records(sources: Iterable[str | Path]) -> Iterator[Record]:
    """Yield a :class:`Record` per non-blank line of each source (a path, or ``-`` for stdin)."""
    for source in sources:
        name = str(source)
        if name == STDIN:
            yield from _read_stream(sys.stdin.buffer, name)
        else:
            with open(name, "rb") as stream:
                yield from _read_stream(stream, name)


def decode_line(origin: str, line: int, raw: bytes) -> Record:
    """The record of one (stripped, non-blank) input line."""
    try:
        return Record(origin, line, raw, event=orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        return Record(origin, line, raw, error=f"{origin}:{line}: not valid JSON: {exc}")


def _read_stream(stream: BinaryIO, origin: str) -> Iterator[Record]:
    for number, raw in enumerate(stream, start=1):
        raw = raw.strip()
        if raw:
            yield decode_line(origin, number, raw)
