"""One member of a Kafka consumer group: messages → engine → spool → Topsort, and the commits.

Only one thread ever uses the consumer (librdkafka's commits block for as long as another thread
sits in ``consume()``): the *consumer thread* subscribes, polls, maps what it read, commits done
offsets between two polls (asynchronously: a commit never holds up delivery), serves the
rebalance and commit callbacks, and at the end commits for the last time and closes. It hands
chunks of mapped messages to delivery through a queue; when delivery falls behind, it pauses its
partitions and goes on polling, so rebalances and commits are still served.

The *delivery thread* (the caller of :meth:`KafkaWorker.run`) runs the
:class:`~engine.delivery.dispatch.Dispatcher`; on its ticks it writes the spool's dead letters to the
dead-letter topic and marks settled messages done. A partition's offset is committed only up to
the first message not yet done (its Topsort events settled, its dead letter acknowledged).

One cohesive piece (the worker, its offsets and its dead letters), hence a little over 350 lines.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from rich.console import Console

from ...delivery.dispatch import Dispatcher
from ...delivery.pipeline import MapStep, deliver
from ...mapping import DEAD_LETTERED, EMITTED, Mapper
from ...record import Record
from ...errors import DeadLetterTopicError
from .settings import consumer_settings, message_key, produce, producer_settings
from ...delivery.spool import Chunk, Spool
from ...reports.summary import Tally

HEADER_PREFIX = "segment-topsort-"
"""Headers of a dead-letter message: ``…stage``, ``…reason``, ``…origin`` (topic/partition), ``…offset``."""

_BATCH = 500
"""Messages taken from the consumer at a time (one spool chunk at most)."""
_MIN_PART = 64
"""The fewest messages mapped as one part (by one worker)."""
_POLL_SECONDS = 0.2
_COMMIT_EVERY = 1.0
"""Seconds between two commits while running (and on revocation and at the end)."""
_AHEAD = 4
"""Batches of messages mapped ahead of delivery before the consumer pauses its partitions."""
_FLUSH_SECONDS = 30.0
_CLOSE_SECONDS = 30.0
_END = object()
"""Put in the hand-over queue after the last chunk."""

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class Partition(NamedTuple):
    """A topic's partition; its :attr:`name` is the ``origin`` of the messages read from it."""

    topic: str
    number: int

    @property
    def name(self) -> str:
        return f"{self.topic}/{self.number}"


