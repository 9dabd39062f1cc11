"""The map stage in worker processes: the same bytes as in one process, order kept, workers that die."""

from __future__ import annotations

import gzip
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.corpus import lines
from engine import Engine
from engine.ingest import files
from engine.ingest.files import read_blocks, read_records
from engine.limits import InputLimits
from engine.mapping import DEAD_LETTERED, EMITTED, InProcessMapper, summarize
from engine.ndjson import LineBlock
from engine.outcome import KINDS
from engine import workers
from engine.topsort.batching import Batcher
from engine.delivery.pipeline import Source
from engine.workers import SLICE, PoolMapper, _map_slice, _pack_part, _summarize_part, make_mapper

from .conftest import run_cli


def _hostile_mix(path: Path, count: int) -> Path:
    """A corpus of ``count`` events over several slices, with what a source may hold between them:
    batch lines (one spelled with an escape), broken JSON, blank lines, too-deep values, escapes, nulls."""
    corpus = list(lines(count, seed=3))
    out: list[bytes] = []
    for index, line in enumerate(corpus):
        out.append(line)
        following = corpus[(index + 1) % count]
        if index % 97 == 0:
            out.append(b'{"batch": [' + following + b"," + line + b"]}")
        if index % 113 == 0:
            out += [b"{not json", b"", b"  "]
        if index % 151 == 0:
            out.append(b"[" * 200 + b"]" * 200)
        if index % 163 == 0:
            out.append(line.replace(b'"type"', b'"\\u0074ype"'))
        if index % 171 == 0:
            out.append(b"null")
        if index % 181 == 0:
            out.append(b'{"\\u0062atch": [' + following + b"]}")
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def _without_time(dead_letters: bytes) -> list[dict]:
    records = [orjson.loads(line) for line in dead_letters.splitlines()]
    for record in records:
        record.pop("at")  # when it was written: the one field that may differ
    return records


def _sources(folder: Path) -> list[Path]:
    """Files of every shape ``map`` reads: NDJSON with over-long lines and no final newline, the same
    gzipped, a cut gzip (reported, the next file read), a JSON document."""
    mix = _hostile_mix(folder / "mix.ndjson", 3 * SLICE).read_bytes().splitlines()
    mix[40:40] = [b'{"type":"track","messageId":"long","x":"' + b"y" * 3000 + b'"}', b" " * 2500]
    plain = folder / "plain.ndjson"
    plain.write_bytes(b"\n".join(mix))
    zipped = folder / "zipped.ndjson.gz"
    zipped.write_bytes(gzip.compress(b"\n".join(mix[:SLICE + 50]) + b"\n"))
    cut = folder / "cut.ndjson.gz"
    cut.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])
    document = folder / "document.json"
    document.write_bytes(b"[" + b",".join(line for line in mix[:SLICE] if line.startswith(b'{"a')) + b"]")
    return [plain, cut, zipped, document]


