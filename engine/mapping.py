"""The map stage as the pipeline sees it: input records in, what each became out, in bytes.

A :class:`Mapper` takes the records of one slice of input and gives back, in order, one
:class:`Mapped` per record: its verdict, its Topsort events already encoded, its rejections, and
its dead-letter record already encoded. Everything downstream of mapping (the spool, the tally,
the dead letters, ``map``'s output) reads only ``Mapped`` values, so the same stage can run here
(:class:`InProcessMapper`) or in worker processes that send nothing but these bytes back
(:class:`engine.workers.PoolMapper`).

For ``map``, which needs no per-event values, only what a slice adds up to, a mapper also gives
:meth:`Mapper.summaries`: one :class:`MappedSlice` per slice of input (records, or
:class:`~engine.ndjson.LineBlock` values: whole lines, split where mapping runs), holding the
slice's counts, its dead letters, and its Topsort events as a kind code and a body each (or its
``--format outcomes`` lines), so the process writing the output does a few operations per slice
rather than per event.

For ``run``, which spools what it maps, :meth:`Mapper.packs` answers each part of the input with a
:class:`PackedSlice`: that summary and the part's spool columns already packed (:func:`pack_columns`,
the one packing of a spool chunk), so the process committing them does no work per event.

Records may come *undecoded* (raw bytes only, see :class:`~engine.record.Record`): the mapper
decodes them, so decoding runs where mapping does. Sources that expand batch bodies
(``{"batch": [...]}``, one line, many events) do so themselves and hand over one record per event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from typing import Any, NamedTuple, Protocol

import orjson

from .engine import Engine
from .ndjson import LineBlock, block_records
from .outcome import KINDS, Emitted, Kind, Rejection, rejected_input
from .record import Record, decode

KIND_CODES: dict[str, int] = {kind: code for code, kind in enumerate(KINDS)}
"""A Topsort event kind as one byte of :attr:`MappedSlice.kinds`: its place in ``KINDS``."""
SUMMARY_SLICE = 512
"""Records summed up at once by :meth:`InProcessMapper.summaries`."""


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


class MappedSlice(NamedTuple):
    """What a slice of input became, summed up as ``map`` needs it (see :func:`summarize`)."""

    verdicts: Counter[str]
    reasons: Counter[tuple[str, str]]
    """Rejections by :meth:`~engine.outcome.Rejection.summary_key`, in the order first met."""
    kinds: bytes
    """The kind of each Topsort event made, in order, as its :data:`KIND_CODES` byte."""
    bodies: list[bytes]
    """The encoding of each Topsort event made, in order (empty with ``outcome_lines``)."""
    dead_letters: list[bytes]
    outcome_lines: bytes
    """``map --format outcomes``' lines of the slice's events, each ending in a newline (when asked)."""


def summarize(mapped: Iterable[tuple[Record, Mapped]], outcome_lines: bool = False, bodies: bool = True) -> MappedSlice:
    """Sum up what the records of a slice became; with ``outcome_lines``, their outcome lines
    (:func:`outcome_line`) instead of the events' bodies; without ``bodies``, neither."""
    verdicts: Counter[str] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    kinds = bytearray()
    encoded: list[bytes] = []
    dead_letters: list[bytes] = []
    lines: list[bytes] = []
    codes = KIND_CODES
    for record, one in mapped:
        verdicts[one.verdict] += 1
        if one.rejected:
            reasons.update([rejection.summary_key() for rejection in one.rejected])
            if one.dead_letter is not None:
                dead_letters.append(one.dead_letter)
        for event in one.events:
            kinds.append(codes[event.kind])
            encoded.append(event.body)
        if outcome_lines:
            lines.append(orjson.dumps(outcome_line(record, one)) + b"\n")
    kept = encoded if bodies and not outcome_lines else []
    return MappedSlice(verdicts, reasons, bytes(kinds), kept, dead_letters, b"".join(lines))


Columns = tuple[bytes, bytes, bytes, int, bytes]
"""A chunk of the spool as stored (see :mod:`engine.delivery.spool`): ``inputs`` (JSON ``[[origin, line,
length of raw], ...]`` of the inputs that emitted), ``events`` (JSON ``[[input index, kind, rule, id, length
of body], ...]``), ``bodies`` (the events' JSON, one after the other), ``count`` (of events), ``raws``
(the inputs' raw lines, one after the other)."""


def pack_columns(encoded: Iterable[tuple[Record, Iterable[tuple[str, str, str, bytes]]]]) -> Columns:
    """Inputs with their events (kind, rule, id, body; inputs with none are left out) packed as a spool chunk."""
    inputs, raws, events, bodies = [], [], [], []
    number = 0
    for record, emitted in encoded:
        before = len(events)
        for kind, rule, event_id, body in emitted:
            events.append((number, kind, rule, event_id, len(body)))
            bodies.append(body)
        if len(events) > before:
            inputs.append((record.origin, record.line, len(record.raw)))
            raws.append(record.raw)
            number += 1
    return orjson.dumps(inputs), orjson.dumps(events), b"".join(bodies), len(events), b"".join(raws)


