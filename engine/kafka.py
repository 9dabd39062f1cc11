"""``segment-topsort consume`` and ``produce``: Segment events through Kafka, delivered to Topsort.

``consume`` is one worker of a consumer group. It maps each message (one Segment event, JSON) and
delivers the results through the same spool and :class:`~engine.dispatch.Dispatcher` as ``run``;
rejected events go to a dead-letter topic. Delivery is at least once: a partition's offset is
committed only up to the first message not yet *done*, that is whose Topsort events are not all
settled in the spool (delivered, or dead-lettered) or whose dead letter the topic has not yet
acknowledged. Done offsets are committed about once a second, when partitions are revoked, and on
shutdown (SIGTERM, SIGINT). Messages read again after a crash or a rebalance keep their event ids,
which Topsort deduplicates.

Settings are librdkafka's (``bootstrap.servers``, ``security.protocol``, ``sasl.*``, ``ssl.*``,
``session.timeout.ms``, ...): from a ``--config`` file (``name=value`` properties, or a YAML/JSON
mapping for ``.yaml``, ``.yml``, ``.json``), overridden by ``SEGMENT_TOPSORT_KAFKA_<NAME>``
environment variables (``SEGMENT_TOPSORT_KAFKA_SASL_PASSWORD`` is ``sasl.password``), overridden by
``--bootstrap-servers`` (or ``KAFKA_BOOTSTRAP_SERVERS``). Values are never printed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import orjson
import yaml
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from rich.console import Console

from .cli_options import api_key_or_exit, delivery_tuning, rules_option
from .dead_letters import rejected_input
from .dispatch import DeliveryError, Dispatcher
from .engine import Engine
from .errors import EngineError
from .retry import RetryPolicy
from .source import STDIN, InputError, decode_line, read_records
from .spool import Chunk, Spool
from .summary import Tally

ENV_PREFIX = "SEGMENT_TOPSORT_KAFKA_"
"""Environment variables with this prefix are librdkafka settings: ``_`` stands for ``.``."""
HEADER_PREFIX = "segment-topsort-"
"""Headers of a dead-letter message: ``…stage``, ``…reason``, ``…origin`` (topic/partition), ``…offset``."""

_BATCH = 500
"""Messages taken from the consumer at a time (one spool chunk at most)."""
_POLL_SECONDS = 0.2
_COMMIT_EVERY = 5.0
"""Seconds between two commits while running (as Kafka's auto.commit.interval.ms); each one holds up fetching a little."""
_FLUSH_SECONDS = 30.0
_YAML_SUFFIXES = (".yaml", ".yml", ".json")

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_Partition = tuple[str, int]


class KafkaSetupError(EngineError):
    """The Kafka settings cannot be used."""


class DeadLetterTopicError(EngineError):
    """Dead letters could not be written to their topic; they are kept and written again later."""


# -- settings --------------------------------------------------------------------------------------


def kafka_settings(
    config_file: Path | None, bootstrap_servers: str | None, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """librdkafka settings from the file, then the environment, then ``bootstrap_servers``."""
    settings = _read_config(config_file) if config_file else {}
    settings.update(
        {name[len(ENV_PREFIX):].lower().replace("_", "."): value
         for name, value in environ.items() if name.startswith(ENV_PREFIX)}
    )
    if bootstrap_servers:
        settings["bootstrap.servers"] = bootstrap_servers
    if not settings.get("bootstrap.servers"):
        raise KafkaSetupError(
            "no Kafka cluster given: use --bootstrap-servers, KAFKA_BOOTSTRAP_SERVERS, or bootstrap.servers in --config"
        )
    return settings


def _read_config(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KafkaSetupError(f"cannot read the Kafka settings in {path}: {exc}") from None
    if path.suffix.lower() in _YAML_SUFFIXES:
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise KafkaSetupError(f"{path}: not valid YAML/JSON: {exc}") from None
        if not isinstance(data, dict) or any(isinstance(v, (dict, list)) for v in data.values()):
            raise KafkaSetupError(f"{path}: expected a flat mapping of librdkafka settings, e.g. bootstrap.servers: host:9092")
        return {str(name): _setting(value) for name, value in data.items()}
    settings = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise KafkaSetupError(f"{path}:{number}: expected name=value, e.g. security.protocol=SASL_SSL")
        settings[name.strip()] = value.strip()
    return settings


def _setting(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _kafka_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="librdkafka settings (security.protocol, sasl.*, ssl.*, …): name=value lines, or YAML/JSON"
             f" for .yaml/.yml/.json. {ENV_PREFIX}<NAME> variables override them.",
    )(command)
    return click.option(
        "--bootstrap-servers", envvar="KAFKA_BOOTSTRAP_SERVERS", metavar="HOSTS",
        help="host:port[,host:port…] (or KAFKA_BOOTSTRAP_SERVERS, or bootstrap.servers in --config).",
    )(command)


def _settings_or_usage_error(config_file: Path | None, bootstrap_servers: str | None) -> dict[str, str]:
    try:
        return kafka_settings(config_file, bootstrap_servers)
    except KafkaSetupError as exc:
        raise click.UsageError(str(exc)) from None


def message_key(event: Any) -> bytes | None:
    """A message's key: the event's ``anonymousId``, else its ``userId``, so a user's events share a partition."""
    if isinstance(event, dict):
        for field in ("anonymousId", "userId"):
            value = event.get(field)
            if value is not None and value != "":
                return str(value).encode()
    return None


# -- produce ---------------------------------------------------------------------------------------


@click.command("produce")
@click.argument("inputs", nargs=-1)
@click.option("--topic", required=True, help="The topic to write Segment events to.")
@_kafka_options
def produce_command(inputs: tuple[str, ...], topic: str, config_file: Path | None, bootstrap_servers: str | None) -> None:
    """Write Segment events from files, folders, archives or - (stdin, the default) to a Kafka topic.

    One event per message, keyed by anonymousId, else userId; lines that are not JSON are
    written as they are (the consumer dead-letters them).
    """
    producer = Producer(_settings_or_usage_error(config_file, bootstrap_servers))
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    sent = 0
    try:
        for record in read_records(inputs or (STDIN,)):
            _produce(producer, topic, record.raw, message_key(record.event), on_delivery=delivered)
            sent += 1
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        left = producer.flush(_FLUSH_SECONDS)
    if failures or left:
        problem = failures[0].str() if failures else f"{left} still unacknowledged after {_FLUSH_SECONDS:.0f} s"
        raise click.ClickException(f"{len(failures) + left} of {sent} event(s) not written to {topic}: {problem}")
    stderr.print(f"Wrote {sent:,} event(s) to {topic}.")


def _produce(producer: Producer, topic: str, value: bytes, key: bytes | None, **extra: Any) -> None:
    """Produce one message, waiting while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key, **extra)
            return
        except BufferError:
            producer.poll(0.1)


# -- consume ---------------------------------------------------------------------------------------


class _Offsets:
    """For each assigned partition, which read offsets are not done yet (thread-safe).

    A message holds its offset open once per obligation (its events in the spool, its dead letter
    on the way to the topic); the position to commit is the first offset still open, or the one
    after the last read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[_Partition, dict[int, int]] = {}
        self._next: dict[_Partition, int] = {}
        self._committed: dict[_Partition, int] = {}

    def assign(self, partitions: Sequence[_Partition]) -> None:
        with self._lock:
            for partition in partitions:
                self._open.setdefault(partition, {})

    def forget(self, partitions: Sequence[_Partition]) -> None:
        with self._lock:
            for partition in partitions:
                for table in (self._open, self._next, self._committed):
                    table.pop(partition, None)

    def read(self, partition: _Partition, offset: int, holds: int) -> bool:
        """Note a message read; False if its partition is not (or no longer) assigned."""
        with self._lock:
            waiting = self._open.get(partition)
            if waiting is None:
                return False
            if holds:
                waiting[offset] = waiting.get(offset, 0) + holds
            self._next[partition] = offset + 1
            return True

    def release(self, partition: _Partition, offset: int) -> None:
        """One obligation of a message is met (ignored for a partition no longer assigned)."""
        with self._lock:
            waiting = self._open.get(partition)
            if waiting and offset in waiting:
                waiting[offset] -= 1
                if not waiting[offset]:
                    del waiting[offset]

    def to_commit(self, partitions: Sequence[_Partition] | None = None) -> list[TopicPartition]:
        """Positions gained since the last commit, of ``partitions`` (default: all assigned)."""
        with self._lock:
            found = []
            for partition in self._next if partitions is None else partitions:
                if partition not in self._next:
                    continue
                waiting = self._open[partition]
                position = next(iter(waiting)) if waiting else self._next[partition]
                if position > self._committed.get(partition, -1):
                    found.append(TopicPartition(*partition, position))
            return found

    def committed(self, positions: Sequence[TopicPartition]) -> None:
        with self._lock:
            for position in positions:
                if (position.topic, position.partition) in self._open:
                    self._committed[(position.topic, position.partition)] = position.offset


class _Worker:
    """One consumer-group member: Kafka → engine → spool → Topsort, and the commits."""

    def __init__(
        self, engine: Engine, consumer: Consumer, producer: Producer, dead_letter_topic: str, drain_timeout: float,
        spool_path: Path,
    ) -> None:
        self.engine = engine
        self.spool = Spool(spool_path, on_settled=self._on_settled)
        self.tally = Tally()
        self.dead_lettered = 0
        self._consumer = consumer
        self._producer = producer
        self._dead_letter_topic = dead_letter_topic
        self._drain_timeout = drain_timeout
        self._offsets = _Offsets()
        self._settled: list[tuple[str | None, int | None]] = []
        self._stopping = threading.Event()
        self._deadline = float("inf")
        self._reading = threading.Lock()
        self._committed_at = 0.0

    # -- signals ---------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Stop reading and deliver what was read; a second call gives up waiting for delivery."""
        if self._stopping.is_set():
            self._deadline = 0.0
            return
        self._stopping.set()
        self._deadline = time.monotonic() + self._drain_timeout
        stderr.print("Stopping: delivering what was read, then committing (signal again to stop at once).")

    # -- the reader thread: Kafka → chunks --------------------------------------------------------

    def chunks(self) -> Iterator[Chunk]:
        """Chunks of mapped messages, until :meth:`stop`."""
        while not self._stopping.is_set():
            with self._reading:
                if self._stopping.is_set():
                    return
                chunk = self._map(self._consumer.consume(_BATCH, _POLL_SECONDS))
                self._producer.poll(0)
            if chunk.inputs:
                yield chunk

    def _map(self, messages: list[Message]) -> Chunk:
        chunk = Chunk()
        for message in messages:
            if (error := message.error()) is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    stderr.print(f"[yellow]Kafka: {error.str()}[/]")
                continue
            partition, offset = (message.topic(), message.partition()), message.offset()
            record = decode_line(f"{partition[0]}/{partition[1]}", offset, message.value() or b"")
            outcome = self.engine.process_record(record)
            if not self._offsets.read(partition, offset, bool(outcome.emitted) + bool(outcome.rejected)):
                continue  # revoked meanwhile: its new owner reads it
            self.tally.add(outcome)
            if outcome.rejected:
                self._send_dead_letter(rejected_input(record, outcome), partition, offset)
            chunk.add(record, outcome.emitted)
        return chunk

    # -- rebalances --------------------------------------------------------------------------------

    def on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._offsets.assign([(p.topic, p.partition) for p in partitions])
        stderr.print(f"Assigned partitions {_names(partitions)}")

    def on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        self._commit(keys)
        self._offsets.forget(keys)
        stderr.print(f"Revoked partitions {_names(partitions)}")

    def on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._offsets.forget([(p.topic, p.partition) for p in partitions])
        stderr.print(f"[yellow]Lost partitions {_names(partitions)}; their messages are read again by their new owner[/]")

    # -- the main thread: settlements, dead letters, commits ---------------------------------------

    def _on_settled(self, inputs: list[tuple[str | None, int | None]]) -> None:
        """Spool hook: these inputs left the spool (their dead letters, if any, are in it)."""
        self._settled.extend(inputs)

    def tick(self) -> None:
        """Called by the dispatcher about five times a second."""
        self.settle()
        if time.monotonic() - self._committed_at >= _COMMIT_EVERY:
            self._commit(wait=False)
        if self._stopping.is_set() and time.monotonic() > self._deadline:
            raise _GiveUp

    def settle(self) -> None:
        """Write the spool's dead letters to the topic, then count the settled inputs as done."""
        settled, self._settled = self._settled, []
        self._producer.poll(0)
        try:
            self.dead_lettered += self.spool.take_dead_letters(self._send_dead_letters)
        except DeadLetterTopicError as exc:
            self._settled[:0] = settled
            stderr.print(f"[red]{exc}[/]")
            return
        for origin, line in settled:
            partition = _partition(origin)
            if partition and line is not None:
                self._offsets.release(partition, line)

    def finish(self) -> None:
        """After delivery ended: settle, write the last dead letters, commit, leave the group."""
        self._stopping.set()
        acquired = self._reading.acquire(timeout=5.0)
        try:
            self.settle()
            self._producer.flush(_FLUSH_SECONDS)
            self._commit()
            self._consumer.close()
        finally:
            if acquired:
                self._reading.release()

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """An asynchronous commit ended (served on the reader thread)."""
        if error is not None:
            self._offsets.committed([TopicPartition(p.topic, p.partition, -1) for p in partitions])
            stderr.print(f"[yellow]Kafka: commit not done ({error.str()}); retried[/]")

    def _commit(self, partitions: Sequence[_Partition] | None = None, *, wait: bool = True) -> None:
        """Commit the done positions; without ``wait`` the main loop is not held up by the broker."""
        self._committed_at = time.monotonic()
        positions = self._offsets.to_commit(partitions)
        if not positions:
            return
        try:
            self._consumer.commit(offsets=positions, asynchronous=not wait)
        except KafkaException as exc:
            self.on_commit(exc.args[0], positions)
            return
        self._offsets.committed(positions)

    # -- dead letters ------------------------------------------------------------------------------

    def _send_dead_letter(self, record: dict[str, Any], partition: _Partition, offset: int) -> None:
        """Produce a map or decode dead letter; its offset is released once the topic has it."""

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                self.dead_lettered += 1
                self._offsets.release(partition, offset)
            else:
                stderr.print(f"[red]Dead letter of {partition[0]}/{partition[1]}@{offset} not written:"
                             f" {error.str()}; its offset stays uncommitted[/]")

        self._produce_dead_letter(record, on_delivery=delivered)

    def _send_dead_letters(self, records: list[dict[str, Any]]) -> None:
        """Produce ``deliver`` dead letters from the spool and wait until the topic has them all."""
        failures: list[KafkaError] = []
        for record in records:
            self._produce_dead_letter(
                record, on_delivery=lambda error, _m: failures.append(error) if error is not None else None
            )
        left = self._producer.flush(_FLUSH_SECONDS)
        if failures or left:
            problem = failures[0].str() if failures else "no acknowledgement in time"
            raise DeadLetterTopicError(
                f"{len(records)} dead letter(s) not written to {self._dead_letter_topic} ({problem});"
                " kept in the spool and written again"
            )

    def _produce_dead_letter(self, record: dict[str, Any], **extra: Any) -> None:
        reason = "; ".join(f"{r.get('path')}: {r.get('reason')}" for r in record["rejected"])
        headers = [
            (HEADER_PREFIX + "stage", record["stage"]),
            (HEADER_PREFIX + "reason", reason[:2000]),
            (HEADER_PREFIX + "origin", str(record.get("origin"))),
            (HEADER_PREFIX + "offset", str(record.get("line"))),
        ]
        key = message_key(record.get("event"))
        _produce(self._producer, self._dead_letter_topic, orjson.dumps(record), key, headers=headers, **extra)


class _GiveUp(Exception):
    """Stopping: the drain timeout passed (or a second signal came)."""


def _partition(origin: str | None) -> _Partition | None:
    topic, _, number = (origin or "").rpartition("/")
    return (topic, int(number)) if topic and number.isdigit() else None


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "(none)"


@click.command("consume")
@click.option("--topic", required=True, help="The topic of Segment events (JSON, one per message).")
@click.option("--group", required=True, help="The consumer group: workers in one group share the partitions.")
@click.option("--dead-letter-topic", metavar="TOPIC",
              help="Where rejected and undeliverable events go, as dead-letter records. Default: TOPIC.dead-letters.")
@_kafka_options
@rules_option
@click.option("--endpoint", envvar="TOPSORT_ENDPOINT", required=True, metavar="URL",
              help="Topsort's base URL, e.g. https://api.topsort.com (or TOPSORT_ENDPOINT).")
@click.option("--spool", "spool_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("segment-topsort-consume.spool"), show_default=True,
              help="This worker's own SQLite spool (one per worker; keep it on the worker's disk).")
@delivery_tuning
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds to go on delivering what was read before committing and leaving.")
def consume_command(
    topic: str, group: str, dead_letter_topic: str | None, config_file: Path | None, bootstrap_servers: str | None,
    rule_dirs: tuple[Path, ...], endpoint: str, spool_path: Path, max_in_flight: int, max_latency: float,
    max_retry_time: float, timeout: float, drain_timeout: float,
) -> None:
    """Consume Segment events from TOPIC as a member of GROUP and deliver them to Topsort.

    The Topsort key comes from TOPSORT_API_KEY. Offsets are committed once the events up to them
    are delivered or dead-lettered (at least once; Topsort deduplicates by event id).
    """
    api_key = api_key_or_exit(None, "consume needs the Topsort API key in TOPSORT_API_KEY")
    if not endpoint.startswith(("http://", "https://")):
        raise click.UsageError(f"--endpoint must be an http:// or https:// URL, not {endpoint!r}")
    settings = _settings_or_usage_error(config_file, bootstrap_servers)
    try:
        engine = Engine.from_folders(*rule_dirs)
    except EngineError as exc:
        raise click.ClickException(f"{exc}\nRun `segment-topsort check` for details.") from None
    dead_letter_topic = dead_letter_topic or f"{topic}.dead-letters"
    consumer = Consumer(
        {"auto.offset.reset": "earliest", **settings, "group.id": group,
         "enable.auto.commit": False, "enable.auto.offset.store": False,
         "on_commit": lambda error, partitions: worker.on_commit(error, partitions)}
    )
    try:
        worker = _Worker(engine, consumer, Producer(settings), dead_letter_topic, drain_timeout, spool_path)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    spool = worker.spool
    dispatcher = Dispatcher(
        spool, endpoint=endpoint, api_key=api_key, max_in_flight=max_in_flight, max_latency=max_latency,
        timeout=timeout, policy=RetryPolicy(max_elapsed=max_retry_time),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, worker.stop)
    consumer.subscribe([topic], on_assign=worker.on_assign, on_revoke=worker.on_revoke, on_lost=worker.on_lost)
    stderr.print(f"Consuming {topic} in group {group} from {settings['bootstrap.servers']};"
                 f" delivering to {endpoint}; dead letters to {dead_letter_topic}")
    failure: Exception | None = None
    with spool:
        try:
            dispatcher.run(worker.chunks(), worker.tick)
        except _GiveUp:
            failure = None
        except (DeliveryError, KafkaException, OSError) as exc:
            failure = exc
        finally:
            worker.finish()
            stats = dispatcher.stats
            stderr.print(worker.tally.table("consume", extra={
                "Topsort events delivered": stats.delivered, "requests sent": stats.requests,
                "retried": stats.retries, f"dead letters to {dead_letter_topic}": worker.dead_lettered,
                "left in the spool": spool.unsent,
            }))
    if failure:
        raise click.ClickException(str(failure))