def _map(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``map ARGS``, its summary table wide enough that no row wraps."""
    return subprocess.run([sys.executable, "-m", "engine", "map", *args], capture_output=True, timeout=120,
                          env={**os.environ, "COLUMNS": "250"})


def _summary(stderr: bytes) -> list[str]:
    """The summary table's rows, the one that tells the speed aside."""
    rows = stderr.decode().splitlines()
    return [" ".join(row.replace("│", " ").split()) for row in rows if "events/s" not in row and "──" not in row]


@pytest.mark.parametrize("output_format", ["requests", "outcomes"])
def test_map_with_two_workers_writes_the_same_bytes_as_one(tmp_path: Path, output_format: str) -> None:
    sources = [str(path) for path in _sources(tmp_path)]
    runs = {}
    for count in ("1", "2"):
        rejects = tmp_path / f"rejects-{count}.ndjson"
        done = _map(*sources, "--workers", count, "--rejects", str(rejects), "--format", output_format,
                    "--max-line-bytes", "2048")
        assert done.returncode == 3, done.stderr  # the cut gzip
        runs[count] = (done.stdout, _without_time(rejects.read_bytes()), _summary(done.stderr))
    assert runs["2"][0] == runs["1"][0]
    assert runs["2"][1] == runs["1"][1]
    assert runs["2"][2] == runs["1"][2]
    assert f"{sources[1]}:" in runs["1"][2][0] and "gzip data is truncated" in runs["1"][2][0]
    assert len(runs["1"][1]) > 20  # broken, too deep, too long and unmappable events were dead-lettered
    assert any("line longer than 2 KiB" in str(letter) for letter in runs["1"][1])
    if output_format == "outcomes":
        assert len(runs["1"][0].splitlines()) > 3 * SLICE


def test_map_writes_what_the_batcher_makes_of_each_mapped_event(tmp_path: Path) -> None:
    """The slice-at-a-time output of ``map`` against the plain way: each event of each record, in
    order, through :class:`Batcher`, encoded with ``orjson``."""
    sources = _sources(tmp_path)
    expected = b""
    batcher: Batcher[orjson.Fragment] = Batcher()
    limits = InputLimits(max_line_bytes=2048)
    for mapped in InProcessMapper(Engine.from_folders()).map(list(read_records(sources, limits, on_fault=print))):
        for event in mapped.events:
            if body := batcher.add(event.kind, orjson.Fragment(event.body)):
                expected += orjson.dumps(body) + b"\n"
    expected += orjson.dumps(batcher.flush()) + b"\n"
    for count in ("1", "2"):
        done = run_cli("map", *map(str, sources), "--workers", count, "--max-line-bytes", "2048")
        assert done.stdout == expected
    assert expected.count(b"\n") > 20


def test_pool_mapper_gives_what_the_engine_gives_in_order(tmp_path: Path) -> None:
    corpus = _hostile_mix(tmp_path / "mix.ndjson", 2 * SLICE)
    engine = Engine.from_folders()
    expected = InProcessMapper(engine).map(list(read_records([corpus])))
    pool = PoolMapper(engine, 2, slice_size=64)
    try:
        got = list(pool.stream(read_records([corpus], decoded=False)))
    finally:
        pool.close()
    assert [mapped for _, mapped in got] == _same_time(expected, [mapped for _, mapped in got])
    assert [(record.origin, record.line) for record, _ in got] == [
        (record.origin, record.line) for record in read_records([corpus])
    ]


def test_pool_mapper_shares_a_callers_slice_among_the_workers(tmp_path: Path) -> None:
    records = list(read_records([_hostile_mix(tmp_path / "mix.ndjson", SLICE + 100)], decoded=False))
    engine = Engine.from_folders()
    expected = InProcessMapper(engine).map(records)
    pool = PoolMapper(engine, 2)
    try:
        got = pool.map(records)
        assert len(multiprocessing.active_children()) == 2  # it went to the workers
    finally:
        pool.close()
    assert got == _same_time(expected, got)


_DIE_ONCE = b'"messageId":"die-here"'
"""The mark of the event whose slice kills the worker mapping it, the first time only."""


def _dying_once(wire: Any) -> Any:
    """``_map_slice`` in a worker that dies (as a kill -9 would end it) on the first slice holding the mark."""
    flag = Path(os.environ["SEGMENT_TOPSORT_TEST_FLAG"])
    if _DIE_ONCE in wire[0] and not flag.exists():
        flag.touch()
        os._exit(1)
    return _map_slice(wire)


def _marked(folder: Path) -> Path:
    """A corpus of several slices with the marked event at line 301."""
    corpus = _hostile_mix(folder / "mix.ndjson", 4 * SLICE)
    marked = corpus.read_bytes().splitlines()
    marked.insert(300, next(line for line in marked if b'"messageId":"' in line).replace(
        b'"messageId":"', b'"messageId":"die-here","was":"', 1))
    corpus.write_bytes(b"\n".join(marked) + b"\n")
    return corpus


def test_a_worker_that_dies_loses_and_doubles_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = _marked(tmp_path)
    engine = Engine.from_folders()
    expected = InProcessMapper(engine).map(list(read_records([corpus])))
    monkeypatch.setenv("SEGMENT_TOPSORT_TEST_FLAG", str(tmp_path / "died"))
    monkeypatch.setattr(workers, "_map_slice", _dying_once)  # forked workers inherit it
    pool = PoolMapper(engine, 2, slice_size=32)
    try:
        got = [mapped for _, mapped in pool.stream(read_records([corpus], decoded=False))]
    finally:
        pool.close()
    assert (tmp_path / "died").exists() and pool.restarts == 1
    assert got == _same_time(expected, got)


def _die_on_the_mark(part: Any) -> None:
    """End this worker (as kill -9 would) on a part holding the mark: the first time only, or
    (``SEGMENT_TOPSORT_TEST_FLAG`` unset) every time (mapping the mark's record alone does not die)."""
    flag = os.environ.get("SEGMENT_TOPSORT_TEST_FLAG")
    marked = any(_DIE_ONCE in (piece.data if isinstance(piece, LineBlock) else piece[0]) for piece in part)
    if marked and not (flag and Path(flag).exists()):
        if flag:
            Path(flag).touch()
        os._exit(1)


def _dying_summary(part: Any, outcome_lines: bool) -> Any:
    """``_summarize_part`` in a worker that dies on the mark (:func:`_die_on_the_mark`)."""
    _die_on_the_mark(part)
    return _summarize_part(part, outcome_lines)


def _dying_pack(part: Any) -> Any:
    """``_pack_part`` in a worker that dies on the mark (:func:`_die_on_the_mark`)."""
    _die_on_the_mark(part)
    return _pack_part(part)


def _comparable(packs: Any) -> list[tuple]:
    """Packed parts, their dead letters without the time they were written."""
    return [(packed.columns, packed.summary._replace(dead_letters=_without_time(b"\n".join(packed.summary.dead_letters))),
             packed.marks) for packed in packs]


@pytest.mark.parametrize("dies", ["never", "once", "always"])
def test_workers_pack_each_part_as_it_is_packed_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies: str) -> None:
    corpus = _marked(tmp_path)
    zipped = tmp_path / "mix.ndjson.gz"  # read record by record
    zipped.write_bytes(gzip.compress(corpus.read_bytes()[:200_000]))
    monkeypatch.setattr(files, "BLOCK", 64 << 10)

    def parts() -> Any:
        for name in (str(corpus), str(zipped)):
            yield from (units for units, _, _ in Source(name, name, files.read_source(name, decoded=False, blocks=True)).parts())

    engine = Engine.from_folders()
    expected = _comparable(InProcessMapper(engine).packs(parts()))
    if dies == "once":
        monkeypatch.setenv("SEGMENT_TOPSORT_TEST_FLAG", str(tmp_path / "died"))
    elif dies == "always":
        monkeypatch.delenv("SEGMENT_TOPSORT_TEST_FLAG", raising=False)
    monkeypatch.setattr(workers, "_pack_part", _dying_pack if dies != "never" else workers._pack_part)
    pool = PoolMapper(engine, 2)
    try:
        got = _comparable(pool.packs(parts()))
    finally:
        pool.close()
    assert got == expected and len(expected) > 6
    assert sum(sum(summary.verdicts.values()) for _, summary, _ in got) == len(list(read_records([corpus, zipped])))
    assert sum(columns[3] for columns, _, _ in got) > 4 * SLICE and any(summary.dead_letters for _, summary, _ in got)
    for columns, summary, marks in got:  # a mark per record: which emitted (packed as inputs), which were dead-lettered
        assert len(marks) == sum(summary.verdicts.values())
        assert sum(mark & EMITTED for mark in marks) == len(orjson.loads(columns[0]))
        assert sum(mark & DEAD_LETTERED for mark in marks) // DEAD_LETTERED == len(summary.dead_letters)
    # once: the part is sent again; always: it is mapped event by event (parts in flight with it may die too)
    assert pool.restarts == {"never": 0, "once": 1}[dies] if dies != "always" else pool.restarts >= 2


