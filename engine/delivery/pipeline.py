"""The one pipeline every delivering front-end uses: records → map → tally → dead letters → spool.

* :class:`MapStep` is the map step: it maps whole parts of input (records, blocks of lines) into
  :class:`~engine.mapping.PackedSlice` s, counted and packed where mapping ran (:class:`Pipeline`
  and ``consume``); ``serve``, which maps request by request, gets each record's
  :class:`~engine.mapping.Mapped` and packs it into a spool :class:`~engine.delivery.spool.Chunk`
  with :meth:`~engine.delivery.spool.Chunk.add_mapped` (its encoded events and its dead letter).
* :class:`Pipeline` slices :class:`Source` s (files, standard input, dead-letter files) into chunks,
  each chunk carrying the checkpoint that acknowledges its records (a block of lines: the checkpoint
  at its end): once the spool committed the chunk, a restarted run resumes after it. ``serve``
  acknowledges a request by answering it once its chunk is committed, ``consume`` by committing
  offsets once its inputs are settled.
* :class:`DeliveryTarget` is where and how the spool is drained: it builds the one
  :class:`~engine.delivery.dispatch.Dispatcher` of each front-end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from ..mapping import Mapped, MappedSlice, Mapper, PackedSlice
from ..ndjson import LineBlock
from ..record import Checkpoint, Record
from .dispatch import DeliveryStats, Dispatcher
from .retry import RetryPolicy
from .spool import Chunk, Spool

CHUNK_RECORDS = 500
"""Input events mapped and committed to the spool together (with their checkpoint)."""
CHUNK_SECONDS = 0.05
"""Longest time an input event waits before its chunk is committed."""

class Counts(Protocol):
    """What counts the outcomes (:class:`~engine.reports.summary.Tally`): a part's summary at a time."""

    def add_slice(self, mapped: MappedSlice) -> None: ...


class MapStep:
    """Maps parts of input, packed for the spool where they are mapped; ``tally`` counts every outcome."""

    def __init__(self, mapper: Mapper, tally: Counts | None = None) -> None:
        self.mapper = mapper
        self._tally = tally

    def packs(self, parts: Iterable[Sequence[Record | LineBlock]]) -> Iterator[PackedSlice]:
        """What each part became, packed where it was mapped (:meth:`Mapper.packs`), each counted."""
        for packed in self.mapper.packs(parts):
            if self._tally:
                self._tally.add_slice(packed.summary)
            yield packed

    def map(self, records: Sequence[Record]) -> list[tuple[Record, Mapped]]:
        """Each record with what it became, in order."""
        return list(zip(records, self.mapper.map(records), strict=True))


@dataclass(slots=True)
class Source:
    """One input: records with the checkpoint after each, and whether more is at hand right now.

    ``key`` names the source in the spool's checkpoints (None: never resumed, e.g. stdin).
    """

    origin: str
    key: str | None
    records: Iterator[tuple[Record | LineBlock, Checkpoint | None]]
    """Records or blocks of lines, each with the checkpoint reached after it (None: none yet)."""
    at_hand: Callable[[], bool] = lambda: True
    todo: int | None = None
    """Bytes left to read, when known."""
    steady: bool = True
    """Read ahead of mapping (a file); False for a stream that may pause (each part mapped and
    committed before the next is read, so none waits for input that has not come)."""

    def parts(self) -> Iterator[tuple[list[Record | LineBlock], Checkpoint | None, int]]:
        """Parts of up to ``CHUNK_RECORDS`` records or one block of lines (sooner after
        ``CHUNK_SECONDS``, or when no more is at hand), each with the checkpoint reached and its bytes."""
        units: list[Record | LineBlock] = []
        checkpoint: Checkpoint | None = None
        count = size = 0
        started = time.monotonic()
        for unit, reached in self.records:
            units.append(unit)
            checkpoint = reached or checkpoint
            if isinstance(unit, LineBlock):
                count, size = count + CHUNK_RECORDS, size + len(unit.data)
            else:
                count, size = count + 1, size + len(unit.raw) + 1
            if count >= CHUNK_RECORDS or time.monotonic() - started >= CHUNK_SECONDS or not self.at_hand():
                yield units, checkpoint, size
                units, count, size, started = [], 0, 0, time.monotonic()
        if units:
            yield units, checkpoint, size


