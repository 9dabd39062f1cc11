"""The durable spool between mapping and delivery: one SQLite file in WAL mode.

It holds, in one database so that every change is atomic:

* ``chunks``: one row per committed chunk of input that emitted events, written once: its inputs
  (origin, line, raw line) and their Topsort events (kind, rule, id, JSON body) packed in a few
  columns (the raw lines last: reading the events never walks their pages);
* ``progress``: the events settled so far of a chunk partly settled (a small row, rewritten by
  each settlement that touches the chunk);
* ``failures``: why an event was given up, while its input still has events on their way;
* ``dead_letters``: dead-letter records not yet exported to the NDJSON file (a ``deliver`` one as
  the parts it is made of, so that settling stores and does not build);
* ``checkpoints``: how far each input source has been read;
* ``seen_messages``: the messageIds ``serve`` committed lately (its deduplication window).

Mapped events, dead letters and the source checkpoint of one chunk of input are committed in
one transaction, so a run killed at any instant resumes exactly where it stopped. An event is
settled when Topsort accepted it or it was given up; settling writes its chunk's progress once per
settlement, whatever the number of its events, and deletes the chunk once every event is settled. When
the last event of an input is settled, the input leaves the spool, with one ``deliver`` dead letter
if any of its events failed. Costs go per chunk and per settlement, not per event: only an event
given up has a row of its own.

A spool written by the previous version (one row per input and per event) is converted when opened.

One cohesive thing (the spool's tables and every transaction on them), hence over 350 lines.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .dead_letters import DeadLetterFile, now, undelivered_input
from ..errors import SpoolError
from ..mapping import Columns, pack_columns
from ..outcome import Kind

from ..record import Checkpoint, Record

if TYPE_CHECKING:
    from ..mapping import Mapped, MappedEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: delivery reads on from the last id
    inputs BLOB NOT NULL,   -- JSON [[origin, line, length of raw], ...]: the inputs that emitted
    events BLOB NOT NULL,   -- JSON [[input index, kind, rule, id, length of body], ...]
    bodies BLOB NOT NULL,   -- the events' JSON, one after the other
    count INTEGER NOT NULL, -- how many events
    raws BLOB NOT NULL      -- the inputs' raw lines, one after the other
);
CREATE TABLE IF NOT EXISTS progress (
    chunk INTEGER PRIMARY KEY,
    settled BLOB NOT NULL,  -- JSON [event index, ...] of the chunk's events settled
    unsent INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    chunk INTEGER NOT NULL,
    input INTEGER NOT NULL,
    event INTEGER NOT NULL,
    why BLOB NOT NULL,
    PRIMARY KEY (chunk, input, event)
) WITHOUT ROWID;
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

_FRESH_EVENTS = 50_000
"""Most events of chunks committed and not read yet kept in memory for delivery (the rest is read back)."""
_MIGRATED_INPUTS = 500
"""Inputs of an old-format spool packed into each chunk when it is converted."""

Position = tuple[str | None, int | None]
"""Where an input came from: its origin and line (or Kafka partition and offset)."""


class Spooled(NamedTuple):
    """One Topsort event waiting in the spool: the ``index`` th of chunk ``chunk``, made by the
    ``input`` th input of that chunk; ``body`` is its JSON encoding."""

    chunk: int
    index: int
    input: int
    kind: Kind
    rule: str
    event_id: str
    body: bytes


@dataclass(slots=True)
class Chunk:
    """What one slice of input produced; :meth:`Spool.commit` stores it in one transaction."""

    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    seen: list[tuple[str, float]] = field(default_factory=list)
    """``(messageId, wall-clock time)`` of the inputs taken, remembered in the same transaction."""
    encoded: list[tuple[Record, Sequence[MappedEvent]]] = field(default_factory=list)
    """Inputs with their events already encoded (:meth:`add_mapped`)."""
    encoded_dead_letters: list[bytes] = field(default_factory=list)
    columns: Columns | None = None
    """Events already packed where they were mapped (:func:`~engine.mapping.pack_columns`), instead of ``encoded``."""

    def add_mapped(self, record: Record, mapped: Mapped) -> None:
        """Spool what ``record`` became, as the map stage encoded it: its events and its dead letter."""
        if mapped.dead_letter is not None:
            self.encoded_dead_letters.append(mapped.dead_letter)
        if mapped.events:
            self.encoded.append((record, mapped.events))

    def checkpoint(self, source: str, checkpoint: Checkpoint) -> None:
        """Record how far ``source`` has been read."""
        self.checkpoints[source] = checkpoint


@dataclass(slots=True)
class _Open:
    """What settling needs of a chunk row being delivered, kept in memory while it is."""

    inputs: list[list[Any]]
    """``[origin, line, length of raw]`` of each input."""
    input_of: list[int]
    """The input of each event."""
    left: list[int]
    """Events of each input not settled yet."""
    settled: set[int]
    unsent: int
    failed: set[int]
    """Inputs with an event given up."""


Settled = Callable[[list[Position]], None]
"""Told the ``(origin, line)`` of the inputs that left the spool in one settlement."""


class Spool:
    """A spool file, held exclusively by one process while open.

    ``on_settled``, when given, is called after each settlement that made inputs leave the
    spool (every event delivered, or the input dead-lettered), with their origin and line.
    """

    def __init__(self, path: str | Path, *, on_settled: Settled | None = None) -> None:
        self.path = Path(path)
        self._on_settled = on_settled
        self._open: dict[int, _Open] = {}
        self._fresh: dict[int, Columns] = {}
        """Chunks committed by this process and not read yet, as they were packed (no need to read them back)."""
        self._fresh_events = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._db.execute("PRAGMA page_size = 16384")  # a new file only: fewer pages per chunk
            self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA secure_delete = FAST")  # Debian's default (ON) zeroes every page a settled chunk frees
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise SpoolError(f"spool {self.path} is in use by another run") from exc
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise SpoolError(f"{self.path} is not a spool file: {exc}") from exc
        self._last = self._scalar("SELECT COALESCE(MAX(id), 0) FROM chunks")
        """The last chunk stored: none is read after it."""
        self.unsent = self._scalar(
            "SELECT COALESCE(SUM(COALESCE(unsent, count)), 0) FROM chunks LEFT JOIN progress ON chunk = id")
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
        columns = chunk.columns if chunk.columns is not None else pack_columns(chunk.encoded)
        count = columns[3]
        with self._transaction():
            if count:
                row = self._db.execute(
                    "INSERT INTO chunks (inputs, events, bodies, count, raws) VALUES (?, ?, ?, ?, ?)", columns
                ).lastrowid
            if chunk.encoded_dead_letters:
                self._db.executemany(
                    "INSERT INTO dead_letters (record) VALUES (?)", [(r,) for r in chunk.encoded_dead_letters]
                )
            self._db.executemany(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                [(source, c.offset, c.line, c.head) for source, c in chunk.checkpoints.items()],
            )
            if chunk.seen:
                self._db.executemany("INSERT OR REPLACE INTO seen_messages VALUES (?, ?)", chunk.seen)
        if count:
            self._last = row
            self.unsent += count
            if self._fresh_events < _FRESH_EVENTS:
                self._fresh[row] = columns
                self._fresh_events += count

    # -- delivery -------------------------------------------------------------------------------

    def unsent_after(self, chunk: int, limit: int) -> list[Spooled]:
        """The events waiting for delivery, in spool order, of the chunks after chunk ``chunk``:
        whole chunks, until at least ``limit`` events (fewer: there are no more)."""
        spooled: list[Spooled] = []
        while len(spooled) < limit and chunk < self._last:
            row = self._db.execute("SELECT id FROM chunks WHERE id > ? ORDER BY id LIMIT 1", (chunk,)).fetchone()
            if row is None:
                break
            (chunk,) = row
            columns = self._fresh.pop(chunk, None)
            if columns is None:
                packed = self._read(chunk)
            else:
                packed = _unpacked(columns[0], columns[1], columns[2], fresh=True)
                self._fresh_events -= columns[3]
            done = (self._open.get(chunk) or self._opened(chunk, packed.inputs, packed.events, packed.fresh)).settled
            for index, ((input_index, kind, rule, event_id, _), body) in enumerate(zip(packed.events, packed.bodies)):
                if index not in done:
                    spooled.append(Spooled(chunk, index, input_index, kind, rule, event_id, body))
        return spooled

    def _read(self, chunk: int) -> _Packed:
        """A chunk row as committed (its events, bodies cut apart; not its raw lines)."""
        inputs, events, bodies = self._db.execute(
            "SELECT inputs, events, bodies FROM chunks WHERE id = ?", (chunk,)).fetchone()
        return _unpacked(inputs, events, bodies, fresh=False)

    def settle(
        self, delivered: Sequence[Spooled], failed: Sequence[tuple[Spooled, dict[str, Any]]]
    ) -> int:
        """Settle delivered events and failed ones (kept with why they failed). Return the dead
        letters made.

        ``failed`` pairs an event with its rejection (``rule``, ``path``, ``reason``, ...). An
        input whose events are all settled leaves the spool, with one ``deliver`` dead letter
        listing its failed events, if any. A touched chunk costs one small progress row (or its delete).
        """
        if not delivered and not failed:
            return 0
        touched: dict[int, tuple[list[int], dict[int, bytes]]] = {}
        for row in delivered:
            touched.setdefault(row.chunk, ([], {}))[0].append(row.index)
        for row, why in failed:
            indexes, whys = touched.setdefault(row.chunk, ([], {}))
            indexes.append(row.index)
            whys[row.index] = orjson.dumps(why)
        updated: dict[int, _Open] = {}
        failures, finished, progress = [], [], []
        completed: dict[int, list[int]] = {}
        for chunk, (indexes, whys) in touched.items():
            if (before := self._state(chunk)) is None:
                continue  # settled before: its chunk has left the spool
            state, completed[chunk] = _settled(before, indexes, whys)
            updated[chunk] = state
            failures += [(chunk, before.input_of[i], i, why) for i, why in whys.items() if i not in before.settled]
            if state.unsent:
                progress.append((chunk, orjson.dumps(sorted(state.settled)), state.unsent))
            else:
                finished.append(chunk)
        left: list[Position] = []
        made = 0
        with self._transaction():  # a few statements per settlement, whatever the chunks touched
            if failures:
                self._db.executemany("INSERT INTO failures VALUES (?, ?, ?, ?)", failures)
            for chunk, done in completed.items():
                state = updated[chunk]
                made += self._dead_letter_settled(chunk, state, done)
                left += [(state.inputs[i][0], state.inputs[i][1]) for i in done]
            if progress:
                self._db.executemany("INSERT OR REPLACE INTO progress VALUES (?, ?, ?)", progress)
            if finished:
                ids = orjson.dumps(finished)
                self._db.execute("DELETE FROM chunks WHERE id IN (SELECT value FROM json_each(?))", (ids,))
                self._db.execute("DELETE FROM progress WHERE chunk IN (SELECT value FROM json_each(?))", (ids,))
        for chunk, state in updated.items():
            self.unsent -= self._open[chunk].unsent - state.unsent
            if state.unsent:
                self._open[chunk] = state
            else:
                del self._open[chunk]
        if left and self._on_settled:
            self._on_settled(left)
        return made

    def _dead_letter_settled(self, chunk: int, state: _Open, done: list[int]) -> int:
        """Keep, for each input of ``done`` with failed events, what its ``deliver`` dead letter needs
        (built when exported: :func:`~engine.delivery.dead_letters.undelivered_input`)."""
        dead = [i for i in done if i in state.failed]
        if not dead:
            return 0
        (raws,) = self._db.execute("SELECT raws FROM chunks WHERE id = ?", (chunk,)).fetchone()
        ends = list(itertools.accumulate(length for _, _, length in state.inputs))
        at = now()
        for input_index in dead:
            origin, line, length = state.inputs[input_index]
            raw = raws[ends[input_index] - length:ends[input_index]]
            whys = [orjson.Fragment(why) for (why,) in self._db.execute(
                "SELECT why FROM failures WHERE chunk = ? AND input = ? ORDER BY event", (chunk, input_index))]
            record = {"at": at, "stage": "deliver", "origin": origin, "line": line,
                      "raw": raw.decode("utf-8", "replace"), "failures": whys}
            self._db.execute("INSERT INTO dead_letters (record) VALUES (?)", (orjson.dumps(record),))
            self._db.execute("DELETE FROM failures WHERE chunk = ? AND input = ?", (chunk, input_index))
        return len(dead)

    def _state(self, chunk: int) -> _Open | None:
        """What settling needs of chunk ``chunk`` (read from its row unless already in memory); None
        when it is no longer in the spool."""
        if (state := self._open.get(chunk)) is None:
            row = self._db.execute("SELECT inputs, events FROM chunks WHERE id = ?", (chunk,)).fetchone()
            if row is None:
                return None
            state = self._opened(chunk, orjson.loads(row[0]), orjson.loads(row[1]))
        return state

    def _opened(self, chunk: int, input_rows: list[Any], meta: Sequence[Sequence[Any]], fresh: bool = False) -> _Open:
        """Keep in memory what settling needs of a chunk; ``fresh``: committed by this process, nothing of it
        settled yet (no need to ask the file)."""
        progress = None if fresh else self._db.execute("SELECT settled FROM progress WHERE chunk = ?", (chunk,)).fetchone()
        done = set(orjson.loads(progress[0])) if progress else set()
        input_of = [event[0] for event in meta]
        left = [0] * len(input_rows)
        for index, input_index in enumerate(input_of):
            if index not in done:
                left[input_index] += 1
        failed = set() if fresh else {
            i for (i,) in self._db.execute("SELECT DISTINCT input FROM failures WHERE chunk = ?", (chunk,))}
        state = self._open[chunk] = _Open(input_rows, input_of, left, done, len(meta) - len(done), failed)
        return state

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

    def _migrate(self) -> None:
        """Convert a spool of the previous version (``inputs`` and ``pending``, one row per input and
        per event) to chunks, in one transaction: its events keep their order, ids and failures."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pending'").fetchone():
            return
        with self._transaction():
            inputs = self._db.execute(
                "SELECT id, origin, line, raw FROM inputs WHERE id IN (SELECT input_id FROM pending) ORDER BY id"
            ).fetchall()
            events: dict[int, list[tuple[str, str, str, bytes, bytes | None]]] = {}
            for input_id, kind, rule, event_id, body, failure in self._db.execute(
                "SELECT input_id, kind, rule, event_id, body, failure FROM pending ORDER BY seq"
            ):
                events.setdefault(input_id, []).append((kind, rule, event_id, bytes(body), failure))
            for start in range(0, len(inputs), _MIGRATED_INPUTS):
                part = inputs[start:start + _MIGRATED_INPUTS]
                olds = [events[input_id] for input_id, *_ in part]
                columns = pack_columns([(Record(origin, line, bytes(raw)), [e[:4] for e in old])
                                        for (_, origin, line, raw), old in zip(part, olds)])
                failed = [(number, index, why) for index, (number, why) in enumerate(
                    (number, e[4]) for number, old in enumerate(olds) for e in old) if why is not None]
                chunk = self._db.execute(
                    "INSERT INTO chunks (inputs, events, bodies, count, raws) VALUES (?, ?, ?, ?, ?)", columns
                ).lastrowid
                if failed:
                    self._db.execute("INSERT INTO progress VALUES (?, ?, ?)",
                                     (chunk, orjson.dumps([index for _, index, _ in failed]), columns[3] - len(failed)))
                self._db.executemany("INSERT INTO failures VALUES (?, ?, ?, ?)",
                                     [(chunk, number, index, why) for number, index, why in failed])
            self._db.execute("DROP TABLE pending")
            self._db.execute("DROP TABLE inputs")