def _lines_of(summaries: Any) -> list[bytes]:
    """The outcome lines of a stream of summaries, checked against their counts."""
    lines = []
    for summary in summaries:
        assert sum(summary.verdicts.values()) == len(summary.outcome_lines.splitlines())
        lines += summary.outcome_lines.splitlines()
    return lines


@pytest.mark.parametrize("dies", ["once", "always"])
def test_a_worker_that_dies_summing_up_a_block_loses_and_doubles_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies: str
) -> None:
    corpus = _marked(tmp_path)
    engine = Engine.from_folders()
    expected = _lines_of(InProcessMapper(engine).summaries(read_records([corpus]), outcome_lines=True))
    if dies == "once":
        monkeypatch.setenv("SEGMENT_TOPSORT_TEST_FLAG", str(tmp_path / "died"))
    else:
        monkeypatch.delenv("SEGMENT_TOPSORT_TEST_FLAG", raising=False)
    monkeypatch.setattr(workers, "_summarize_part", _dying_summary)
    monkeypatch.setattr(files, "BLOCK", 64 << 10)  # a few dozen events a block
    pool = PoolMapper(engine, 2)
    try:
        got = _lines_of(pool.summaries(read_blocks([corpus]), outcome_lines=True))
    finally:
        pool.close()
    assert len(got) == len(expected) > 4 * SLICE
    assert got == expected
    # once: the block is sent again; always: it is split here and mapped event by event (the parts
    # in flight ahead of it, sent again with it, may see it kill their pool too)
    assert pool.restarts == 1 if dies == "once" else pool.restarts >= 2


