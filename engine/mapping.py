"""The map stage as the pipeline sees it: input records in, what each became out, in bytes.

A :class:`Mapper` takes the records of one slice of input and gives back, in order, one
:class:`Mapped` per record: its verdict, its Topsort events already encoded, its rejections, and
its dead-letter record already encoded. Everything downstream of mapping (the spool, the tally,
the dead letters, ``map``'s output) reads only ``Mapped`` values, so the same stage can run here
(:class:`InProcessMapper`) or in worker processes that send nothing but these bytes back
(:class:`engine.workers.PoolMapper`).

Records may come *undecoded* (raw bytes only, see :class:`~engine.record.Record`): the mapper
decodes them, so decoding runs where mapping does. Sources that expand batch bodies
(``{"batch": [...]}``, one line, many events) do so themselves and hand over one record per event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

import orjson

from .engine import Engine
from .outcome import Emitted, Kind, Rejection, rejected_input
from .record import Record, decode


class MappedEvent(NamedTuple):
    """One Topsort event a rule made: ``body`` is its JSON encoding, ``id`` its ``id`` field."""

    kind: Kind
    rule: str
    id: str
    body: bytes


class Mapped(NamedTuple):
    """What one input record became (see :attr:`engine.outcome.Outcome.verdict`)."""

    message_id: str | None
    verdict: str
    events: tuple[MappedEvent, ...]
    rejected: tuple[Rejection, ...]
    dead_letter: bytes | None
    """The encoded dead-letter record (stage ``decode`` or ``map``) when anything was rejected."""


def encode_events(emitted: Iterable[Emitted]) -> tuple[MappedEvent, ...]:
    """Topsort events as the map stage hands them on: each with its JSON encoding."""
    return tuple(MappedEvent(e.kind, e.rule, str(e.event["id"]), orjson.dumps(e.event)) for e in emitted)


class Mapper(Protocol):
    """Maps slices of input; ``map`` returns one :class:`Mapped` per record, in order."""

    def map(self, records: Sequence[Record]) -> list[Mapped]: ...

    def stream(self, records: Iterable[Record]) -> Iterator[tuple[Record, Mapped]]:
        """Each record of an unbounded stream with what it became, in order, mapping ahead."""
        ...

    def close(self) -> None: ...


class InProcessMapper:
    """The map stage in this process: :meth:`Engine.process_record` and encoding, record by record."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def map(self, records: Sequence[Record]) -> list[Mapped]:
        return [self.map_one(record) for record in records]

    def stream(self, records: Iterable[Record]) -> Iterator[tuple[Record, Mapped]]:
        for record in records:
            yield record, self.map_one(record)

    def close(self) -> None:
        """Nothing to release in this process."""

    def map_one(self, record: Record) -> Mapped:
        """What one record (decoded or not) became."""
        record = decode(record)
        outcome = self.engine.process_record(record)
        events = encode_events(outcome.emitted)
        dead = orjson.dumps(rejected_input(record, outcome)) if outcome.rejected else None
        return Mapped(outcome.message_id, outcome.verdict, events, outcome.rejected, dead)
