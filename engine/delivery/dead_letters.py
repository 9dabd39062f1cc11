"""The dead-letter file: every input event that did not become (only) valid Topsort events.

One NDJSON line per input event::

    {"at": "2026-11-28T00:40:00Z", "stage": "decode" | "map" | "deliver",
     "origin": "events.ndjson", "line": 7, "messageId": "m-1",
     "rejected": [{"rule": ..., "path": ..., "reason": ..., "item": ...}],
     "event": {...original Segment event...}}          # or "raw": "<the undecodable line>"

Lines are written whole and flushed at once, so a crash never leaves half a record.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from ..limits import encodable
from ..outcome import Outcome
from ..record import Record

Stage = Literal["decode", "map", "deliver"]


def dead_letter(
    *,
    stage: Stage,
    rejected: Sequence[dict[str, Any]],
    event: Any = None,
    raw: bytes | None = None,
    origin: str | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """Build one dead-letter record (see the module docstring for its shape)."""
    record: dict[str, Any] = {
        "at": now(),
        "stage": stage,
        "origin": origin,
        "line": line,
        "messageId": event.get("messageId") if isinstance(event, dict) else None,
        "rejected": list(rejected),
    }
    if raw is not None and (event is None or not encodable([event])):  # one level down, as in the record
        record["raw"] = raw.decode("utf-8", "replace")  # what orjson cannot write again is kept as read
    else:
        record["event"] = event
    return record


def now() -> str:
    """The time of a dead letter (``at``): UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def rejected_input(record: Record, outcome: Outcome) -> dict[str, Any]:
    """The dead-letter record of an input line whose outcome holds rejections (decode or map)."""
    return dead_letter(
        stage="decode" if record.error else "map",
        rejected=[r.to_dict() for r in outcome.rejected],
        event=record.event,
        raw=record.raw,
        origin=record.origin,
        line=record.line,
    )


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
