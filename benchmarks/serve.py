"""``serve`` under load: accepted events/s and request latency, mapping in-process against in worker processes.

    .venv/bin/python -m benchmarks.serve [--seconds 8] [--clients 8] [--batch 100] [--load 0.5 --load 0.8]
                                         [--rounds 2] [--workers 2]

``serve`` runs in a process of its own (spool on, default durability) delivering into the sandbox in
another; this process drives it over loopback with ``--clients`` keep-alive connections, posting
benchmark corpus events as Segment's libraries do: batch bodies of ``--batch`` events to ``/v1/batch``
with the write key in Basic auth, as analytics-python sends them, and single events to analytics.js's
short paths (``/v1/t``, ``/v1/p``…, ``text/plain`` with ``writeKey`` inside). Every request carries fresh
messageIds, so nothing is dropped as a repeat. Each workload runs at saturation (every client posts
again as soon as it is answered) and then at fixed offered loads (each ``--load`` × what ``serve`` mapping
in-process accepted at saturation in that round, requests spaced evenly; latency counts from when a
request was due, so a server that falls behind is charged for the wait). Both ``serve`` processes run
from the start, and each phase runs in one right after the other (in turn first), so each ratio comes
from back-to-back runs on a shared machine. Between phases the spool is left to empty.

Printed per round, workload, load and mode: accepted events/s (events of 200 answers), p50 and p99
latency of 200 answers, refusals (503 once ``--max-spooled`` events wait), and the CPU spent per 1 000
accepted events by ``serve``'s main process (+ its worker processes), the sandbox and the clients; then
the ratios of ``--workers N`` to in-process, median over rounds. The mode with workers runs only when
``serve`` has ``--workers``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import generate  # noqa: E402
from benchmarks.delivery import KEY, start_sandbox  # noqa: E402

_TOKEN = b"@@serve-bench@@"
"""Stands for a request's unique part in every messageId of a body template (same length as its replacement)."""
_WRITE_KEY = "wkBench0123456789"
_SHORT_PATHS = {"track": "t", "page": "p", "screen": "s", "identify": "i", "group": "g", "alias": "a"}
_DRAIN_TIMEOUT = 180.0
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Workload:
    """Requests of one kind: their templates (head and body, ``_TOKEN`` where ids differ) and events each."""

    name: str
    templates: list[bytes]
    events: list[int]


