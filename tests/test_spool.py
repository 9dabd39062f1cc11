"""The durable spool: atomic chunks, settlement, one dead letter per input, exactly-once export."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.delivery.dead_letters import read_dead_letters
from engine.outcome import Emitted
from engine.record import Record
from engine.delivery.spool import Checkpoint, Chunk, Spool, SpoolError

from .conftest import spool_emitted


def _record(line: int) -> Record:
    event = {"type": "track", "event": "Product List Viewed", "messageId": f"m-{line}"}
    return Record("events.ndjson", line, orjson.dumps(event), event=event)


def _impression(event_id: str) -> Emitted:
    event = {"id": event_id, "occurredAt": "2026-11-27T10:00:00Z", "opaqueUserId": "u-1"}
    return Emitted("impressions", "product-list-viewed", event)


def _why(reason: str) -> dict[str, Any]:
    return {"rule": "product-list-viewed", "path": "$", "reason": reason, "item": None}


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool.db") as spool:
        yield spool


def test_a_chunk_is_stored_with_its_checkpoint(spool: Spool) -> None:
    chunk = Chunk()
    spool_emitted(chunk, _record(1), [_impression("m-1-0"), _impression("m-1-1")])
    spool_emitted(chunk, _record(2), [])  # skipped events leave nothing but the checkpoint
    chunk.checkpoint("/data/events.ndjson", Checkpoint(120, 2, b"{"))
    spool.commit(chunk)

    assert spool.unsent == 2
    assert [row.event_id for row in spool.unsent_after(0, 10)] == ["m-1-0", "m-1-1"]
    assert orjson.loads(spool.unsent_after(0, 10)[0].body)["id"] == "m-1-0"
    assert spool.checkpoint("/data/events.ndjson") == Checkpoint(120, 2, b"{")
    assert spool.checkpoint("/data/other.ndjson") is None


def test_a_failed_commit_stores_nothing(spool: Spool) -> None:
    chunk = Chunk()
    spool_emitted(chunk, _record(1), [_impression("m-1-0")])
    chunk.encoded_dead_letters.append(b'{"stage": "map"}')
    chunk.checkpoint("/data/events.ndjson", Checkpoint(60, 1))
    chunk.checkpoint("/data/other.ndjson", Checkpoint({"not": "storable"}, 1))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        spool.commit(chunk)

    assert spool.unsent == 0
    assert spool.unsent_after(0, 10) == []
    assert spool.checkpoint("/data/events.ndjson") is None
    assert spool.take_dead_letters(lambda records: None) == 0


def test_an_input_becomes_one_dead_letter_once_all_its_events_are_settled(spool: Spool, tmp_path: Path) -> None:
    chunk = Chunk()
    spool_emitted(chunk, _record(7), [_impression("a"), _impression("b"), _impression("c")])
    spool.commit(chunk)
    a, b, c = spool.unsent_after(0, 10)

    assert spool.settle([a], [(b, _why("resolved_bid_id_not_found: nope"))]) == 0  # c still on its way
    assert [row.event_id for row in spool.unsent_after(0, 10)] == ["c"]
    assert spool.settle([], [(c, _why("undeliverable after 3 attempt(s)"))]) == 1
    assert spool.unsent == 0

    out = tmp_path / "dead.ndjson"
    assert spool.export_dead_letters(out) == 1
    [letter] = read_dead_letters(out)
    assert letter["stage"] == "deliver"
    assert (letter["origin"], letter["line"], letter["messageId"]) == ("events.ndjson", 7, "m-7")
    assert letter["event"] == _record(7).event
    assert [r["reason"] for r in letter["rejected"]] == [
        "resolved_bid_id_not_found: nope",
        "undeliverable after 3 attempt(s)",
    ]


def test_delivered_inputs_leave_the_spool(spool: Spool, tmp_path: Path) -> None:
    chunk = Chunk()
    for line in range(1, 4):
        spool_emitted(chunk, _record(line), [_impression(f"m-{line}")])
    spool.commit(chunk)
    assert spool.settle(spool.unsent_after(0, 10), []) == 0
    assert spool.unsent == 0
    assert spool.export_dead_letters(tmp_path / "dead.ndjson") == 0
    assert not (tmp_path / "dead.ndjson").exists()


def test_dead_letters_are_exported_exactly_once(spool: Spool, tmp_path: Path) -> None:
    out = tmp_path / "dead.ndjson"
    out.write_bytes(b'{"kept": "a line written by someone else"}\n')
    for line in (1, 2):
        chunk = Chunk()
        chunk.encoded_dead_letters.append(orjson.dumps({"stage": "map", "line": line}))
        spool.commit(chunk)
        assert spool.export_dead_letters(out) == 1
    assert spool.export_dead_letters(out) == 0
    assert [r.get("line") for r in read_dead_letters(out)] == [None, 1, 2]


def test_an_export_cut_short_is_redone_without_duplicates(spool: Spool, tmp_path: Path) -> None:
    """A crash after writing the file but before the spool forgot the records: cut back, redo."""
    out = tmp_path / "dead.ndjson"
    out.write_bytes(b'{"line": 0}\n')
    chunk = Chunk()
    chunk.encoded_dead_letters.append(orjson.dumps({"stage": "map", "line": 1}))
    chunk.encoded_dead_letters.append(orjson.dumps({"stage": "map", "line": 2}))
    spool.commit(chunk)
    # What an export killed midway leaves: its start recorded, part of its lines written.
    spool._db.execute("INSERT INTO exports VALUES (?, ?)", (str(out.resolve()), out.stat().st_size))
    with open(out, "ab") as stream:
        stream.write(b'{"stage": "map", "line": 1}\n{"stage": "ma')

    assert spool.export_dead_letters(out) == 2
    assert [r["line"] for r in read_dead_letters(out)] == [0, 1, 2]


def test_state_survives_reopening(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        chunk = Chunk()
        spool_emitted(chunk, _record(1), [_impression("m-1")])
        chunk.checkpoint("src", Checkpoint(10, 1))
        spool.commit(chunk)
    with Spool(tmp_path / "spool.db") as spool:
        assert spool.unsent == 1
        assert spool.checkpoint("src") == Checkpoint(10, 1)
        chunk = Chunk()
        spool_emitted(chunk, _record(2), [_impression("m-2")])
        spool.commit(chunk)
        assert [(r.chunk, r.event_id) for r in spool.unsent_after(0, 10)] == [(1, "m-1"), (2, "m-2")]


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db"):
        with pytest.raises(SpoolError, match="in use by another run"):
            Spool(tmp_path / "spool.db")


def test_not_a_spool(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello, this is not a database\n" * 100)
    with pytest.raises(SpoolError, match="not a spool"):
        Spool(tmp_path / "notes.txt")


def test_settled_events_stay_settled_after_reopening(tmp_path: Path) -> None:
    """A chunk's progress is kept with it: what was settled is not sent again, a failure waits for
    its siblings, and the dead letter is made once, when the last of them settles."""
    told: list[list[tuple[str | None, int | None]]] = []
    with Spool(tmp_path / "spool.db") as spool:
        chunk = Chunk()
        spool_emitted(chunk, _record(1), [_impression("a"), _impression("b")])
        spool_emitted(chunk, _record(2), [_impression("c")])
        spool.commit(chunk)
        a, b, c = spool.unsent_after(0, 10)
        assert spool.settle([c], [(a, _why("refused"))]) == 0
    with Spool(tmp_path / "spool.db", on_settled=told.append) as spool:
        assert spool.unsent == 1
        [b] = spool.unsent_after(0, 10)
        assert b.event_id == "b"
        assert spool.settle([b], []) == 1
        assert told == [[("events.ndjson", 1)]]
        assert spool.settle([b, c], []) == 0 and len(told) == 1  # settled before: nothing happens again
        assert spool.unsent == 0 and spool.unsent_after(0, 10) == []
        out = tmp_path / "dead.ndjson"
        assert spool.export_dead_letters(out) == 1
    [letter] = read_dead_letters(out)
    assert (letter["line"], [r["reason"] for r in letter["rejected"]]) == (1, ["refused"])
    with Spool(tmp_path / "spool.db") as spool:
        for table in ("chunks", "progress", "failures"):
            assert spool._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


def test_delivery_reads_whole_chunks_in_order(spool: Spool) -> None:
    for first in (1, 4):
        chunk = Chunk()
        for line in range(first, first + 3):
            spool_emitted(chunk, _record(line), [_impression(f"m-{line}")])
        spool.commit(chunk)
    assert [r.event_id for r in spool.unsent_after(0, 2)] == ["m-1", "m-2", "m-3"]
    assert [r.event_id for r in spool.unsent_after(1, 2)] == ["m-4", "m-5", "m-6"]
    assert [r.event_id for r in spool.unsent_after(0, 4)] == [f"m-{n}" for n in range(1, 7)]
    assert spool.unsent_after(2, 1) == []


_OLD_SCHEMA = """
CREATE TABLE inputs (id INTEGER PRIMARY KEY, origin TEXT, line INTEGER, raw BLOB NOT NULL);
CREATE TABLE pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, input_id INTEGER NOT NULL, kind TEXT NOT NULL,
    rule TEXT NOT NULL, event_id TEXT NOT NULL, body BLOB NOT NULL, failure BLOB);
