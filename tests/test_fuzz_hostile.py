"""Issue 11's acceptance fuzz test: hostile inputs through ``map``, ``run`` (into the sandbox) and ``serve``.

Hypothesis draws a stream of records: the example events with one value replaced by something hostile
(a wrong type, a huge number or string, a deep structure) at any path they hold — which covers every
path the bundled rules read — lines of invalid UTF-8 or cut-off JSON, and the untouched events. The
same stream goes, as a file (and as a truncated or corrupted gzip of it), through ``map`` and ``run``
in their own processes, and request by request through ``serve``. Asserted each time: the command
lives (its exit status is a documented one), every input line has exactly one outcome, every event
``map`` emits is delivered exactly once, and memory stays under :data:`MEMORY_BOUND_MIB`.

CI runs a few examples (a few tens of seconds); ``SEGMENT_TOPSORT_FUZZ_EXAMPLES=200`` runs more, and
shrinks what fails.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from collections import Counter
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from engine import Engine
from engine.delivery.dead_letters import read_dead_letters
from engine.sandbox.server import Sandbox
from engine.ingest.http.server import Server, ServeSettings

from .conftest import ROOT

KEY = "sk_test_fuzz-hostile-0123456789"
EXAMPLES = int(os.environ.get("SEGMENT_TOPSORT_FUZZ_EXAMPLES", "10"))
MEMORY_BOUND_MIB = 512
"""Peak resident memory allowed to ``map`` and ``run`` on these inputs (the longest line is 1 MiB)."""
MAX_LINE = 512 * 1024
"""--max-line-bytes given to map and run, so that over-long lines are cheap to make."""
TEMPLATES = [json.loads(line) for line in (ROOT / "examples" / "events.ndjson").read_text().splitlines()
             if line.strip().startswith("{") and line.strip().endswith("}")]
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if EXAMPLES > 10 else [])
"""Shrinking runs every command again per step (minutes): only in the larger run."""
ENGINE = Engine.from_folders()
EXITS = {0, 3}
"""Exit statuses of a command that went through (3: some input could not be read)."""


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            found += _paths(item, (*prefix, index))
    return found


def _nested(depth: int, leaf: Any) -> Any:
    for level in range(depth):
        leaf = [leaf] if level % 2 else {"k": leaf}
    return leaf


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replaced(copy[head], rest, new)
    return copy


HOSTILE = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e20, -1e308, 1e308, 0.0, -0.0]),
    st.sampled_from(["9" * 5000, "1e400", "-1e20", "NaN", " 3 ", "", "\u0000", "\ud7ff\uffff"]),
    st.text(max_size=40),
    st.integers(min_value=33_000, max_value=MAX_LINE + 10_000).map(lambda n: "x" * n),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(min_value=100, max_value=1100).map(lambda depth: _nested(depth, 1)),
    st.integers(min_value=1, max_value=400).map(lambda n: [{"product_id": str(i), "price": i} for i in range(n)]),
)


@st.composite
def records(draw: st.DrawFn) -> list[bytes]:
    """One input line each: a mutated or untouched example event, or bytes that are no event at all.

    The first is always an untouched event: a file is told gzipped by its first bytes, and one that
    starts with gzip's (``\\x1f\\x8b``) is read, and reported, as a damaged gzip.
    """
    lines = [json.dumps({**TEMPLATES[0], "messageId": "fz-first"}, separators=(",", ":")).encode()]
    for number in range(draw(st.integers(min_value=10, max_value=40))):
        kind = draw(st.sampled_from(["mutated"] * 6 + ["untouched", "raw", "not an object"]))
        template = {**draw(st.sampled_from(TEMPLATES)), "messageId": f"fz-{number}"}
        if kind == "raw":
            lines.append(draw(st.sampled_from([b'{"type": "page", "x": "\xff\xfe"}', b'{"type": "track"',
                                               b"\x1f\x8b\x08garbage", b"[" * 1100 + b"]" * 1100, b"\xc3("])))
            continue
        if kind == "not an object":
            lines.append(json.dumps(draw(st.one_of(st.integers(), st.text(max_size=8), st.just([1, "a"])))).encode())
            continue
        if kind == "mutated":
            path = draw(st.sampled_from([p for p in _paths(template) if p != ("messageId",)]))
            template = _replaced(template, path, draw(HOSTILE))
        lines.append(json.dumps(template, separators=(",", ":")).encode())  # the stdlib writes any depth and size
    return lines


def _command(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TOPSORT_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], env=env, capture_output=True, timeout=300)


def _peak_children_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


@settings(max_examples=EXAMPLES, deadline=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(lines=records(), cut=st.floats(min_value=0.05, max_value=0.95), flip=st.integers(min_value=20))
def test_hostile_inputs_through_map_run_and_serve(tmp_path_factory: Any, lines: list[bytes], cut: float,
                                                  flip: int) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    source = folder / "events.ndjson"
    source.write_bytes(b"\n".join(lines) + b"\n")

    # map: one outcome per line, in order
    mapped = _command("map", "--format", "outcomes", "--max-line-bytes", str(MAX_LINE), str(source))
    assert mapped.returncode == 0, mapped.stderr.decode()[-3000:]
    outcomes = [orjson.loads(line) for line in mapped.stdout.splitlines()]
    assert [o["line"] for o in outcomes] == list(range(1, len(lines) + 1))
    assert all(not o["skipped"] or not (o["emitted"] or o["rejected"]) for o in outcomes)
    emitted = Counter(e["event"]["id"] for o in outcomes for e in o["emitted"])
    for line, outcome in zip(lines, outcomes, strict=True):  # the untouched events are not lost on the way
        if line in {json.dumps({**t, "messageId": outcome["messageId"]}, separators=(",", ":")).encode()
                    for t in TEMPLATES}:
            direct = ENGINE.process(orjson.loads(line))
            assert [e["event"]["id"] for e in outcome["emitted"]] == [e.event["id"] for e in direct.emitted], outcome
            assert len(outcome["rejected"]) == len(direct.rejected), outcome

    # damaged gzip copies: the command lives, reports the file, and what it read is a prefix
    whole = gzip.compress(source.read_bytes())
    corrupt = bytearray(whole)
    corrupt[min(flip, len(corrupt) - 9)] ^= 0x55
    for name, data in (("truncated.gz", whole[: int(len(whole) * cut)]), ("corrupt.gz", bytes(corrupt))):
        (folder / name).write_bytes(data)
        damaged = _command("map", "--format", "outcomes", "--max-line-bytes", str(MAX_LINE), str(folder / name))
        assert damaged.returncode in EXITS, damaged.stderr.decode()[-3000:]
        got = [orjson.loads(line)["line"] for line in damaged.stdout.splitlines()]
        assert got == sorted(set(got))  # at most one outcome per line read
        if name == "truncated.gz":  # (a flipped byte may make blank lines, or more lines, of the rest)
            assert damaged.returncode == 3, damaged.stderr.decode()[-3000:]  # a cut gzip has lost its trailer
            assert got == list(range(1, len(got) + 1)) and len(got) <= len(lines)
        if damaged.returncode == 3:
            assert str(folder / name) in damaged.stderr.decode()

    # run into the sandbox: every emitted event delivered exactly once, every rejection dead-lettered once
    with Sandbox(api_key=KEY) as sandbox:
        ran = _command("run", str(source), "--endpoint", sandbox.url, "--max-line-bytes", str(MAX_LINE),
                       "--spool", str(folder / "run.spool"), "--dead-letters", str(folder / "dead.ndjson"))
        assert ran.returncode == 0, ran.stderr.decode()[-3000:]
        stored = Counter(e["id"] for events in sandbox.store.all().values() for e in events)
        assert stored == Counter(set(emitted))
        assert sandbox.store.stats()["duplicates_ignored"] == emitted.total() - len(emitted)
    letters = list(read_dead_letters(folder / "dead.ndjson")) if (folder / "dead.ndjson").exists() else []
    assert sorted(d["line"] for d in letters) == [o["line"] for o in outcomes if o["rejected"]]
    assert _peak_children_mib() < MEMORY_BOUND_MIB

    # serve, request by request: each answered once, and what it took is delivered exactly once
    with Sandbox(api_key=KEY) as sandbox:
        settings_ = ServeSettings(endpoint=sandbox.url, api_key=KEY, spool=folder / "serve.spool",
                                  dead_letters=folder / "serve-dead.ndjson", max_latency=0.02, drain_timeout=30.0)
        taken = []
        with Server(settings_) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            for line in lines:
                answer = client.post("/webhook", content=line, headers={"Content-Type": "application/json"})
                assert answer.status_code in (200, 400, 413), (answer.status_code, answer.text[:500])
                if answer.status_code == 200:  # serve has limits of its own: what it took is what counts
                    taken.append(orjson.loads(line))
            assert client.get("/healthz").status_code == 200
        assert taken and taken[0]["messageId"] == "fz-first", "serve refused the untouched first event"
        expected = Counter(e.event["id"] for event in taken for e in ENGINE.process(event).emitted)
        stored = Counter(e["id"] for events in sandbox.store.all().values() for e in events)
        assert set(stored) == set(expected)
        assert sandbox.store.stats()["duplicates_ignored"] == expected.total() - len(expected)
