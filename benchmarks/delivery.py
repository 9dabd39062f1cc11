"""Delivery throughput: a spool of impressions drained into the sandbox over loopback.

    .venv/bin/python benchmarks/delivery.py [--events 100000] [--rounds 3] [--in-flight 8]

The sandbox runs in a process of its own (as Topsort would be elsewhere), so the figure is the
client's: reading the spool, building bodies of 50 impressions, 8 requests in flight, each on a
keep-alive connection of its own, settling outcomes in SQLite. Spool filling is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.standin import start_server  # noqa: E402
from engine.delivery.dispatch import Dispatcher  # noqa: E402
from engine.mapping import Mapped, encode_events  # noqa: E402
from engine.outcome import Emitted  # noqa: E402
from engine.record import Record  # noqa: E402
from engine.delivery.spool import Chunk, Spool  # noqa: E402

KEY = "sk_bench_0123456789"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()

    url, server = start_sandbox()
    try:
        rates = [_round(url, args.events, args.in_flight, n) for n in range(args.rounds)]
        stats = httpx.get(f"{url}/_sandbox/stats").json()
        print(f"sandbox accepted {stats['events_accepted']:,} events in {stats['requests'].get('204', 0):,} requests")
        print(f"delivered events/s: median {statistics.median(rates):,.0f}, best {max(rates):,.0f}")
    finally:
        server.terminate()
        server.wait()


def _round(url: str, count: int, in_flight: int, number: int) -> float:
    with tempfile.TemporaryDirectory() as folder, Spool(Path(folder) / "bench.spool") as spool:
        chunk = Chunk()
        for n in range(count):
            segment = {"type": "track", "event": "Product Viewed", "messageId": f"r{number}-{n}"}
            event = {
                "id": f"r{number}-{n}",
                "occurredAt": "2026-11-27T10:00:00Z",
                "opaqueUserId": f"anon-{n % 997}",
                "resolvedBidId": f"bid-{n}",
                "placement": {"path": "/search", "position": n % 20 + 1},
            }
            events = encode_events([Emitted("impressions", "product-viewed", event)])
            chunk.add_mapped(Record("bench", n + 1, orjson.dumps(segment), event=segment),
                             Mapped(segment["messageId"], "emitted", events, (), None))
        spool.commit(chunk)
        dispatcher = Dispatcher(spool, endpoint=url, api_key=KEY, max_in_flight=in_flight)
        cpu, started = time.process_time(), time.perf_counter()
        stats = dispatcher.run()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert stats.delivered == count and stats.failed == 0, stats
    rate = count / elapsed
    print(f"round {number + 1}: {count:,} events in {stats.requests:,} requests, {elapsed:.2f} s:"
          f" {rate:,.0f} events/s, client CPU {cpu / stats.requests * 1000:.2f} ms per request")
    return rate


def start_sandbox() -> tuple[str, subprocess.Popen[bytes]]:
    """``segment-topsort sandbox`` in a process of its own, accepting :data:`KEY`: its URL and process."""
    return start_server(lambda port: [sys.executable, "-m", "engine", "sandbox", "--port", str(port)],
                        {**os.environ, "TOPSORT_API_KEY": KEY})


if __name__ == "__main__":
    main()
