"""``segment-topsort run`` and ``replay`` end to end against the sandbox, ``kill -9`` included."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from engine.cli.main import main
from engine.delivery.dead_letters import read_dead_letters
from engine.sandbox.server import Faults, Sandbox
from engine.delivery.spool import Spool

KEY = "sk_test_run-crash-0123456789"
ROOT = Path(__file__).resolve().parents[1]


def _segment_events(count: int) -> tuple[bytes, set[str], set[tuple[str, int]]]:
    """NDJSON Product Viewed events; the Topsort ids to expect; the dead letters to expect.

    Every 997th event has no user (rejected by the rules), every 2 503rd carries a resolvedBidId
    the sandbox refuses, and two lines are not JSON.
    """
    lines, ids, dead = [], set(), set()
    for n in range(count):
        line = len(lines) + 1
        if n in (5_000, 12_345):
            lines.append(b'{"type": "track", "event": "Product Viewed", "messageId": ')
            dead.add(("decode", line))
            line += 1
        event: dict[str, Any] = {
            "type": "track",
            "event": "Product Viewed",
            "messageId": f"msg-{n:06d}",
            "anonymousId": f"anon-{n % 313}",
            "timestamp": f"2026-11-27T10:{n // 1000 % 60:02d}:{n % 60:02d}.000Z",
            "context": {"page": {"path": "/search", "title": "Search"}, "device": {"type": "ios"}},
            "properties": {"product_id": f"p-{n % 1000}", "resolvedBidId": f"bid-{n}", "position": n % 20 + 1},
        }
        if n % 997 == 996:
            del event["anonymousId"]
            dead.add(("map", line))
        elif n % 2503 == 2502:
            event["properties"]["resolvedBidId"] = f"poison-{n}"
            dead.add(("deliver", line))
        else:
            ids.add(event["messageId"])
        lines.append(orjson.dumps(event))
    return b"\n".join(lines) + b"\n", ids, dead


def _stored(sandbox: Sandbox) -> list[str]:
    return [event["id"] for event in sandbox.store.events("impressions")]


def _letters(path: Path) -> list[tuple[str, int]]:
    return sorted((letter["stage"], letter["line"]) for letter in read_dead_letters(path)) if path.exists() else []


def _run_args(events: Path, sandbox: Sandbox, tmp_path: Path) -> list[str]:
    return [
        "run", str(events), "--endpoint", sandbox.url,
        "--spool", str(tmp_path / "run.spool"), "--dead-letters", str(tmp_path / "dead.ndjson"),
    ]


def _count(summary: str, label: str = "events read") -> int:
    """A number from the summary table."""
    return int(re.search(label + r"\s*│\s*([\d,]+)", summary).group(1).replace(",", ""))


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=KEY) as sandbox:
        yield sandbox


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_midway_resumes_without_loss_or_duplicates(sandbox: Sandbox, tmp_path: Path, workers: int) -> None:
    data, expected_ids, expected_dead = _segment_events(20_000)
    events = tmp_path / "events.ndjson"
    events.write_bytes(data)
    sandbox.set_faults(Faults(latency=0.05))  # a slow Topsort: ~8 requests of 50 per 50 ms at most
    env = {**os.environ, "TOPSORT_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "engine", *_run_args(events, sandbox, tmp_path), "--workers", str(workers)]

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_stored(sandbox)) < 3_000:
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "the first run delivered too little in 120 s"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    delivered_before = len(_stored(sandbox))
    assert first.returncode == -signal.SIGKILL
    assert delivered_before < len(expected_ids), "the first run finished before it could be killed"
    with Spool(tmp_path / "run.spool") as spool:
        checkpoint = spool.checkpoint(str(events.resolve()))
    read_before = checkpoint.line if checkpoint else 0

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    summary = second.stderr.decode()
    assert second.returncode == 0, summary
    assert KEY not in summary

    stored = _stored(sandbox)
    assert len(stored) == len(set(stored)) and set(stored) == expected_ids
    letters = _letters(tmp_path / "dead.ndjson")
    assert letters == sorted(expected_dead)  # each once: none lost, none written twice
    # input read and committed by the first run was not read again
    assert _count(summary) == 20_002 - read_before
    # resending is limited to what was in flight or not yet settled when the first run died
    assert sandbox.store.stats()["duplicates_ignored"] <= 4_000


def test_a_bad_key_stops_the_run_and_the_next_run_delivers(sandbox: Sandbox, tmp_path: Path) -> None:
    data, expected_ids, expected_dead = _segment_events(300)
    events = tmp_path / "events.ndjson"
    events.write_bytes(data)
    runner = CliRunner()
    wrong = "sk_live_not-the-key-5555"

    refused = runner.invoke(main, _run_args(events, sandbox, tmp_path), env={"TOPSORT_API_KEY": wrong})
    assert refused.exit_code == 1
    assert "Topsort refused the API key (HTTP 401)" in refused.output
    assert wrong not in refused.output and KEY not in refused.output
    assert _stored(sandbox) == []
    assert _count(refused.output, "left in the spool") > 0

    accepted = runner.invoke(main, _run_args(events, sandbox, tmp_path), env={"TOPSORT_API_KEY": KEY})
    assert accepted.exit_code == 0, accepted.output
    assert set(_stored(sandbox)) == expected_ids
    assert _letters(tmp_path / "dead.ndjson") == sorted(expected_dead)
    assert _count(accepted.output, "left by an earlier run") > 0
    assert _count(accepted.output, "events read") < 300  # what the refused run spooled is not read again


def test_the_key_can_come_from_a_file(sandbox: Sandbox, tmp_path: Path) -> None:
    data, expected_ids, _ = _segment_events(60)
    (tmp_path / "events.ndjson").write_bytes(data)
    (tmp_path / "key").write_text(KEY + "\n")
    args = [*_run_args(tmp_path / "events.ndjson", sandbox, tmp_path), "--api-key-file", str(tmp_path / "key")]
    result = CliRunner().invoke(main, args, env={"TOPSORT_API_KEY": ""})
    assert result.exit_code == 0, result.output
    assert set(_stored(sandbox)) == expected_ids


def test_a_file_read_before_is_read_on_from_where_it_ended(sandbox: Sandbox, tmp_path: Path) -> None:
    data, expected_ids, _ = _segment_events(120)
    events = tmp_path / "events.ndjson"
    lines = data.splitlines(keepends=True)
    events.write_bytes(b"".join(lines[:100]))
    runner = CliRunner(env={"TOPSORT_API_KEY": KEY})
    assert _count(runner.invoke(main, _run_args(events, sandbox, tmp_path)).output) == 100

    with open(events, "ab") as grown:  # more events appended since
        grown.write(b"".join(lines[100:]))
    assert _count(runner.invoke(main, _run_args(events, sandbox, tmp_path)).output) == 20
    assert set(_stored(sandbox)) == expected_ids

    events.write_bytes(b"".join(lines[50:]))  # another file in its place: read from its start
    assert _count(runner.invoke(main, _run_args(events, sandbox, tmp_path)).output) == 70


@pytest.mark.parametrize("missing", ["endpoint", "key"])
def test_run_refuses_without_endpoint_or_key(tmp_path: Path, missing: str) -> None:
    (tmp_path / "events.ndjson").write_text("{}\n")
    args = ["run", str(tmp_path / "events.ndjson")]
    env = {"TOPSORT_API_KEY": "" if missing == "key" else KEY, "TOPSORT_ENDPOINT": ""}
    if missing == "key":
        args += ["--endpoint", "http://127.0.0.1:9"]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "segment-topsort map" in message and "segment-topsort sandbox" in message
    assert KEY not in result.output


def test_replay_sends_fixed_dead_letters(sandbox: Sandbox, tmp_path: Path) -> None:
    data, expected_ids, _ = _segment_events(5_100)
    events = tmp_path / "events.ndjson"
    events.write_bytes(data)
    runner = CliRunner(env={"TOPSORT_API_KEY": KEY})
    assert runner.invoke(main, _run_args(events, sandbox, tmp_path)).exit_code == 0
    dead = tmp_path / "dead.ndjson"
    poisoned = [letter for letter in read_dead_letters(dead) if letter["stage"] == "deliver"]
    assert len(poisoned) == 2

    # the bid ids were wrong in the data: fix them in the dead-letter file and replay it
    dead.write_bytes(dead.read_bytes().replace(b'"poison-', b'"bid-'))
    replay = ["replay", str(dead), "--endpoint", sandbox.url, "--spool", str(tmp_path / "run.spool")]
    result = runner.invoke(main, replay)
    assert result.exit_code == 0, result.output
    fixed = {letter["messageId"] for letter in poisoned}
    assert set(_stored(sandbox)) == expected_ids | fixed
    # what is still wrong (no user, not JSON) is dead-lettered again, with its original place
    again = list(read_dead_letters(tmp_path / "dead.replay.ndjson"))
    assert sorted((a["stage"], a["line"]) for a in again) == sorted(
        (b["stage"], b["line"]) for b in read_dead_letters(dead) if b["stage"] != "deliver"
    )
    assert all(a["origin"] == str(events) for a in again)

    # replaying the same, unchanged file again finds nothing new to read
    assert _count(runner.invoke(main, replay).output) == 0


def test_run_with_two_workers_delivers_and_dead_letters_what_one_does(tmp_path: Path) -> None:
    data, expected_ids, expected_dead = _segment_events(6_000)
    lines = data.splitlines(keepends=True)
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"".join(lines[:4_000]) + b"\n\n  \n" + b"".join(lines[4_000:]).rstrip(b"\n"))
    zipped = tmp_path / "more.ndjson.gz"  # read record by record, not in blocks
    zipped.write_bytes(gzip.compress(b"".join(lines[:700])))
    env = {**os.environ, "TOPSORT_API_KEY": KEY, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    runs = []
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        with Sandbox(api_key=KEY) as sandbox:
            command = [sys.executable, "-m", "engine", *_run_args(events, sandbox, folder), str(zipped),
                       "--workers", str(workers)]
            done = subprocess.run(command, cwd=folder, env=env, capture_output=True, timeout=300)
            assert done.returncode == 0, done.stderr.decode()
            stored = _stored(sandbox)
        assert len(stored) == len(set(stored)) and set(stored) == expected_ids
        letters = sorted(orjson.dumps({k: v for k, v in letter.items() if k != "at"}, option=orjson.OPT_SORT_KEYS)
                         for letter in read_dead_letters(folder / "dead.ndjson"))  # settling orders deliver's in time
        rows = [" ".join(row.replace("│", " ").split()) for row in done.stderr.decode().splitlines()
                if not any(label in row for label in ("events/s", "requests", "──", "Dead letters:"))]
        runs.append((sorted(stored), letters, rows))
    assert runs[0] == runs[1]
    letters = [orjson.loads(letter) for letter in runs[0][1]]
    assert sorted((letter["stage"], letter["line"]) for letter in letters if letter["origin"] == str(events)) == sorted(
        (stage, line + (line > 4_000) * 3) for stage, line in expected_dead)
    assert "events read 6,701" in runs[0][2]  # 6 001 lines (one not JSON) and 700