class _Packed(NamedTuple):
    """A chunk as stored: ``inputs`` ``[origin, line, length of raw]``, ``events`` ``[input index, kind,
    rule, id, length of body]``, their ``bodies``; ``fresh``: committed by this process, not read back."""

    inputs: list[Any]
    events: list[Any]
    bodies: list[bytes]
    fresh: bool


def _unpacked(inputs: bytes, events: bytes, bodies: bytes, *, fresh: bool) -> _Packed:
    """The columns of a chunk (:data:`~engine.mapping.Columns`) as lists, its bodies cut apart."""
    meta = orjson.loads(events)
    ends = itertools.accumulate(event[4] for event in meta)
    starts = itertools.chain((0,), itertools.accumulate(event[4] for event in meta))
    return _Packed(orjson.loads(inputs), meta, [bodies[start:end] for start, end in zip(starts, ends)], fresh)


def _settled(state: _Open, indexes: list[int], whys: dict[int, bytes]) -> tuple[_Open, list[int]]:
    """``state`` with the events ``indexes`` settled (those in ``whys`` given up), as a copy: memory
    changes only once the transaction is committed. Also the inputs this settled completely."""
    new = set(indexes) - state.settled
    left = list(state.left)
    done = []
    for index in new:
        input_index = state.input_of[index]
        left[input_index] -= 1
        if not left[input_index]:
            done.append(input_index)
    failed = state.failed | {state.input_of[index] for index in whys if index in new}
    return _Open(state.inputs, state.input_of, left, state.settled | new, state.unsent - len(new), failed), sorted(done)
