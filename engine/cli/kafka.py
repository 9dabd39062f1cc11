"""``segment-topsort consume`` and ``produce``: Segment events through Kafka, delivered to Topsort.

``consume`` is one worker of a consumer group (:class:`~engine.ingest.kafka.worker.KafkaWorker`). It maps
each message (one Segment event, JSON) and delivers the results through the same spool and
:class:`~engine.delivery.dispatch.Dispatcher` as ``run``; rejected events go to a dead-letter topic.
Delivery is at least once: a partition's offset is committed only up to the first message whose
Topsort events are not all settled in the spool (delivered, or dead-lettered) or whose dead letter
the topic has not yet acknowledged; about once a second, when partitions are revoked, and on
shutdown (SIGTERM, SIGINT). Messages read again after a crash or a rebalance keep their event ids,
which Topsort deduplicates. Settings: :mod:`engine.ingest.kafka.settings`.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from ..delivery.pipeline import DeliveryTarget
from ..delivery.retry import RetryPolicy
from ..errors import DeliveryError, EngineError, InputError, KafkaSetupError
from ..ingest.files import STDIN, read_records
from ..ingest.kafka.settings import ENV_PREFIX, kafka_settings, message_key, produce, producer_settings
from ..ingest.kafka.worker import KafkaWorker
from ..reports.summary import Tally
from ..workers import make_mapper
from .options import (
    stderr,
    EXIT_INPUT_SKIPPED, api_key_file_option, api_key_or_exit, delivery_tuning, endpoint_option, endpoint_or_exit,
    engine_or_exit, report_fault, rules_option, workers_option,
)

_FLUSH_SECONDS = 30.0


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


# -- produce ---------------------------------------------------------------------------------------


@click.command("produce")
@click.argument("inputs", nargs=-1)
@click.option("--topic", required=True, help="The topic to write Segment events to.")
@_kafka_options
def produce_command(inputs: tuple[str, ...], topic: str, config_file: Path | None, bootstrap_servers: str | None) -> None:
    """Write Segment events from files, folders, archives or - (stdin, the default) to a Kafka topic.

    One event per message, keyed by anonymousId, else userId; lines that are not JSON are
    written as they are (the consumer dead-letters them). A file that cannot be read to its end is
    reported and the next one is read; the command then exits 3.
    """
    producer = Producer(producer_settings(_settings_or_usage_error(config_file, bootstrap_servers)))
    failures: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error)

    sent = 0
    tally = Tally()
    try:
        for record in read_records(inputs or (STDIN,), on_fault=partial(report_fault, stderr, tally)):
            produce(producer, topic, record.raw, message_key(record.event), on_delivery=delivered)
            sent += 1
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        left = producer.flush(_FLUSH_SECONDS)
    if failures or left:
        problem = failures[0].str() if failures else f"{left} still unacknowledged after {_FLUSH_SECONDS:.0f} s"
        raise click.ClickException(f"{len(failures) + left} of {sent} event(s) not written to {topic}: {problem}")
    stderr.print(f"Wrote {sent:,} event(s) to {topic}.")
    if tally.faults:
        sys.exit(EXIT_INPUT_SKIPPED)


# -- consume ---------------------------------------------------------------------------------------


@click.command("consume")
@click.option("--topic", required=True, help="The topic of Segment events (JSON, one per message).")
@click.option("--group", required=True, help="The consumer group: workers in one group share the partitions.")
@click.option("--dead-letter-topic", metavar="TOPIC",
              help="Where rejected and undeliverable events go, as dead-letter records. Default: TOPIC.dead-letters.")
@_kafka_options
@rules_option
@endpoint_option(required=True)
@api_key_file_option
@click.option("--spool", "spool_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("segment-topsort-consume.spool"), show_default=True,
              help="This worker's own SQLite spool (one per worker; keep it on the worker's disk).")
@delivery_tuning
@workers_option
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds to go on delivering what was read before committing and leaving.")
def consume_command(
    topic: str, group: str, dead_letter_topic: str | None, config_file: Path | None, bootstrap_servers: str | None,
    rule_dirs: tuple[Path, ...], endpoint: str, api_key_file: Path | None, spool_path: Path, max_in_flight: int, max_latency: float,
    max_retry_time: float, timeout: float, workers: int, drain_timeout: float,
) -> None:
    """Consume Segment events from TOPIC as a member of GROUP and deliver them to Topsort.

    The Topsort key comes from TOPSORT_API_KEY or --api-key-file. Offsets are committed once the events up to them
    are delivered or dead-lettered (at least once; Topsort deduplicates by event id).
    """
    api_key = api_key_or_exit(api_key_file, "consume needs Topsort's API key: set TOPSORT_API_KEY or pass --api-key-file")
    endpoint_or_exit(endpoint)
    settings = _settings_or_usage_error(config_file, bootstrap_servers)
    engine = engine_or_exit(rule_dirs)
    dead_letter_topic = dead_letter_topic or f"{topic}.dead-letters"
    mapper = make_mapper(engine, workers, start=True)  # forked before librdkafka and delivery start threads
    try:
        worker = KafkaWorker(mapper, settings, topic=topic, group=group, dead_letter_topic=dead_letter_topic,
                             spool_path=spool_path, drain_timeout=drain_timeout)
    except (EngineError, KafkaException) as exc:
        mapper.close()
        raise click.ClickException(str(exc)) from None
    spool = worker.spool
    dispatcher = DeliveryTarget(endpoint, api_key, max_in_flight, max_latency, timeout,
                                RetryPolicy(max_elapsed=max_retry_time)).dispatcher(spool)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, worker.stop)
    stderr.print(f"Consuming {topic} in group {group} from {settings['bootstrap.servers']};"
                 f" delivering to {endpoint}; dead letters to {dead_letter_topic}")
    failure: Exception | None = None
    with spool:
        try:
            worker.run(dispatcher)
        except (DeliveryError, KafkaException, OSError) as exc:
            failure = exc
        finally:
            mapper.close()
            stats = dispatcher.stats
            stderr.print(worker.tally.table("consume", extra={
                "Topsort events delivered": stats.delivered, "requests sent": stats.requests,
                "retried": stats.retries, f"dead letters to {dead_letter_topic}": worker.dead_lettered,
                "left in the spool": spool.unsent,
            }))
    if failure:
        raise click.ClickException(str(failure))