CREATE INDEX pending_by_input ON pending (input_id);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE checkpoints (source TEXT PRIMARY KEY, offset INTEGER NOT NULL, line INTEGER NOT NULL, head BLOB NOT NULL);
"""


def test_a_spool_of_the_previous_version_is_converted_with_its_events(tmp_path: Path) -> None:
    """The previous version kept one row per input and per event: its events, failures, dead letters
    and checkpoints are all there after opening it."""
    path = tmp_path / "old.spool"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
        db.executemany("INSERT INTO inputs VALUES (?, ?, ?, ?)",
                       [(3, "events.ndjson", 3, _record(3).raw), (4, "events.ndjson", 4, _record(4).raw)])
        db.executemany(
            "INSERT INTO pending (input_id, kind, rule, event_id, body, failure) VALUES (?, ?, ?, ?, ?, ?)",
            [(3, "impressions", "product-list-viewed", "x", b'{"id":"x"}', orjson.dumps(_why("bad x"))),
             (3, "impressions", "product-list-viewed", "y", b'{"id":"y"}', None),
             (4, "clicks", "product-clicked", "z", b'{"id":"z"}', None)])
        db.execute("INSERT INTO dead_letters (record) VALUES (?)", (b'{"stage": "map", "line": 2}',))
        db.execute("INSERT INTO checkpoints VALUES ('src', 300, 4, x'7b')")
    db.close()
    told: list[list[tuple[str | None, int | None]]] = []
    with Spool(path, on_settled=told.append) as spool:
        assert spool.unsent == 2
        assert spool.checkpoint("src") == Checkpoint(300, 4, b"{")
        y, z = spool.unsent_after(0, 10)
        assert [(r.kind, r.event_id, r.body) for r in (y, z)] == [
            ("impressions", "y", b'{"id":"y"}'), ("clicks", "z", b'{"id":"z"}')]
        assert spool.settle([y, z], []) == 1
        assert sorted(told[0]) == [("events.ndjson", 3), ("events.ndjson", 4)]
        out = tmp_path / "dead.ndjson"
        assert spool.export_dead_letters(out) == 2
        tables = {name for (name,) in spool._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    old, deliver = read_dead_letters(out)
    assert old == {"stage": "map", "line": 2}
    assert (deliver["stage"], deliver["line"], deliver["messageId"]) == ("deliver", 3, "m-3")
    assert [r["reason"] for r in deliver["rejected"]] == ["bad x"]
    assert not tables & {"inputs", "pending"}


_WORKER = """
import os, random, signal, sys, threading
from engine.delivery.spool import Checkpoint, Chunk, Spool
from engine.mapping import Mapped, MappedEvent
from engine.record import Record

