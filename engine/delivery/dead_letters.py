"""The dead-letter file: every input event that did not become (only) valid Topsort events.

One NDJSON line per input event::

    {"at": "2026-11-28T00:40:00Z", "stage": "decode" | "map" | "deliver",
     "origin": "events.ndjson", "line": 7, "messageId": "m-1",
     "rejected": [{"rule": ..., "path": ..., "reason": ..., "item": ...}],
     "event": {...original Segment event...}}          # or "raw": "<the undecodable line>"

Lines are written whole and flushed at once, so a crash never leaves half a record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..outcome import dead_letter, now, rejected_input

__all__ = ["DeadLetterFile", "dead_letter", "now", "read_dead_letters", "rejected_input", "undelivered_input"]


def undelivered_input(stored: dict[str, Any]) -> dict[str, Any]:
    """The ``deliver`` dead-letter record of an input whose events all failed, from what the spool
    stored when it settled them (``at``, ``origin``, ``line``, ``raw`` and ``failures``); any
    other stored record is already whole, and is returned as it is."""
    if stored.get("stage") != "deliver" or "failures" not in stored:
        return stored
    record = dead_letter(stage="deliver", rejected=stored["failures"], event=orjson.loads(stored["raw"]),
                         origin=stored["origin"], line=stored["line"])
    record["at"] = stored["at"]
    return record

class DeadLetterFile:
    """Appends dead-letter records to an NDJSON file (created on first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stream: BinaryIO | None = None
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        self.write_encoded(orjson.dumps(record))

    def write_encoded(self, record: bytes) -> None:
        """Append one dead-letter record already encoded (e.g. :attr:`engine.mapping.Mapped.dead_letter`)."""
        if self._stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self.path, "ab")
        self._stream.write(record + b"\n")
        self._stream.flush()
        self.written += 1

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> DeadLetterFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_dead_letters(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a dead-letter file, in order."""
    with open(path, "rb") as stream:
        for raw in stream:
            if raw.strip():
                yield orjson.loads(raw)