def test_map_sums_up_each_slice_of_what_it_maps(tmp_path: Path) -> None:
    records = list(read_records([_hostile_mix(tmp_path / "mix.ndjson", 200)]))
    mapped = InProcessMapper(Engine.from_folders()).map(records)
    summary = summarize(zip(records, mapped))
    assert sum(summary.verdicts.values()) == len(records)
    assert [KINDS[code] for code in summary.kinds] == [event.kind for one in mapped for event in one.events]
    assert summary.bodies == [event.body for one in mapped for event in one.events]
    assert summary.dead_letters == [one.dead_letter for one in mapped if one.dead_letter is not None]
    assert sum(summary.reasons.values()) == sum(len(one.rejected) for one in mapped) > 10
    assert summary.outcome_lines == b""


def test_a_short_input_starts_no_process(tmp_path: Path) -> None:
    pool = make_mapper(Engine.from_folders(), 2)
    assert isinstance(pool, PoolMapper)
    corpus = _hostile_mix(tmp_path / "mix.ndjson", 100)
    records = list(read_records([corpus], decoded=False))
    assert len(list(pool.stream(records))) == len(records) < SLICE
    assert sum(sum(summary.verdicts.values()) for summary in pool.summaries(read_blocks([corpus]))) == len(records)
    assert not multiprocessing.active_children()
    assert isinstance(make_mapper(Engine.from_folders(), 1), InProcessMapper)


def _same_time(expected: list, got: list) -> list:
    """``expected`` with each dead letter's time taken from ``got`` (the one field that may differ)."""
    fixed = []
    for want, have in zip(expected, got):
        if want.dead_letter is not None and have.dead_letter is not None:
            record = orjson.loads(want.dead_letter)
            record["at"] = orjson.loads(have.dead_letter)["at"]
            want = want._replace(dead_letter=orjson.dumps(record))
        fixed.append(want)
    return fixed + expected[len(got):]


def test_workers_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    import time

    mapping = subprocess.Popen([sys.executable, "-m", "engine", "map", "-", "--workers", "2"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert mapping.stdin is not None
    mapping.stdin.write(b"\n".join(lines(2 * SLICE)) + b"\n")  # more than a slice: the pool starts
    mapping.stdin.flush()  # and stdin stays open: the parent waits for more
    deadline = time.monotonic() + 60
    while len(workers := _children(mapping.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers) == 2
    mapping.kill()
    mapping.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # leave no orphan behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_run_sandbox_forks_its_workers_before_the_sandbox_thread_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork copies no other thread, so one taken while the sandbox's server thread holds a lock
    would leave that lock held forever in the worker: the pool is forked first."""
    from click.testing import CliRunner

    from engine.cli import deliver
    from engine.cli.main import main

    threads_at_fork: list[list[str]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads_at_fork.append([thread.name for thread in threading.enumerate()])
        return make_mapper(*args, **kwargs)

    monkeypatch.setattr(deliver, "make_mapper", recording)
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"\n".join(lines(2 * SLICE, seed=5)) + b"\n")
    done = CliRunner().invoke(main, ["run", str(events), "--sandbox", "--workers", "2",
                                     "--dead-letters", str(tmp_path / "dead.ndjson")])
    assert done.exit_code == 0, done.output
    assert len(threads_at_fork) == 1
    assert not [name for name in threads_at_fork[0] if "sandbox" in name], threads_at_fork


def test_the_blocks_of_many_small_files_share_a_worker_s_part(tmp_path: Path) -> None:
    for number in range(40):
        (tmp_path / f"{number:02}.ndjson").write_bytes(b"\n".join(lines(30, seed=number)) + b"\n")
    units = list(read_blocks([tmp_path]))
    parts = list(workers._parts(iter(units), SLICE))
    assert len(units) == 40 and 1 < len(parts) < 10
    assert [piece for part in parts for piece in part] == units
    pool = PoolMapper(Engine.from_folders(), 2)
    try:
        got = [line for summary in pool.summaries(units, outcome_lines=True) for line in summary.outcome_lines.splitlines()]
    finally:
        pool.close()
    assert [(line["origin"], line["line"]) for line in map(orjson.loads, got)] == [
        (str(tmp_path / f"{number:02}.ndjson"), row) for number in range(40) for row in range(1, 31)]
