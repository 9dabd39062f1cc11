"""The durable spool: atomic chunks, settlement, one dead letter per input, exactly-once export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.delivery.dead_letters import read_dead_letters
from engine.outcome import Emitted
from engine.record import Record
from engine.delivery.spool import Checkpoint, Chunk, Spool, SpoolError


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
    chunk.add(_record(1), [_impression("m-1-0"), _impression("m-1-1")])
    chunk.add(_record(2), [])  # skipped events leave nothing but the checkpoint
    chunk.checkpoint("/data/events.ndjson", Checkpoint(120, 2, b"{"))
    spool.commit(chunk)

    assert spool.unsent == 2
    assert [row.event_id for row in spool.unsent_after(0, 10)] == ["m-1-0", "m-1-1"]
    assert orjson.loads(spool.unsent_after(0, 10)[0].body)["id"] == "m-1-0"
    assert spool.checkpoint("/data/events.ndjson") == Checkpoint(120, 2, b"{")
    assert spool.checkpoint("/data/other.ndjson") is None


def test_a_failed_commit_stores_nothing(spool: Spool) -> None:
    chunk = Chunk()
    chunk.add(_record(1), [_impression("m-1-0")])
    chunk.dead_letter({"cannot be encoded": {1, 2}})
    chunk.checkpoint("/data/events.ndjson", Checkpoint(60, 1))
    with pytest.raises(TypeError):
        spool.commit(chunk)

    assert spool.unsent == 0
    assert spool.unsent_after(0, 10) == []
    assert spool.checkpoint("/data/events.ndjson") is None


def test_an_input_becomes_one_dead_letter_once_all_its_events_are_settled(spool: Spool, tmp_path: Path) -> None:
    chunk = Chunk()
    chunk.add(_record(7), [_impression("a"), _impression("b"), _impression("c")])
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
        chunk.add(_record(line), [_impression(f"m-{line}")])
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
        chunk.dead_letter({"stage": "map", "line": line})
        spool.commit(chunk)
        assert spool.export_dead_letters(out) == 1
    assert spool.export_dead_letters(out) == 0
    assert [r.get("line") for r in read_dead_letters(out)] == [None, 1, 2]


def test_an_export_cut_short_is_redone_without_duplicates(spool: Spool, tmp_path: Path) -> None:
    """A crash after writing the file but before the spool forgot the records: cut back, redo."""
    out = tmp_path / "dead.ndjson"
    out.write_bytes(b'{"line": 0}\n')
    chunk = Chunk()
    chunk.dead_letter({"stage": "map", "line": 1})
    chunk.dead_letter({"stage": "map", "line": 2})
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
        chunk.add(_record(1), [_impression("m-1")])
        chunk.checkpoint("src", Checkpoint(10, 1))
        spool.commit(chunk)
    with Spool(tmp_path / "spool.db") as spool:
        assert spool.unsent == 1
        assert spool.checkpoint("src") == Checkpoint(10, 1)
        chunk = Chunk()
        chunk.add(_record(2), [_impression("m-2")])
        spool.commit(chunk)
        assert [(r.input_id, r.event_id) for r in spool.unsent_after(0, 10)] == [(1, "m-1"), (2, "m-2")]


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db"):
        with pytest.raises(SpoolError, match="in use by another run"):
            Spool(tmp_path / "spool.db")


def test_not_a_spool(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello, this is not a database\n" * 100)
    with pytest.raises(SpoolError, match="not a spool"):
        Spool(tmp_path / "notes.txt")
