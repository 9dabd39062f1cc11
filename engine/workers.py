"""The map stage in worker processes: a :class:`~engine.mapping.Mapper` that uses every core.

Worker processes are forked from the process that compiled the rules, so they start with the
engine in memory (no imports or compilation paid again). The parent sends slices of records as
the bytes it holds (undecoded lines; a decoded event's encoding), the workers decode, route, map,
validate and encode, and send back :class:`~engine.mapping.Mapped` values: encoded Topsort events,
rejections and encoded dead letters. The parent keeps order: results come back slice by slice, in
the order the slices went out. For ``map`` (:meth:`PoolMapper.summaries`) the parent sends blocks of
whole lines as read and the workers split them too, and each slice comes back as one
:class:`~engine.mapping.MappedSlice`: counts, dead letters, event bodies, not one value per event.
For ``run`` (:meth:`PoolMapper.packs`) each part comes back as one :class:`~engine.mapping.PackedSlice`:
that summary and the part's events packed as the spool stores them.

A worker that dies (killed, out of memory) costs nothing: the pool is started again and every
slice not yet answered is sent again, so no event is lost or mapped twice. A slice that kills a
worker a second time is mapped one record at a time, and a record that kills a worker on its own
is that record's rejection.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain, islice
from typing import Any, TypeVar

import orjson

from .engine import Engine
from .mapping import InProcessMapper, Mapped, MappedEvent, MappedSlice, Mapper, PackedSlice, pack_mapped, summarize
from .ndjson import LineBlock, block_records
from .outcome import Outcome, Rejection, rejected_input
from .record import Record, decode

SLICE = 512
"""Records sent to a worker at once: large enough that a slice's overhead is small, small enough
to keep every worker busy and the memory held in flight bounded."""

_ORPHAN_CHECK = 0.5
"""Seconds between a worker's checks that its parent still lives."""

_MIN_PART = 64
"""The fewest records :meth:`PoolMapper.map` sends to a worker at once."""

_Wire = tuple[bytes, list[int], list[int], list[str], dict[int, "str | None"]]
"""A slice of records as it crosses to a worker: their raw bytes joined, the length of each, their
lines, their origins, and for the few a source decoded or refused, by position: None (decoded there:
``raw`` is the event's encoding, e.g. one event of a batch body) or why it could not be decoded. One
bytes object per slice, not one per record, keeps the crossing to a copy."""

_Piece = LineBlock | _Wire
"""A piece of a part sent to a worker for ``map``: a block of lines as read, or records on the wire."""
_PART_BYTES = 512 << 10
"""Input bytes of a part for ``map``: one block of a large file; the blocks of several small ones."""

_MappedWire = tuple["str | None", str, tuple[tuple, ...], tuple[tuple, ...], "bytes | None"]
"""A :class:`Mapped` as it crosses back: the same values in plain tuples, which pickle and unpickle
several times faster than named tuples."""
_tuple = tuple.__new__
"""Makes a named tuple from a tuple of its values, without the Python-level ``__new__``."""
_Part = TypeVar("_Part")
_Answer = TypeVar("_Answer")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters."""
_LARGE = 4 << 20
"""Allocations up to this size come from the heap, and freed memory up to 4 times it stays for reuse."""

_worker_mapper: InProcessMapper | None = None
"""The engine of this worker process (set once, when it starts)."""


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def make_mapper(engine: Engine, workers: int | None = None, *, start: bool = False) -> Mapper:
    """The map stage for ``workers`` processes (default: the usable cores); ``1`` maps in this process.

    With ``start`` the worker processes are forked now: a front-end that starts threads of its own
    (delivery, HTTP) forks before them, so no worker inherits a lock another thread held.
    """
    _reuse_large_buffers()
    workers = usable_cores() if workers is None else workers
    if workers <= 1:
        return InProcessMapper(engine)
    mapper = PoolMapper(engine, workers)
    if start:
        mapper.start()
    return mapper


def _reuse_large_buffers() -> None:
    """Have glibc's allocator keep freed buffers of a few MiB (blocks of input, pickles, pipe reads)
    for the next one, rather than unmapping each and faulting fresh pages in for the next: that
    cost a worker ≈ 2 µs per event in page faults. Elsewhere than glibc, nothing changes."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to open by name, or not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGE)
    mallopt(_M_TRIM_THRESHOLD, 4 * _LARGE)


