"""librdkafka settings for ``consume`` and ``produce``, split between consumer and producer.

Settings come from a ``--config`` file (``name=value`` properties, or a YAML/JSON mapping for
``.yaml``, ``.yml``, ``.json``), overridden by ``SEGMENT_TOPSORT_KAFKA_<NAME>`` environment
variables (``SEGMENT_TOPSORT_KAFKA_SASL_PASSWORD`` is ``sasl.password``), overridden by
``--bootstrap-servers`` (or ``KAFKA_BOOTSTRAP_SERVERS``). Values are never printed. A consumer
property is not given to the producer and the other way round (librdkafka would warn about each).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer

from ...errors import KafkaSetupError

ENV_PREFIX = "SEGMENT_TOPSORT_KAFKA_"
"""Environment variables with this prefix are librdkafka settings: ``_`` stands for ``.``."""
_YAML_SUFFIXES = (".yaml", ".yml", ".json")

CONSUMER_ONLY = frozenset({
    "group.id", "group.instance.id", "group.protocol", "group.protocol.type", "group.remote.assignor",
    "partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms",
    "coordinator.query.interval.ms", "enable.auto.commit", "auto.commit.interval.ms", "enable.auto.offset.store",
    "auto.offset.reset", "queued.min.messages", "queued.max.messages.kbytes", "fetch.wait.max.ms",
    "fetch.queue.backoff.ms", "fetch.message.max.bytes", "max.partition.fetch.bytes", "fetch.max.bytes",
    "fetch.min.bytes", "fetch.error.backoff.ms", "isolation.level", "enable.partition.eof", "check.crcs",
})
"""librdkafka's consumer properties (``C`` in its CONFIGURATION.md) that users set."""
PRODUCER_ONLY = frozenset({
    "transactional.id", "transaction.timeout.ms", "enable.idempotence", "enable.gapless.guarantee",
    "queue.buffering.max.messages", "queue.buffering.max.kbytes", "queue.buffering.max.ms", "linger.ms",
    "message.send.max.retries", "retries", "compression.codec", "compression.type", "compression.level",
    "batch.num.messages", "batch.size", "delivery.report.only.error", "sticky.partitioning.linger.ms",
    "request.required.acks", "acks", "request.timeout.ms", "message.timeout.ms", "delivery.timeout.ms",
    "partitioner",
})
"""librdkafka's producer properties (``P`` in its CONFIGURATION.md) that users set."""


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


def consumer_settings(
    settings: Mapping[str, str], group: str, on_commit: Callable[..., None]
) -> dict[str, Any]:
    """A consumer of ``group`` that commits only when told to (offsets given explicitly)."""
    mine = {name: value for name, value in settings.items() if name not in PRODUCER_ONLY}
    return {"auto.offset.reset": "earliest", **mine, "group.id": group, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "on_commit": on_commit}


def producer_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """The settings that concern a producer."""
    return {name: value for name, value in settings.items() if name not in CONSUMER_ONLY}


def message_key(event: Any) -> bytes | None:
    """A message's key: the event's ``anonymousId``, else its ``userId``, so a user's events share a partition."""
    if isinstance(event, dict):
        for field in ("anonymousId", "userId"):
            value = event.get(field)
            if value is not None and value != "":
                return str(value).encode()
    return None


def produce(producer: Producer, topic: str, value: bytes, key: bytes | None, **extra: Any) -> None:
    """Produce one message, waiting while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key, **extra)
            return
        except BufferError:
            producer.poll(0.1)


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