@dataclass
class Phase:
    """What one phase measured, as the clients saw it and as ``serve`` spent CPU on it."""

    seconds: float = 0.0
    accepted: int = 0
    latencies: list[float] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)
    parent_cpu: float = 0.0
    workers_cpu: float = 0.0
    sandbox_cpu: float = 0.0
    clients_cpu: float = 0.0
    offered: float | None = None
    """Events/s offered (None: saturation)."""

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each measured phase.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent keep-alive connections.")
    parser.add_argument("--batch", type=int, default=100, help="Events per batch body (analytics-python: 100).")
    parser.add_argument("--load", type=float, action="append",
                        help="A fixed offered load, as a share of in-process serve's accepted events/s at saturation"
                             " (repeatable; default 0.5 and 0.8).")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes of the other mode.")
    parser.add_argument("--rounds", type=int, default=2,
                        help="Rounds, each phase run back to back in both modes, first in one, then in the other.")
    parser.add_argument("--corpus-events", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loads = args.load or [0.5, 0.8]

    events = list(generate(args.corpus_events, args.seed))
    workloads = [_batches(events, args.batch), _singles(events)]
    has_workers = b"--workers" in subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--help"], capture_output=True, cwd=ROOT).stdout
    modes = {"in-process": ["--workers", "1"] if has_workers else []}
    if has_workers:
        modes[f"--workers {args.workers}"] = ["--workers", str(args.workers)]
    else:
        print("serve has no --workers: measuring it in-process only", file=sys.stderr)
    print(f"{os.cpu_count()} cores, usable {len(os.sched_getaffinity(0))}; load average {_load()} at the start "
          f"(the machine may be shared); {args.clients} clients, {args.seconds:g} s per phase")
    ids = itertools.count()
    results: dict[tuple[int, str, str, str], Phase] = {}
    with tempfile.TemporaryDirectory(prefix="segment-topsort-serve-bench-") as tmp, ExitStack() as running:
        url, sandbox = start_sandbox()
        running.callback(_stop, sandbox)
        serves = {mode: running.enter_context(_Serve(Path(tmp) / f"serve-{n}", url, flags))
                  for n, (mode, flags) in enumerate(modes.items())}
        for serve in serves.values():
            _run_phase(serve, workloads[0], args.clients, 2.0, None, ids)  # warm up, not counted
            serve.drain()
        for number in range(args.rounds):
            order = list(serves.items())[::-1 if number % 2 else 1]  # each phase back to back in both, alternating
            saturated: dict[str, float] = {}
            for workload in workloads:
                for mode, serve in order:
                    results[number, workload.name, "saturation", mode] = phase = _measured(
                        serve, sandbox.pid, workload, args.clients, args.seconds, None, ids)
                    if mode == "in-process":
                        saturated[workload.name] = phase.rate
            for workload, share in itertools.product(workloads, loads):
                rate = saturated[workload.name] * share
                for mode, serve in order:
                    results[number, workload.name, f"{share:g} × saturation", mode] = phase = _measured(
                        serve, sandbox.pid, workload, args.clients, args.seconds, rate, ids)
                    phase.offered = rate
            print(f"  round {number + 1} done; load average {_load()}", file=sys.stderr)
    _print(results, list(modes), f"load average {_load()} at the end")


# -- the requests ---------------------------------------------------------------------------------


def _batches(events: list[dict], size: int) -> Workload:
    """Batch bodies as analytics-python posts them: ``{"batch": [...], "sentAt"}``, Basic auth, JSON."""
    auth = base64.b64encode(f"{_WRITE_KEY}:".encode()).decode()
    head = ("POST /v1/batch HTTP/1.1\r\nHost: serve\r\nUser-Agent: analytics-python/2.3.3\r\n"
            f"Content-Type: application/json\r\nAuthorization: Basic {auth}\r\n")
    templates, counts = [], []
    for start in range(0, len(events) - size + 1, size):
        batch = [_as_sent(event, f"{start + n}") for n, event in enumerate(events[start:start + size])]
        body = orjson.dumps({"batch": batch, "sentAt": batch[-1]["timestamp"]})
        templates.append(_request(head, body))
        counts.append(len(batch))
    return Workload(f"batch of {size} (analytics-python)", templates, counts)


def _singles(events: list[dict]) -> Workload:
    """Single events as analytics.js posts them: its short path, ``text/plain``, ``writeKey`` inside."""
    templates = []
    for number, event in enumerate(events):
        message = {**_as_sent(event, str(number)), "writeKey": _WRITE_KEY, "sentAt": event.get("sentAt")}
        path = _SHORT_PATHS.get(message.get("type"), "t")
        head = (f"POST /v1/{path} HTTP/1.1\r\nHost: serve\r\nOrigin: https://shop.example\r\n"
                "Content-Type: text/plain\r\n")
        templates.append(_request(head, orjson.dumps(message)))
    return Workload("single event (analytics.js)", templates, [1] * len(templates))


def _as_sent(event: dict, number: str) -> dict:
    """The event as a client library sends it: no server-side fields, a messageId unique per request."""
    message = {k: v for k, v in event.items() if k not in ("receivedAt", "sentAt", "writeKey", "_metadata")}
    message["messageId"] = f"{_TOKEN.decode()}-{number}"
    return message


def _request(head: str, body: bytes) -> bytes:
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _fresh(template: bytes, ids: Iterator[int]) -> bytes:
    return template.replace(_TOKEN, b"r%014d" % next(ids))


# -- the server under test -------------------------------------------------------------------------


class _Serve:
    """``segment-topsort serve`` in a process of its own, delivering to ``url``."""

    def __init__(self, folder: Path, url: str, flags: list[str]) -> None:
        folder.mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._log = folder / "serve.log"
        command = [sys.executable, "-m", "engine", "serve", "--port", str(self.port), "--endpoint", url,
                   "--spool", str(folder / "serve.spool"), "--dead-letters", str(folder / "dead.ndjson"), *flags]
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TOPSORT_API_KEY": KEY},
                                             stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Serve:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self._process.kill()
        raise SystemExit(f"serve did not start:\n{self._log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        _stop(self._process)

    def drain(self) -> None:
        """Wait until the spool is empty, so one phase's delivery does not load the next."""
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            answer = httpx.get(f"{self.url}/healthz")
            if answer.status_code == 200 and answer.json()["spooled"] == 0:
                return
            time.sleep(0.2)
        raise SystemExit(f"serve's spool did not empty within {_DRAIN_TIMEOUT:g} s:\n{self._log.read_text()[-2000:]}")

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of serve's main process and of its child processes (the workers)."""
        pid = self._process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return _cpu_seconds(pid), sum(_cpu_seconds(int(child)) for child in children)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # a worker that ended meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


# -- the clients ----------------------------------------------------------------------------------


def _measured(serve: _Serve, sandbox: int, workload: Workload, clients: int, seconds: float, rate: float | None,
              ids: Iterator[int]) -> Phase:
    """A phase, with the CPU that serve, the sandbox and the clients spent on it (the spool's delivery included)."""
    (parent, workers), delivered, own = serve.cpu(), _cpu_seconds(sandbox), time.process_time()
    phase = _run_phase(serve, workload, clients, seconds, rate, ids)
    phase.clients_cpu = time.process_time() - own
    serve.drain()
    parent_after, workers_after = serve.cpu()
    phase.parent_cpu, phase.workers_cpu = parent_after - parent, workers_after - workers
    phase.sandbox_cpu = _cpu_seconds(sandbox) - delivered
    return phase


def _run_phase(serve: _Serve, workload: Workload, clients: int, seconds: float, rate: float | None,
               ids: Iterator[int]) -> Phase:
    """Post ``workload`` for ``seconds``: back to back (``rate`` None) or ``rate`` events/s spaced evenly."""
    return asyncio.run(_drive(serve.port, workload, clients, seconds, rate, ids))


async def _drive(port: int, workload: Workload, clients: int, seconds: float, rate: float | None,
                 ids: Iterator[int]) -> Phase:
    phase = Phase()
    started = time.monotonic()
    deadline = started + seconds
    mean_events = sum(workload.events) / len(workload.events)
    interval = mean_events / rate if rate else 0.0
    slots = itertools.count()
    requests = itertools.cycle(range(len(workload.templates)))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                due = started + next(slots) * interval if rate else time.monotonic()
                if due >= deadline:
                    return
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                index = next(requests)
                writer.write(_fresh(workload.templates[index], ids))
                status, body = await _answer(reader)
                if status == 200:
                    phase.latencies.append(time.monotonic() - due)
                    phase.accepted += orjson.loads(body)["accepted"]
                else:
                    phase.refused[status] = phase.refused.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    phase.seconds = time.monotonic() - started
    return phase


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head[9:12]), await reader.readexactly(length)


# -- the report -----------------------------------------------------------------------------------


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _print(results: dict[tuple[int, str, str, str], Phase], modes: list[str], footer: str) -> None:
    print(f"\n{'round':<6}{'workload':<32}{'load (offered ev/s)':<28}{'serve':<13}{'accepted ev/s':>14}{'p50 ms':>9}"
          f"{'p99 ms':>9}{'refused':>9}{'serve CPU':>12}{'sandbox':>9}{'clients':>9}")
    for (number, workload, load, mode), phase in results.items():
        per = 1e6 / phase.accepted if phase.accepted else float("nan")
        cpu = f"{phase.parent_cpu * per:.0f}" + (f" + {phase.workers_cpu * per:.0f}" if phase.workers_cpu else "")
        offered = f"{load} ({phase.offered:,.0f})" if phase.offered else load
        print(f"{number + 1:<6}{workload:<32}{offered:<28}{mode:<13}{phase.rate:>14,.0f}{phase.percentile(0.5):>9.1f}"
              f"{phase.percentile(0.99):>9.1f}{sum(phase.refused.values()):>9}{cpu:>12}{phase.sandbox_cpu * per:>9.0f}"
              f"{phase.clients_cpu * per:>9.0f}")
    print(f"\n{footer}; CPU in ms per 1 000 accepted events: serve's main process (+ its workers), the sandbox"
          " (Topsort's stand-in) and this process's clients, each while the phase ran and its spool emptied")
    if len(modes) < 2:
        return
    base, other = modes
    ratios: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for (number, workload, load, mode), phase in results.items():
        if mode == other:
            ref = results[number, workload, load, base]
            ratios.setdefault((workload, load), []).append((
                phase.rate / ref.rate, phase.percentile(0.5) / ref.percentile(0.5),
                phase.percentile(0.99) / ref.percentile(0.99)))
    print(f"\n{other} / {base}, median over rounds (each round's ratios in brackets)")
    print(f"{'workload':<32}{'load':<28}{'accepted ev/s':>24}{'p50':>24}{'p99':>24}")
    for (workload, load), rows in ratios.items():
        cells = [f"{statistics.median(column):.2f} [{' '.join(f'{x:.2f}' for x in column)}]" for column in zip(*rows)]
        print(f"{workload:<32}{load:<28}" + "".join(f"{cell:>24}" for cell in cells))

if __name__ == "__main__":
    main()