class Pipeline:
    """Reads sources, maps them through a :class:`MapStep` and yields chunks for the spool.

    Runs on whichever thread consumes :meth:`chunks`; the counters are read by others for progress.
    """

    def __init__(self, step: MapStep) -> None:
        self.step = step
        self.read = 0
        self.bytes = 0
        self.todo: int | None = 0
        """Bytes to read, when known (not for standard input)."""

    def chunks(self, sources: Iterable[Source]) -> Iterator[Chunk]:
        """Chunks of mapped input, each with the checkpoint reached in its source."""
        sources = list(sources)
        sizes = [source.todo for source in sources]
        self.todo = None if None in sizes else sum(size or 0 for size in sizes)
        for source in sources:
            for (checkpoint, size), packed in self._packed(source):
                chunk = Chunk(encoded_dead_letters=packed.summary.dead_letters, columns=packed.columns)
                self.bytes += size
                self.read += sum(packed.summary.verdicts.values())
                if source.key and checkpoint:
                    chunk.checkpoint(source.key, checkpoint)
                yield chunk

    def _packed(self, source: Source) -> Iterator[tuple[tuple[Checkpoint | None, int], PackedSlice]]:
        """Each part of ``source`` (its checkpoint and bytes) with what it became, in order."""
        if not source.steady:
            for units, checkpoint, size in source.parts():
                yield (checkpoint, size), next(self.step.packs([units]))
            return
        ahead: deque[tuple[Checkpoint | None, int]] = deque()

        def parts() -> Iterator[list[Record | LineBlock]]:
            for units, checkpoint, size in source.parts():
                ahead.append((checkpoint, size))
                yield units

        for packed in self.step.packs(parts()):
            yield ahead.popleft(), packed


def deliver(dispatcher: Dispatcher, chunks: Iterable[Chunk], tick: Callable[[], None] | None = None) -> DeliveryStats:
    """Read ``chunks`` (mapping happens as they are read) on a thread of their own, offering each to
    ``dispatcher``, and drain the spool on this thread until the chunks end and the spool is empty,
    or until :meth:`Dispatcher.stop`. Raises what reading the chunks raised."""
    feeder = threading.Thread(target=_feed, args=(dispatcher, chunks), name="segment-topsort-reader", daemon=True)
    feeder.start()
    try:
        return dispatcher.run(tick, fed=True)
    finally:
        feeder.join(timeout=1.0)


def _feed(dispatcher: Dispatcher, chunks: Iterable[Chunk]) -> None:
    try:
        for chunk in chunks:
            if not dispatcher.offer(chunk):
                return  # delivery stopped: what was not offered stays unread
    except BaseException as exc:  # handed to the dispatcher's thread, which raises it
        dispatcher.end_input(exc)
        return
    dispatcher.end_input()


@dataclass(frozen=True, slots=True)
class DeliveryTarget:
    """Where and how the spool is drained: Topsort's endpoint, the key, and the dispatch tuning."""

    endpoint: str
    api_key: str = field(repr=False)
    max_in_flight: int = 8
    max_latency: float = 1.0
    timeout: float = 10.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def dispatcher(self, spool: Spool, *, transport: httpx.BaseTransport | None = None, **extra: Any) -> Dispatcher:
        """The dispatcher that drains ``spool`` to this target (``extra``: e.g. ``high_water``)."""
        return Dispatcher(
            spool, endpoint=self.endpoint, api_key=self.api_key, max_in_flight=self.max_in_flight,
            max_latency=self.max_latency, timeout=self.timeout, policy=self.policy, transport=transport, **extra,
        )
