"""The one pipeline as a library uses it: a source's records mapped through a Mapper, counted, packed
into spool chunks with their checkpoint, and delivered by the dispatcher (``httpx.MockTransport``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import orjson

from engine import Engine
from engine.delivery.pipeline import DeliveryTarget, MapStep, Pipeline, Source, deliver
from engine.delivery.spool import Spool
from engine.ingest.files import read_source
from engine.mapping import InProcessMapper
from engine.reports.summary import Tally

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "events.ndjson"


@pytest.mark.parametrize("blocks", [False, True])
def test_a_source_goes_through_map_tally_spool_and_dispatch(tmp_path: Path, blocks: bool) -> None:
    posted: list[dict[str, list[dict[str, object]]]] = []

    def topsort(request: httpx.Request) -> httpx.Response:
        posted.append(orjson.loads(request.content))
        return httpx.Response(204)

    events = tmp_path / "events.ndjson"
    events.write_bytes(EXAMPLES.read_bytes() + b"{not json\n")
    tally = Tally()
    pipeline = Pipeline(MapStep(InProcessMapper(Engine.from_folders()), tally))
    target = DeliveryTarget("https://api.topsort.test", "sk_test_pipeline", max_latency=0.01)
    key = str(events)
    with Spool(tmp_path / "spool.db") as spool:
        dispatcher = target.dispatcher(spool, transport=httpx.MockTransport(topsort))
        stats = deliver(dispatcher, pipeline.chunks([Source(key, key, read_source(key, decoded=not blocks, blocks=blocks))]))

        delivered = [event["id"] for body in posted for events in body.values() for event in events]
        assert stats.delivered == len(delivered) == sum(tally.emitted.values()) > 0
        assert len(set(delivered)) == len(delivered)
        assert pipeline.read == tally.read == len(events.read_bytes().splitlines())
        assert tally.events["rejected"] >= 1                       # the line that is not JSON
        kept = spool.take_dead_letters(lambda records: None)
        assert kept == tally.events["rejected"] + tally.events["partly rejected"]
        assert spool.checkpoint(key) is not None and spool.checkpoint(key).line == pipeline.read
        assert spool.unsent == 0
