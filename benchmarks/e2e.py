"""End to end, every core: ``map``, ``run`` and ``consume`` as whole processes, against ``map --workers 1``.

    .venv/bin/python -m benchmarks.e2e [--events 100000] [--rounds 2] [--rss-events 1000000] [--skip-kafka]

On the benchmark corpus in stream order, in one run: ``map --workers 1`` and ``map --workers 2`` to
/dev/null, ``run`` (``--workers 2`` when it has the option) into a loopback Topsort stand-in in its own process
(:mod:`benchmarks.standin`: answers 204 without the sandbox's schema checks; spool on, default durability), and one ``consume`` worker from a pre-filled topic on the Tansu test broker; each as
events/s of the whole process (start-up included) and as a ratio to ``map --workers 1``. Commands
alternate round by round and the best round is kept, since the machine may be shared. Then where the
time goes: the cost per event of each stage, in the process that pays it, and the CPU seconds of the
parent and of the worker processes of ``map --workers 2``; and the peak RSS of ``map --workers 2`` over
``--rss-events`` events (parent, and the largest worker).
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import write_ndjson  # noqa: E402
from benchmarks.delivery import KEY  # noqa: E402
from benchmarks.standin import start_standin  # noqa: E402
from engine import Engine  # noqa: E402
from engine.delivery.dead_letters import rejected_input  # noqa: E402
from engine.delivery.dispatch import Dispatcher  # noqa: E402
from engine.delivery.pipeline import Source  # noqa: E402
from engine.delivery.spool import Chunk, Spool  # noqa: E402
from engine.cli.main import _MapOutput  # noqa: E402
from engine.ingest.files import read_blocks, read_records, read_source  # noqa: E402
from engine.limits import too_deep  # noqa: E402
from engine.mapping import InProcessMapper  # noqa: E402
from engine.record import decode  # noqa: E402
from engine.reports.summary import Tally  # noqa: E402
from engine.workers import (  # noqa: E402
    SLICE, _pack_part, _parts, _pieces, _start_worker, _summarize_part,
)

_MEASURED = (
    "import json, os, resource, sys\n"
    "def _report():\n"
    "    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "    status = open('/proc/self/status').read()\n"
    "    peak = int(status.split('VmHWM:')[1].split()[0])\n"
    "    with open(os.environ['E2E_USAGE'], 'w') as out:\n"
    "        json.dump({'parent_cpu': own.ru_utime + own.ru_stime, 'workers_cpu': kids.ru_utime + kids.ru_stime,\n"
    "                   'parent_rss_kib': peak, 'worker_rss_kib': kids.ru_maxrss}, out)\n"
    "import atexit; atexit.register(_report)\n"
    "from engine.cli.main import main\n"
    "main(sys.argv[1:], prog_name='segment-topsort')\n"
)
"""Runs the command line in a process that writes its own and its workers' CPU time and peak RSS (its
own from VmHWM: ``ru_maxrss`` keeps the high-water mark of the process it was spawned from)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage-events", type=int, default=20_000, help="Events of the per-stage table.")
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-kafka", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="segment-topsort-e2e-") as tmp:
        folder = Path(tmp)
        corpus = folder / "corpus.ndjson"
        write_ndjson(corpus, args.events, args.seed)
        print(f"corpus: {args.events:,} events in stream order (seed {args.seed}); {os.cpu_count()} cores, "
              f"usable {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f} (the machine may be shared)")
        url, standin = start_standin(KEY)
        try:
            rates, usage = _commands(folder, corpus, url, args)
            stages = _stages(corpus, folder, url, args.stage_events)
        finally:
            standin.terminate()
            standin.wait()
        rss = None if args.skip_rss else _peak_rss(folder, args.rss_events, args.seed)
    _print(rates, usage, stages, rss, args)


