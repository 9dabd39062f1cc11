"""The map stage's seam: what InProcessMapper gives is exactly what the engine decides, in bytes."""

from __future__ import annotations

import orjson

from engine import Engine
from engine.ingest.files import read_records
from engine.mapping import InProcessMapper

from .conftest import ROOT

ENGINE = Engine.from_folders()


def test_each_record_maps_to_its_outcome_with_events_and_dead_letter_encoded() -> None:
    records = list(read_records([ROOT / "examples" / "events.ndjson"]))
    mapped = InProcessMapper(ENGINE).map(records)
    assert len(mapped) == len(records)
    for record, result in zip(records, mapped, strict=True):
        outcome = ENGINE.process_record(record)
        assert (result.message_id, result.verdict, result.rejected) == (
            outcome.message_id, outcome.verdict, outcome.rejected)
        assert [(e.kind, e.rule, e.id, orjson.loads(e.body)) for e in result.events] == [
            (e.kind, e.rule, e.event["id"], e.event) for e in outcome.emitted]
        if outcome.rejected:
            letter = orjson.loads(result.dead_letter)
            assert (letter["origin"], letter["line"]) == (record.origin, record.line)
            assert letter["stage"] == ("decode" if record.error else "map")
            assert letter["rejected"] == [r.to_dict() for r in outcome.rejected]
        else:
            assert result.dead_letter is None
    assert {m.verdict for m in mapped} >= {"emitted", "rejected"}