class PackedSlice(NamedTuple):
    """What a part of ``run``'s or ``consume``'s input became, ready for the tally and the spool: its
    summary (no bodies) and its events packed as a spool chunk (its dead letters are the summary's)."""

    summary: MappedSlice
    columns: Columns
    marks: bytes
    """One byte per record, in order: :data:`EMITTED` if it emitted events, plus :data:`DEAD_LETTERED`
    if it has a dead letter (the summary's dead letters are those records', in order)."""


EMITTED, DEAD_LETTERED = 1, 2
"""The bits of :attr:`PackedSlice.marks` (what a Kafka message's offset waits for: ``consume``)."""


def pack_mapped(mapped: Iterable[tuple[Record, Mapped]]) -> PackedSlice:
    """Sum up and pack what the records of a part became, as they come: a record's decoded event is not
    kept past its turn (a part's worth of decoded events held at once costs a worker ≈ 3 µs per event)."""
    emitted: list[tuple[Record, tuple[MappedEvent, ...]]] = []
    marks = bytearray()

    def noted() -> Iterator[tuple[Record, Mapped]]:
        for record, one in mapped:
            if one.events:
                emitted.append((Record(record.origin, record.line, record.raw), one.events))
            marks.append((EMITTED if one.events else 0)
                         | (DEAD_LETTERED if one.rejected and one.dead_letter is not None else 0))
            yield record, one

    summary = summarize(noted(), bodies=False)
    return PackedSlice(summary, pack_columns(emitted), bytes(marks))


def outcome_line(record: Record, mapped: Mapped) -> dict[str, Any]:
    """``map --format outcomes``' line of one input event."""
    emitted = [{"kind": e.kind, "rule": e.rule, "event": orjson.Fragment(e.body)} for e in mapped.events]
    return {"origin": record.origin, "line": record.line, "messageId": mapped.message_id, "emitted": emitted,
            "rejected": [r.to_dict() for r in mapped.rejected], "skipped": not emitted and not mapped.rejected}


def unit_records(units: Iterable[Record | LineBlock]) -> Iterator[Record]:
    """The records of a stream of records and blocks of lines, in order."""
    for unit in units:
        if isinstance(unit, LineBlock):
            yield from block_records(unit)
        else:
            yield unit


class Mapper(Protocol):
    """Maps slices of input; ``map`` returns one :class:`Mapped` per record, in order."""

    workers: int
    """Processes mapping at once (a caller splits what it maps at once into at least as many parts)."""

    def map(self, records: Sequence[Record]) -> list[Mapped]: ...

    def stream(self, records: Iterable[Record]) -> Iterator[tuple[Record, Mapped]]:
        """Each record of an unbounded stream with what it became, in order, mapping ahead."""
        ...

    def summaries(self, units: Iterable[Record | LineBlock], outcome_lines: bool = False) -> Iterator[MappedSlice]:
        """What a stream of records and blocks of lines became, a slice at a time, in order (:func:`summarize`)."""
        ...

    def packs(self, parts: Iterable[Sequence[Record | LineBlock]]) -> Iterator[PackedSlice]:
        """What each part of a stream (records and blocks of lines) became, packed (:func:`pack_mapped`), in order."""
        ...

    def close(self) -> None: ...


class InProcessMapper:
    """The map stage in this process: :meth:`Engine.process_record` and encoding, record by record."""

    workers = 1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def map(self, records: Sequence[Record]) -> list[Mapped]:
        return [self.map_one(record) for record in records]

    def stream(self, records: Iterable[Record]) -> Iterator[tuple[Record, Mapped]]:
        for record in records:
            yield record, self.map_one(record)

    def summaries(self, units: Iterable[Record | LineBlock], outcome_lines: bool = False) -> Iterator[MappedSlice]:
        records = unit_records(units)
        while (first := next(records, None)) is not None:
            part = chain([first], islice(records, SUMMARY_SLICE - 1))
            yield summarize(((record, self.map_one(record)) for record in part), outcome_lines)

    def packs(self, parts: Iterable[Sequence[Record | LineBlock]]) -> Iterator[PackedSlice]:
        for part in parts:
            yield pack_mapped((record, self.map_one(record)) for record in unit_records(part))

    def close(self) -> None:
        """Nothing to release in this process."""

    def map_one(self, record: Record) -> Mapped:
        """What one record (decoded or not) became."""
        record = decode(record)
        outcome = self.engine.process_record(record)
        events = encode_events(outcome.emitted)
        dead = orjson.dumps(rejected_input(record, outcome)) if outcome.rejected else None
        return Mapped(outcome.message_id, outcome.verdict, events, outcome.rejected, dead)