def _commands(folder: Path, corpus: Path, url: str, args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    run_has_workers = b"--workers" in subprocess.run(
        [sys.executable, "-m", "engine", "run", "--help"], capture_output=True, cwd=ROOT).stdout
    run_name = "run --workers 2" if run_has_workers else "run (no --workers yet: one process)"
    commands: dict[str, Callable[[int], list[str]]] = {
        "map --workers 1": lambda n: ["map", str(corpus), "--workers", "1"],
        "map --workers 2": lambda n: ["map", str(corpus), "--workers", "2"],
        run_name: lambda n: ["run", str(corpus), "--endpoint", url, "--spool", str(folder / f"run-{n}.spool"),
                             "--dead-letters", str(folder / f"dead-{n}.ndjson"),
                             *(["--workers", "2"] if run_has_workers else [])],
    }
    best: dict[str, float] = {}
    usage: dict[str, dict[str, float]] = {}
    for number in range(args.rounds):
        for name, command in commands.items():
            elapsed, used = _timed(command(number), folder)
            if elapsed < best.get(name, float("inf")):
                best[name], usage[name] = elapsed, used
            print(f"  round {number + 1}: {name}: {elapsed:.2f} s", file=sys.stderr)
    rates = {name: args.events / seconds for name, seconds in best.items()}
    if not args.skip_kafka:
        rates["consume (one worker)"] = _consume(folder, corpus, url, args)
    return rates, usage


def _timed(command: list[str], folder: Path) -> tuple[float, dict[str, float]]:
    usage = folder / "usage.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _MEASURED, *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "TOPSORT_API_KEY": KEY, "E2E_USAGE": str(usage)})
    return time.perf_counter() - started, orjson.loads(usage.read_bytes())


def _consume(folder: Path, corpus: Path, url: str, args: argparse.Namespace) -> float:
    from benchmarks.kafka import _consume_rate, _fill, _start_broker

    lines = corpus.read_bytes().splitlines()
    engine = Engine.from_folders()
    expected = sum(len(m.events) for m in InProcessMapper(engine).map(list(read_records([corpus], decoded=False))))
    broker, process = _start_broker()
    try:
        best = 0.0
        for number in range(args.rounds):
            topic = f"e2e-{number}"
            _fill(broker, topic, 4, lines)
            best = max(best, _consume_rate(broker, topic, url, expected, len(lines), folder / f"{topic}.spool"))
        return best
    finally:
        process.terminate()
        process.wait()


def _stages(corpus: Path, folder: Path, url: str, count: int) -> list[tuple[str, str, float]]:
    """µs per input event of each stage, measured one stage at a time in this process."""
    engine = Engine.from_folders()
    _start_worker(engine, os.getppid())
    rows: list[tuple[str, str, float]] = []

    def stage(name: str, process: str, work: Callable[[], Any]) -> Any:
        gc.collect()
        gc.disable()  # the stages hold every event at once, which a stream never does: no collector walking them
        started = time.perf_counter()
        result = work()
        rows.append((name, process, (time.perf_counter() - started) / count * 1e6))
        gc.enable()
        return result

    records = list(_first(read_records([corpus], decoded=False), count))
    stage("decode: JSON", "worker", lambda: [orjson.loads(r.raw) for r in records])
    stage("decode: depth check", "worker", lambda: [too_deep(r.raw) for r in records])
    decoded = [decode(r) for r in records]
    outcomes = stage("route, map, validate", "worker", lambda: [engine.process_record(r) for r in decoded])
    stage("encode events and dead letters", "worker", lambda: [
        ([orjson.dumps(e.event) for e in o.emitted], o.rejected and orjson.dumps(rejected_input(r, o)))
        for r, o in zip(decoded, outcomes)])
    part = folder / "stages.ndjson"
    part.write_bytes(b"".join(r.raw + b"\n" for r in records))
    name = str(part)
    units = stage("run: read blocks with checkpoints", "parent", lambda: [
        units for units, _, _ in Source(name, name, read_source(name, decoded=False, blocks=True)).parts()])
    sent = stage("run: parts to workers (pickle)", "parent", lambda: [pickle.dumps(_pieces(u)) for u in units])
    answers = stage("run: split, decode, map, pack, answer", "worker", lambda: [
        pickle.dumps(_pack_part(pickle.loads(s))) for s in sent])
    packed = stage("run: packed parts back (unpickle)", "parent", lambda: [pickle.loads(a) for a in answers])
    chunks = stage("run: tally, chunk (per part)", "parent", lambda: _chunks(packed))
    blocks = stage("map: read blocks of lines", "parent", lambda: list(read_blocks([part])))
    sent = stage("map: blocks to workers (pickle)", "parent", lambda: [
        pickle.dumps(part) for part in _parts(iter(blocks), SLICE)])
    answers = stage("map: split, decode, map, sum up, answer", "worker", lambda: [
        pickle.dumps(_summarize_part(pickle.loads(s), False)) for s in sent])
    summaries = stage("map: summaries back (unpickle)", "parent", lambda: [pickle.loads(a) for a in answers])
    stage("map: tally, batch, write (per slice)", "parent", lambda: _map_output(summaries))
    spool_path = folder / "stages.spool"
    with Spool(spool_path) as spool:
        stage("spool commit (per packed part)", "parent (dispatcher)", lambda: [spool.commit(c) for c in chunks])
        events = spool.unsent
        stage("spool read (chunks just committed)", "parent (dispatcher)", lambda: _read_all(spool))
    shutil.copy(spool_path, folder / "settled.spool")
    with Spool(folder / "settled.spool") as spool:
        spooled = stage("spool read (from the file)", "parent (dispatcher)", lambda: spool.unsent_after(0, events))
        stage("spool settle (per 0.2 s: 5 000 events)", "parent (dispatcher)", lambda: [
            spool.settle(spooled[i:i + 5000], []) for i in range(0, len(spooled), 5000)])
        assert spool.unsent == 0
    with Spool(spool_path) as spool:
        started, cpu = time.perf_counter(), time.process_time()
        Dispatcher(spool, endpoint=url, api_key=KEY).run()
        rows.append(("dispatch: read, batch, send, settle (wall)", "parent (dispatcher)",
                     (time.perf_counter() - started) / count * 1e6))
        rows.append(("dispatch: read, batch, send, settle (CPU)", "parent (dispatcher)",
                     (time.process_time() - cpu) / count * 1e6))
        assert spool.unsent == 0, f"{spool.unsent} of {events} events not delivered"
    return rows


def _first(records: Any, count: int) -> Any:
    for number, record in enumerate(records):
        if number >= count:
            return
        yield record


def _map_output(summaries: list) -> int:
    """What ``map`` does with the summaries of its slices, its output to /dev/null."""
    with open(os.devnull, "wb") as out:
        output = _MapOutput(out, Tally(), None)
        for summary in summaries:
            output.add(summary)
        return output.finish()


def _chunks(packed: list) -> list[Chunk]:
    """What ``run``'s pipeline makes of packed parts: the tally counts them, each becomes a chunk."""
    tally = Tally()
    chunks = []
    for one in packed:
        tally.add_slice(one.summary)
        chunks.append(Chunk(encoded_dead_letters=one.summary.dead_letters, columns=one.columns))
    return chunks


def _read_all(spool: Spool) -> int:
    chunk, read = 0, 0
    while rows := spool.unsent_after(chunk, 1000):
        chunk, read = rows[-1].chunk, read + len(rows)
    return read


def _peak_rss(folder: Path, events: int, seed: int) -> dict[str, float]:
    corpus = folder / "rss.ndjson"
    print(f"writing {events:,} events for the peak RSS of map --workers 2", file=sys.stderr)
    write_ndjson(corpus, events, seed)
    elapsed, used = _timed(["map", str(corpus), "--workers", "2"], folder)
    corpus.unlink()
    return {"events": events, "seconds": elapsed, "parent": used["parent_rss_kib"] / 1024,
            "worker": used["worker_rss_kib"] / 1024}


def _print(rates: dict[str, float], usage: dict, stages: list, rss: dict | None, args: argparse.Namespace) -> None:
    base = rates["map --workers 1"]
    targets = {"map --workers 2": 1.6, "run": 1.0, "consume": 0.5}
    print(f"\n{'command (whole process)':<40} {'events/s':>10} {'× map -w1':>10} {'target':>8}")
    for name, rate in rates.items():
        target = next((f"≥ {t}" for key, t in targets.items() if name.startswith(key)), "")
        print(f"{name:<40} {rate:>10,.0f} {rate / base:>10.2f} {target:>8}")
    print(f"\n{'CPU seconds of the best round':<40} {'parent':>10} {'workers':>10}")
    for name, used in usage.items():
        print(f"{name:<40} {used['parent_cpu']:>10.2f} {used['workers_cpu']:>10.2f}")
    print(f"\n{'stage (first ' + format(args.stage_events, ',') + ' events)':<44} {'process':<20} {'µs/event':>9}")
    for name, process, micros in stages:
        print(f"{name:<44} {process:<20} {micros:>9.1f}")
    if rss is not None:
        print(f"\npeak RSS of map --workers 2 over {rss['events']:,} events ({rss['seconds']:.0f} s): parent "
              f"{rss['parent']:.0f} MiB, largest worker {rss['worker']:.0f} MiB, together at most "
              f"{rss['parent'] + 2 * rss['worker']:.0f} MiB (target < 300 MiB)")


if __name__ == "__main__":
    main()