path, inputs, per_chunk, dies_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
with Spool(path) as spool:
    if dies_after:  # counted from here, past the start-up: the instant falls among commits and settlements
        threading.Timer(dies_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
    done = spool.checkpoint("src")
    line = done.line if done else 0
    while True:
        if line < inputs:
            chunk = Chunk()
            for line in range(line + 1, min(line + per_chunk, inputs) + 1):
                raw = b'{"messageId": "m-%d"}' % line
                events = tuple(MappedEvent("impressions", "r", f"{line}-{n}", b'{"id": "%d-%d"}' % (line, n))
                               for n in range(line % 3 + 1))
                chunk.add_mapped(Record("events", line, raw), Mapped(None, "emitted", events, (), None))
            chunk.checkpoint("src", Checkpoint(line, line))
            spool.commit(chunk)
        rows = spool.unsent_after(0, 10_000)
        if not rows and line >= inputs:
            break
        random.shuffle(rows)
        while rows:
            size = random.randint(1, 200)
            part, rows = rows[:size], rows[size:]
            failed = [(r, {"reason": f"refused {r.event_id}"}) for r in part if r.event_id.endswith("-1")]
            spool.settle([r for r in part if not r.event_id.endswith("-1")], failed)
"""


def test_a_spool_killed_at_any_instant_ends_every_input_once(tmp_path: Path) -> None:
    """Commit and settle in a process killed again and again at random instants: each input ends once,
    and an input with a refused event becomes one dead letter listing every refusal."""
    path, inputs = tmp_path / "spool.db", 60_000
    command = [sys.executable, "-c", _WORKER, str(path), str(inputs), "29"]
    rng, kills = random.Random(13), 0
    for dies_after in [rng.uniform(0.01, 0.25) for _ in range(8)] + [0]:
        worker = subprocess.run([*command, str(dies_after)], cwd=Path(__file__).resolve().parents[1], timeout=120)
        kills += worker.returncode == -signal.SIGKILL
        if worker.returncode == 0:
            break
    assert worker.returncode == 0 and kills >= 3
    out = tmp_path / "dead.ndjson"
    with Spool(path) as spool:
        assert spool.unsent == 0
        spool.export_dead_letters(out)
        for table in ("chunks", "progress", "failures"):
            assert spool._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    letters = list(read_dead_letters(out))
    assert sorted(letter["line"] for letter in letters) == [n for n in range(1, inputs + 1) if n % 3]
    assert all([r["reason"] for r in letter["rejected"]] == [f"refused {letter['line']}-1"] for letter in letters)
