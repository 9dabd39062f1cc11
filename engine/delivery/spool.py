"""The durable spool between mapping and delivery: one SQLite file in WAL mode.

It holds, in one database so that every change is atomic:

* ``inputs``: each input event that emitted something, as read (its raw line), with origin and line;
* ``pending``: each Topsort event still to deliver (or given up, awaiting its siblings);
* ``dead_letters``: dead-letter records not yet exported to the NDJSON file (a ``deliver`` one as
  the parts it is made of, so that settling stores and does not build);
* ``checkpoints``: how far each input source has been read;
* ``seen_messages``: the messageIds ``serve`` committed lately (its deduplication window).

Mapped events, dead letters and the source checkpoint of one chunk of input are committed in
one transaction, so a run killed at any instant resumes exactly where it stopped. An event leaves
``pending`` only when Topsort accepted it or it is dead-lettered; when the last event of an input
is settled, the input is dropped, with one ``deliver`` dead letter if any of its events failed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .dead_letters import DeadLetterFile, now, undelivered_input
from ..errors import SpoolError
from ..outcome import Emitted, Kind

from ..record import Checkpoint, Record

if TYPE_CHECKING:
    from ..mapping import Mapped, MappedEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY,
    origin TEXT,
    line INTEGER,
    raw BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: delivery reads on from the last seq
    input_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rule TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    failure BLOB
);
CREATE INDEX IF NOT EXISTS pending_by_input ON pending (input_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT PRIMARY KEY,
    offset INTEGER NOT NULL,
    line INTEGER NOT NULL,
    head BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS exports (
    path TEXT PRIMARY KEY,
    started_at_size INTEGER
);
CREATE TABLE IF NOT EXISTS seen_messages (
    message_id TEXT PRIMARY KEY,
    seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_messages_by_time ON seen_messages (seen_at);
"""


class Spooled(NamedTuple):
    """One Topsort event waiting in the spool; ``body`` is its JSON encoding."""

    seq: int
    input_id: int
    kind: Kind
    rule: str
    event_id: str
    body: bytes