class PoolMapper:
    """Maps in ``workers`` forked processes; a stream shorter than one slice is mapped here, and
    the pool starts only when a stream is longer (so a short ``map`` starts no process)."""

    def __init__(self, engine: Engine, workers: int, slice_size: int = SLICE) -> None:
        self.engine = engine
        self.workers = workers
        self._slice = slice_size
        self._local = InProcessMapper(engine)
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        """Times the pool was started again after a worker died."""

    def start(self) -> None:
        """Fork the worker processes now rather than on the first slice."""
        self._send_records([]).result()

    def map(self, records: Sequence[Record]) -> list[Mapped]:
        """A slice of the caller's (e.g. a pipeline's chunk): shared out among the workers in parts
        of at least ``_MIN_PART`` records, mapped here when too short for two parts."""
        if len(records) < 2 * _MIN_PART:
            return self._local.map(records)
        part = max(_MIN_PART, -(-len(records) // (2 * self.workers)))
        return [mapped for _, mapped in self._pooled_records(iter(records), part)]

    def stream(self, records: Iterable[Record]) -> Iterator[tuple[Record, Mapped]]:
        source = iter(records)
        first = list(islice(source, self._slice))
        if len(first) < self._slice:
            yield from self._local.stream(first)
            return
        yield from self._pooled_records(chain(first, source), self._slice)

    def summaries(self, units: Iterable[Record | LineBlock], outcome_lines: bool = False) -> Iterator[MappedSlice]:
        """Each block of lines, and each run of records of up to a slice, summed up by a worker."""
        source = iter(units)
        first: list[Record | LineBlock] = []
        lines = 0
        for unit in source:  # the pool starts once the input holds more than a slice
            first.append(unit)
            lines += unit.data.count(b"\n") + 1 if isinstance(unit, LineBlock) else 1
            if lines > self._slice:
                break
        else:
            yield from self._local.summaries(first, outcome_lines)
            return

        def send(part: list[_Piece]) -> Future[MappedSlice]:
            return self._submit(_summarize_part, part, outcome_lines)

        def alone(part: list[_Piece]) -> MappedSlice:
            return summarize(self._pairs_alone(part), outcome_lines)

        for _, summary in self._pooled(_parts(chain(first, source), self._slice), send, alone):
            yield summary

    def packs(self, parts: Iterable[Sequence[Record | LineBlock]]) -> Iterator[PackedSlice]:
        """Each part mapped and packed by a worker, a few parts out ahead of the one answered."""

        def send(pieces: list[_Piece]) -> Future[PackedSlice]:
            return self._submit(_pack_part, pieces)

        def alone(pieces: list[_Piece]) -> PackedSlice:
            return pack_mapped(self._pairs_alone(pieces))

        for _, packed in self._pooled(map(_pieces, parts), send, alone):
            yield packed

    def _pooled_records(self, source: Iterator[Record], size: int) -> Iterator[tuple[Record, Mapped]]:
        parts = iter(lambda: list(islice(source, size)), [])
        for part, answer in self._pooled(parts, self._send_records, self._records_alone):
            yield from zip(part, _from_wire(answer))

    def _pooled(
        self, parts: Iterator[_Part], send: Callable[[_Part], Future[_Answer]], alone: Callable[[_Part], _Answer]
    ) -> Iterator[tuple[_Part, _Answer]]:
        """Each part with its answer from a worker, in order, a few parts out ahead of the one answered.

        When a worker died, the pool restarts and every part in flight is sent again; a part that
        kills a worker a second time is answered by ``alone`` (one record at a time)."""
        pending: deque[tuple[_Part, Future[_Answer]]] = deque()

        def sent(part: _Part) -> Future[_Answer]:
            try:
                return send(part)
            except BrokenProcessPool as exc:  # a worker died since the last answer: that part's answer
                failed: Future[_Answer] = Future()
                failed.set_exception(exc)
                return failed

        def collect() -> tuple[_Part, _Answer]:
            part, future = pending.popleft()
            try:
                return part, future.result()
            except BrokenProcessPool:
                self._restart()
                try:
                    answer = send(part).result()
                except BrokenProcessPool:  # this part kills workers: find the record that does
                    self._restart()
                    answer = alone(part)
                for index, (other, _) in enumerate(pending):
                    pending[index] = (other, sent(other))
                return part, answer

        for part in parts:
            pending.append((part, sent(part)))
            if len(pending) > 2 * self.workers:
                yield collect()
        while pending:
            yield collect()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _submit(self, work: Callable[..., _Answer], *args: Any) -> Future[_Answer]:
        if self._pool is None:
            gc.freeze()  # before fork: the collector leaves the shared pages (the engine) alone, here and there
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker, initargs=(self.engine, os.getpid()),
            )
        return self._pool.submit(work, *args)

    def _send_records(self, part: list[Record]) -> Future[list[_MappedWire]]:
        return self._submit(_map_slice, _to_wire(part))

    def _pairs_alone(self, part: list[_Piece]) -> list[tuple[Record, Mapped]]:
        """Each record of a part that kills workers, mapped one at a time (see :meth:`_map_alone`)."""
        records = list(_piece_records(part))
        return list(zip(records, _from_wire([self._map_alone(record) for record in records])))

    def _records_alone(self, part: list[Record]) -> list[_MappedWire]:
        return [self._map_alone(record) for record in part]

    def _map_alone(self, record: Record) -> _MappedWire:
        try:
            return self._send_records([record]).result()[0]
        except BrokenProcessPool:
            self._restart()
            reason = "the worker process mapping this event died (killed, or out of memory)"
            outcome = Outcome(None, rejected=(Rejection(None, "$", reason),))
            dead = orjson.dumps(rejected_input(record, outcome))
            return _to_mapped_wire(Mapped(None, outcome.verdict, (), outcome.rejected, dead))

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.restarts += 1


def _to_wire(part: list[Record]) -> _Wire:
    decoded: dict[int, str | None] = {
        index: record.error for index, record in enumerate(part) if record.error is not None or record.event is not None
    }
    raws = [record.raw for record in part]
    return (b"".join(raws), [len(raw) for raw in raws], [record.line for record in part],
            [record.origin for record in part], decoded)


def _start_worker(engine: Engine, parent: int) -> None:
    global _worker_mapper
    _worker_mapper = InProcessMapper(engine)
    gc.freeze()  # the engine, inherited from the parent, is never garbage: not scanned again
    threading.Thread(target=_exit_with, args=(parent,), name="segment-topsort-orphan-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker once its parent is gone (killed with -9, say), instead of waiting forever."""
    while os.getppid() == parent:
        time.sleep(_ORPHAN_CHECK)
    os._exit(1)


def _parts(units: Iterator[Record | LineBlock], size: int) -> Iterator[list[_Piece]]:
    """What goes to a worker at once: blocks of lines as they are and runs of records on the wire,
    together at least ``_PART_BYTES`` or ``size`` records (so the blocks of many small files share one)."""
    part: list[Record | LineBlock] = []
    weight = count = 0
    for unit in units:
        part.append(unit)
        if isinstance(unit, LineBlock):
            weight += len(unit.data)
        else:
            weight += len(unit.raw)
            count += 1
        if weight >= _PART_BYTES or count >= size:
            yield _pieces(part)
            part, weight, count = [], 0, 0
    if part:
        yield _pieces(part)


def _pieces(units: Sequence[Record | LineBlock]) -> list[_Piece]:
    """A part as it goes to a worker: blocks of lines as they are, each run of records on the wire."""
    pieces: list[_Piece] = []
    records: list[Record] = []
    for unit in units:
        if isinstance(unit, LineBlock):
            if records:
                pieces.append(_to_wire(records))
                records = []
            pieces.append(unit)
        else:
            records.append(unit)
    if records:
        pieces.append(_to_wire(records))
    return pieces


def _piece_records(part: list[_Piece]) -> Iterator[Record]:
    for piece in part:
        yield from block_records(piece) if isinstance(piece, LineBlock) else _wire_records(piece)


def _wire_records(wire: _Wire) -> Iterator[Record]:
    blob, lengths, lines, origins, decoded = wire
    start = 0
    for index, length in enumerate(lengths):
        raw = blob[start:start + length]
        start += length
        record = Record(origins[index], lines[index], raw, error=decoded.get(index))
        if index in decoded and record.error is None:  # the source decoded it (and checked its depth)
            record = decode(record, check_depth=False)
        yield record


def _map_slice(wire: _Wire) -> list[_MappedWire]:
    assert _worker_mapper is not None
    return [_to_mapped_wire(_worker_mapper.map_one(record)) for record in _wire_records(wire)]


def _mapped_pieces(part: list[_Piece]) -> Iterator[tuple[Record, Mapped]]:
    """Each record of a part with what this worker made of it, one at a time."""
    assert _worker_mapper is not None
    return ((record, _worker_mapper.map_one(record)) for record in _piece_records(part))


def _summarize_part(part: list[_Piece], outcome_lines: bool) -> MappedSlice:
    return summarize(_mapped_pieces(part), outcome_lines)


def _pack_part(part: list[_Piece]) -> PackedSlice:
    return pack_mapped(_mapped_pieces(part))


def _to_mapped_wire(one: Mapped) -> _MappedWire:
    return one.message_id, one.verdict, tuple(map(tuple, one.events)), tuple(map(tuple, one.rejected)), one.dead_letter


def _from_wire(wire: list[_MappedWire]) -> list[Mapped]:
    return [
        _tuple(Mapped, (message_id, verdict, tuple([_tuple(MappedEvent, event) for event in events]),
                        tuple([_tuple(Rejection, rejection) for rejection in rejected]), dead_letter))
        for message_id, verdict, events, rejected, dead_letter in wire
    ]