class Offsets:
    """For each assigned partition, which read offsets are not done yet (thread-safe).

    A message holds its offset open once per obligation (its events in the spool, its dead letter
    on the way to the topic); the position to commit is the first offset still open, or the one
    after the last read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Partition, dict[int, int]] = {}
        self._next: dict[Partition, int] = {}
        self._committed: dict[Partition, int] = {}
        self._by_name: dict[str, Partition] = {}

    def assign(self, partitions: Sequence[Partition]) -> None:
        with self._lock:
            for partition in partitions:
                self._open.setdefault(partition, {})
                self._by_name[partition.name] = partition

    def forget(self, partitions: Sequence[Partition]) -> None:
        with self._lock:
            for partition in partitions:
                for table in (self._open, self._next, self._committed):
                    table.pop(partition, None)

    def assigned(self, partition: Partition) -> bool:
        with self._lock:
            return partition in self._open

    def read(self, partition: Partition, offset: int, holds: int) -> bool:
        """Note a message read; False if its partition is not (or no longer) assigned."""
        with self._lock:
            waiting = self._open.get(partition)
            if waiting is None:
                return False
            if holds:
                waiting[offset] = waiting.get(offset, 0) + holds
            self._next[partition] = offset + 1
            return True

    def release(self, partition: Partition | str | None, offset: int | None) -> None:
        """One obligation of a message is met (ignored for a partition no longer assigned).

        ``partition`` may be given by name (a spooled input's origin)."""
        with self._lock:
            if isinstance(partition, str):
                partition = self._by_name.get(partition)
            waiting = self._open.get(partition) if partition else None
            if waiting and offset in waiting:
                waiting[offset] -= 1
                if not waiting[offset]:
                    del waiting[offset]

    def to_commit(self, partitions: Sequence[Partition] | None = None) -> list[TopicPartition]:
        """Positions gained since the last commit, of ``partitions`` (default: all assigned)."""
        with self._lock:
            found = []
            for partition in self._next if partitions is None else partitions:
                if partition not in self._next:
                    continue
                waiting = self._open[partition]
                position = next(iter(waiting)) if waiting else self._next[partition]
                if position > self._committed.get(partition, -1):
                    found.append(TopicPartition(partition.topic, partition.number, position))
            return found

    def committed(self, positions: Sequence[TopicPartition], *, done: bool = True) -> None:
        """Positions committed (or, ``done=False``, whose commit failed: to be committed again)."""
        with self._lock:
            for position in positions:
                partition = Partition(position.topic, position.partition)
                if partition in self._open:
                    self._committed[partition] = position.offset if done else -1


class KafkaWorker:
    """One consumer-group member reading ``topic``; see the module's docstring for its threads."""

    def __init__(
        self, mapper: Mapper, settings: dict[str, str], *, topic: str, group: str, dead_letter_topic: str,
        spool_path: Path, drain_timeout: float, consumer_type: type[Consumer] = Consumer,
    ) -> None:
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.tally = Tally()
        self._step = MapStep(mapper, self.tally)
        self.dead_lettered = 0
        self._count_lock = threading.Lock()
        self._consumer = consumer_type(consumer_settings(settings, group, self._on_commit))
        self._producer = Producer(producer_settings(settings))
        self._drain_timeout = drain_timeout
        self._offsets = Offsets()
        self._settled: list[tuple[str | None, int | None]] = []
        self._handover: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._closing = threading.Event()
        self._dispatcher: Dispatcher | None = None
        self._stop_lock = threading.Lock()
        self._thread = threading.Thread(target=self._consume, name="segment-topsort-kafka", daemon=True)
        self.spool = Spool(spool_path, on_settled=self._on_settled)

    def run(self, dispatcher: Dispatcher) -> None:
        """Consume and deliver (``dispatcher`` drains :attr:`spool`) until :meth:`stop` and the
        delivery of what was read, or a failure (raised); then commit and leave the group."""
        with self._stop_lock:
            self._dispatcher = dispatcher
            if self._stopping.is_set():  # a signal came first
                dispatcher.stop(self._drain_timeout)
        self._thread.start()
        try:
            deliver(dispatcher, self._chunks(), self._tick)
        finally:
            self._finish()

    def stop(self, *_: Any) -> None:
        """Stop reading and deliver what was read for at most the drain timeout; a second call
        stops delivery at once."""
        with self._stop_lock:
            again = self._stopping.is_set()
            self._stopping.set()
            if self._dispatcher is not None:
                self._dispatcher.stop(0.0 if again else self._drain_timeout)
        if not again:
            stderr.print("Stopping: delivering what was read, then committing (signal again to stop at once).")

    # -- the consumer thread ---------------------------------------------------------------------------

    def _consume(self) -> None:
        consumer, paused, ended = self._consumer, False, False
        committed_at = time.monotonic()
        try:
            consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_lost)
            while not self._closing.is_set():
                reading = not self._stopping.is_set()
                if not reading or self._handover.qsize() >= _AHEAD:
                    consumer.pause(consumer.assignment())      # again: new partitions may have come
                    paused = True
                elif paused:
                    consumer.resume(consumer.assignment())
                    paused = False
                messages = consumer.consume(_BATCH, _POLL_SECONDS)
                if reading:
                    chunks = self._map(messages)
                    if chunks:
                        self._handover.put(chunks)
                elif not ended:
                    self._handover.put(_END)
                    ended = True
                if time.monotonic() - committed_at >= _COMMIT_EVERY:
                    self._commit(asynchronous=True)
                    committed_at = time.monotonic()
        except BaseException as exc:  # handed to delivery, which raises it
            self._handover.put(exc)
        finally:
            self._commit(asynchronous=False)
            consumer.close()

    def _map(self, messages: list[Message]) -> list[Chunk]:
        """The spool chunks of what ``messages`` became (one per part mapped), their offsets noted and
        their dead letters on their way to the topic.

        Only this thread polls the consumer, and partitions are assigned and revoked only while it
        polls: a message of a partition still assigned here stays so until the next poll."""
        records, positions = [], []
        for message in messages:
            if (error := message.error()) is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    stderr.print(f"[yellow]Kafka: {error.str()}[/]")
                continue
            partition, offset = Partition(message.topic(), message.partition()), message.offset()
            if not self._offsets.assigned(partition):
                continue  # revoked in that poll: its new owner reads it
            records.append(Record(partition.name, offset, message.value() or b""))  # decoded by the mapper
            positions.append((partition, offset))
        chunks, start = [], 0
        for packed in self._step.packs(_parts(records, self._step.mapper.workers)):
            part = positions[start:start + len(packed.marks)]
            start += len(packed.marks)
            for (partition, offset), mark in zip(part, packed.marks, strict=True):  # before any is released
                self._offsets.read(partition, offset, bool(mark & EMITTED) + bool(mark & DEAD_LETTERED))
            letters = iter(packed.summary.dead_letters)
            for position, mark in zip(part, packed.marks):
                if mark & DEAD_LETTERED:
                    self._send_dead_letter(next(letters), *position)
            if packed.columns[3]:
                chunks.append(Chunk(columns=packed.columns))
        self._producer.poll(0)
        return chunks

    def _commit(self, partitions: Sequence[Partition] | None = None, *, asynchronous: bool) -> None:
        """Commit the done positions (on the consumer thread only)."""
        positions = self._offsets.to_commit(partitions)
        if not positions:
            return
        try:
            self._consumer.commit(offsets=positions, asynchronous=asynchronous)
        except KafkaException as exc:
            self._on_commit(exc.args[0], positions)
            return
        self._offsets.committed(positions)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """A commit ended (served while the consumer thread polls)."""
        if error is not None:
            self._offsets.committed(partitions, done=False)
            stderr.print(f"[yellow]Kafka: commit not done ({error.str()}); retried[/]")

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._offsets.assign([Partition(p.topic, p.partition) for p in partitions])
        stderr.print(f"Assigned partitions {_names(partitions)}")

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [Partition(p.topic, p.partition) for p in partitions]
        self._commit(revoked, asynchronous=False)
        self._offsets.forget(revoked)
        stderr.print(f"Revoked partitions {_names(partitions)}")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._offsets.forget([Partition(p.topic, p.partition) for p in partitions])
        stderr.print(f"[yellow]Lost partitions {_names(partitions)}; their messages are read again by their new owner[/]")

    # -- the delivery thread ---------------------------------------------------------------------------

    def _chunks(self) -> Iterator[Chunk]:
        """What the consumer thread mapped, until it stops reading (or fails: raised here)."""
        while (item := self._handover.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield from item

    def _on_settled(self, inputs: list[tuple[str | None, int | None]]) -> None:
        """Spool hook: these inputs left the spool (their dead letters, if any, are in it)."""
        self._settled.extend(inputs)

    def _tick(self) -> None:
        """Called by the dispatcher about five times a second."""
        self._settle()

    def _settle(self) -> None:
        """Write the spool's dead letters to the topic, then count the settled inputs as done."""
        settled, self._settled = self._settled, []
        self._producer.poll(0)
        try:
            self._count(self.spool.take_dead_letters(self._send_dead_letters))
        except DeadLetterTopicError as exc:
            self._settled[:0] = settled
            stderr.print(f"[red]{exc}[/]")
            return
        for origin, offset in settled:
            self._offsets.release(origin, offset)

    def _finish(self) -> None:
        """After delivery ended: settle, write the last dead letters; the consumer thread commits and leaves."""
        self._stopping.set()
        try:
            self._settle()
            self._producer.flush(_FLUSH_SECONDS)
        finally:
            self._closing.set()
            self._handover.put(_END)  # in case delivery stopped first: its reader waits for input
            self._thread.join(_CLOSE_SECONDS)

    # -- dead letters ----------------------------------------------------------------------------------

    def _count(self, dead_letters: int) -> None:
        with self._count_lock:
            self.dead_lettered += dead_letters

    def _send_dead_letter(self, letter: bytes, partition: Partition, offset: int) -> None:
        """Produce the map or decode dead letter (encoded) of the message at ``offset``; its offset is
        released once the topic has it."""

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                self._count(1)
                self._offsets.release(partition, offset)
            else:
                stderr.print(f"[red]Dead letter of {partition.name}@{offset} not written:"
                             f" {error.str()}; its offset stays uncommitted[/]")

        self._produce_dead_letter(letter, orjson.loads(letter), on_delivery=delivered)

    def _send_dead_letters(self, records: list[dict[str, Any]]) -> None:
        """Produce ``deliver`` dead letters from the spool and wait until the topic has them all."""
        failures: list[KafkaError] = []
        for record in records:
            self._produce_dead_letter(
                orjson.dumps(record), record,
                on_delivery=lambda error, _m: failures.append(error) if error is not None else None,
            )
        left = self._producer.flush(_FLUSH_SECONDS)
        if failures or left:
            problem = failures[0].str() if failures else "no acknowledgement in time"
            raise DeadLetterTopicError(
                f"{len(records)} dead letter(s) not written to {self.dead_letter_topic} ({problem});"
                " kept in the spool and written again"
            )

    def _produce_dead_letter(self, letter: bytes, record: dict[str, Any], **extra: Any) -> None:
        """Produce ``letter``, the encoding of ``record`` (whose fields make its key and headers)."""
        reason = "; ".join(f"{r.get('path')}: {r.get('reason')}" for r in record["rejected"])
        headers = [
            (HEADER_PREFIX + "stage", record["stage"]),
            (HEADER_PREFIX + "reason", reason[:2000]),
            (HEADER_PREFIX + "origin", str(record.get("origin"))),
            (HEADER_PREFIX + "offset", str(record.get("line"))),
        ]
        key = message_key(record.get("event"))
        produce(self._producer, self.dead_letter_topic, letter, key, headers=headers, **extra)


def _parts(records: list[Record], workers: int) -> list[list[Record]]:
    """``records`` shared out into one part per worker (of at least ``_MIN_PART``), mapped at once."""
    size = max(_MIN_PART, -(-len(records) // workers))
    return [records[start:start + size] for start in range(0, len(records), size)]


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "(none)"