@dataclass(slots=True)
class Chunk:
    """What one slice of input produced; :meth:`Spool.commit` stores it in one transaction."""

    inputs: list[tuple[Record, Sequence[Emitted]]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    seen: list[tuple[str, float]] = field(default_factory=list)
    """``(messageId, wall-clock time)`` of the inputs taken, remembered in the same transaction."""
    encoded: list[tuple[Record, Sequence[MappedEvent]]] = field(default_factory=list)
    """Inputs with their events already encoded (:meth:`add_mapped`)."""
    encoded_dead_letters: list[bytes] = field(default_factory=list)

    def add_mapped(self, record: Record, mapped: Mapped, *, dead_letter: bool = True) -> None:
        """Spool what ``record`` became, as the map stage encoded it: its events, and its dead
        letter unless ``dead_letter`` is False (a caller that sends dead letters elsewhere)."""
        if dead_letter and mapped.dead_letter is not None:
            self.encoded_dead_letters.append(mapped.dead_letter)
        if mapped.events:
            self.encoded.append((record, mapped.events))

    def add(self, record: Record, emitted: Sequence[Emitted]) -> None:
        """Spool the events ``record`` emitted."""
        if emitted:
            self.inputs.append((record, emitted))

    def dead_letter(self, record: dict[str, Any]) -> None:
        """Keep a dead-letter record (see :func:`engine.delivery.dead_letters.dead_letter`)."""
        self.dead_letters.append(record)

    def checkpoint(self, source: str, checkpoint: Checkpoint) -> None:
        """Record how far ``source`` has been read."""
        self.checkpoints[source] = checkpoint


Settled = Callable[[list[tuple[str | None, int | None]]], None]
"""Told the ``(origin, line)`` of the inputs that left the spool in one settlement."""


class Spool:
    """A spool file, held exclusively by one process while open.

    ``on_settled``, when given, is called after each settlement that made inputs leave the
    spool (every event delivered, or the input dead-lettered), with their origin and line.
    """

    def __init__(self, path: str | Path, *, on_settled: Settled | None = None) -> None:
        self.path = Path(path)
        self._on_settled = on_settled
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise SpoolError(f"spool {self.path} is in use by another run") from exc
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise SpoolError(f"{self.path} is not a spool file: {exc}") from exc
        self._next_input = self._scalar("SELECT COALESCE(MAX(id), 0) FROM inputs") + 1
        self.unsent = self._scalar("SELECT COUNT(*) FROM pending WHERE failure IS NULL")
        """How many events wait for delivery (kept in memory; the process holds the spool alone)."""

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ingest ---------------------------------------------------------------------------------

    def checkpoint(self, source: str) -> Checkpoint | None:
        """Where reading ``source`` stopped last time, if it was read before."""
        row = self._db.execute(
            "SELECT offset, line, head FROM checkpoints WHERE source = ?", (source,)
        ).fetchone()
        return Checkpoint(*row) if row else None

    def commit(self, chunk: Chunk) -> None:
        """Store a chunk: its events, its dead letters and its checkpoints, all or nothing."""
        inputs, pending = [], []
        input_id = self._next_input
        for record, emitted in chunk.inputs:
            inputs.append((input_id, record.origin, record.line, record.raw))
            pending.extend(
                (input_id, e.kind, e.rule, str(e.event["id"]), orjson.dumps(e.event))
                for e in emitted
            )
            input_id += 1
        for record, events in chunk.encoded:
            inputs.append((input_id, record.origin, record.line, record.raw))
            pending.extend((input_id, e.kind, e.rule, e.id, e.body) for e in events)
            input_id += 1
        with self._transaction():
            self._db.executemany("INSERT INTO inputs VALUES (?, ?, ?, ?)", inputs)
            self._db.executemany(
                "INSERT INTO pending (input_id, kind, rule, event_id, body) VALUES (?, ?, ?, ?, ?)",
                pending,
            )
            self._db.executemany(
                "INSERT INTO dead_letters (record) VALUES (?)",
                [(orjson.dumps(r),) for r in chunk.dead_letters] + [(r,) for r in chunk.encoded_dead_letters],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                [(source, c.offset, c.line, c.head) for source, c in chunk.checkpoints.items()],
            )
            self._db.executemany("INSERT OR REPLACE INTO seen_messages VALUES (?, ?)", chunk.seen)
        self._next_input = input_id
        self.unsent += len(pending)

    # -- delivery -------------------------------------------------------------------------------

    def unsent_after(self, seq: int, limit: int) -> list[Spooled]:
        """Up to ``limit`` events waiting for delivery, in spool order, after position ``seq``."""
        rows = self._db.execute(
            "SELECT seq, input_id, kind, rule, event_id, body FROM pending"
            " WHERE seq > ? AND failure IS NULL ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return list(map(Spooled._make, rows))

    def settle(
        self, delivered: Sequence[Spooled], failed: Sequence[tuple[Spooled, dict[str, Any]]]
    ) -> int:
        """Drop delivered events; keep why failed ones failed. Return the dead letters made.

        ``failed`` pairs an event with its rejection (``rule``, ``path``, ``reason``, ...). An
        input whose events are all settled leaves the spool, with one ``deliver`` dead letter
        listing its failed events, if any.
        """
        if not delivered and not failed:
            return 0
        touched = orjson.dumps(sorted({s.input_id for s in (*delivered, *(f for f, _ in failed))}))
        with self._transaction():
            before = self._positions(touched) if self._on_settled else {}
            self._db.execute(
                "DELETE FROM pending WHERE seq IN (SELECT value FROM json_each(?))",
                (orjson.dumps([s.seq for s in delivered]),),
            )
            self._db.executemany(
                "UPDATE pending SET failure = ? WHERE seq = ?",
                [(orjson.dumps(why), s.seq) for s, why in failed],
            )
            self._db.execute(
                "DELETE FROM inputs WHERE id IN (SELECT value FROM json_each(?))"
                " AND NOT EXISTS (SELECT 1 FROM pending WHERE input_id = inputs.id)",
                (touched,),
            )
            made = self._dead_letter_settled(touched)
            left = [before[i] for i in before.keys() - self._positions(touched).keys()]
        self.unsent -= len(delivered) + len(failed)
        if left and self._on_settled:
            self._on_settled(left)
        return made

    def _positions(self, ids: bytes) -> dict[int, tuple[str | None, int | None]]:
        rows = self._db.execute(
            "SELECT id, origin, line FROM inputs WHERE id IN (SELECT value FROM json_each(?))", (ids,)
        )
        return {input_id: (origin, line) for input_id, origin, line in rows}

    def _dead_letter_settled(self, touched: bytes) -> int:
        """Keep, for each input whose events all failed, what its ``deliver`` dead letter needs (built
        when exported: :func:`~engine.delivery.dead_letters.undelivered_input`), and drop the input."""
        done = orjson.dumps([input_id for (input_id,) in self._db.execute(
            "SELECT input_id FROM pending WHERE input_id IN (SELECT value FROM json_each(?))"
            " GROUP BY input_id HAVING COUNT(failure) = COUNT(*)",
            (touched,),
        )])
        if done == b"[]":
            return 0
        made = self._db.execute(
            "INSERT INTO dead_letters (record) SELECT json_object('at', ?, 'stage', 'deliver', 'origin', origin,"
            " 'line', line, 'raw', CAST(raw AS TEXT), 'failures', (SELECT json_group_array(json(why)) FROM"
            " (SELECT CAST(failure AS TEXT) AS why FROM pending WHERE input_id = inputs.id ORDER BY seq)))"
            " FROM inputs WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (now(), done),
        ).rowcount
        self._db.execute("DELETE FROM pending WHERE input_id IN (SELECT value FROM json_each(?))", (done,))
        self._db.execute("DELETE FROM inputs WHERE id IN (SELECT value FROM json_each(?))", (done,))
        return made

    # -- dead letters ---------------------------------------------------------------------------

    def export_dead_letters(self, path: str | Path) -> int:
        """Append the dead letters not yet exported to the NDJSON file ``path``; return how many.

        Exactly once, even if the process dies mid-export: the file size before writing is
        committed first, and an export found unfinished is cut back to it and done again.
        """
        path = Path(path).resolve()
        key = str(path)
        row = self._db.execute(
            "SELECT started_at_size FROM exports WHERE path = ?", (key,)
        ).fetchone()
        if row and row[0] is not None and path.exists() and path.stat().st_size > row[0]:
            with open(path, "r+b") as stream:
                stream.truncate(row[0])
        records = self._db.execute("SELECT id, record FROM dead_letters ORDER BY id").fetchall()
        if not records:
            return 0
        size = path.stat().st_size if path.exists() else 0
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO exports VALUES (?, ?)", (key, size))
        with DeadLetterFile(path) as out:
            for _, record in records:
                out.write(undelivered_input(orjson.loads(record)))
        with self._transaction():
            self._db.execute("DELETE FROM dead_letters WHERE id <= ?", (records[-1][0],))
            self._db.execute("UPDATE exports SET started_at_size = NULL WHERE path = ?", (key,))
        return len(records)

    def take_dead_letters(self, sink: Callable[[list[dict[str, Any]]], None]) -> int:
        """Hand the dead letters kept so far to ``sink``, and drop them once it returned.

        For a sink other than a file (a Kafka topic): if ``sink`` raises, they stay for next time.
        """
        records = self._db.execute("SELECT id, record FROM dead_letters ORDER BY id").fetchall()
        if not records:
            return 0
        sink([undelivered_input(orjson.loads(record)) for _, record in records])
        with self._transaction():
            self._db.execute("DELETE FROM dead_letters WHERE id <= ?", (records[-1][0],))
        return len(records)

    # -- seen messageIds -------------------------------------------------------------------------

    def seen_messages(self) -> list[tuple[str, float]]:
        """The messageIds committed with :attr:`Chunk.seen`, oldest first."""
        return self._db.execute("SELECT message_id, seen_at FROM seen_messages ORDER BY seen_at").fetchall()

    def forget_messages(self, before: float, keep: int) -> None:
        """Forget the messageIds seen before ``before``, and all but the ``keep`` latest."""
        with self._transaction():
            self._db.execute("DELETE FROM seen_messages WHERE seen_at < ?", (before,))
            self._db.execute(
                "DELETE FROM seen_messages WHERE message_id NOT IN"
                " (SELECT message_id FROM seen_messages ORDER BY seen_at DESC LIMIT ?)",
                (keep,),
            )

    # -- helpers --------------------------------------------------------------------------------

    def _scalar(self, sql: str) -> int:
        return int(self._db.execute(sql).fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
