"""Issue 11's numbered cases: one hostile record, file or rule can neither stop a command nor cost another event.

Each test reproduces a case that stopped a command (or lost events) before; the numbers are the issue's.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from engine import Engine
from engine.cli.main import main
from engine.delivery.dead_letters import read_dead_letters
from engine.delivery.pipeline import deliver
from engine.delivery.dispatch import Dispatcher

from engine.delivery.retry import RetryPolicy
from engine.sandbox.server import Faults, Sandbox
from engine.record import Record
from engine.delivery.spool import Chunk, Spool

from .conftest import ROOT, run_cli, spool_emitted

KEY = "sk_test_never-crash-0123456789"
MAX_LINE_BYTES = 16 * 1024 * 1024
"""The default --max-line-bytes."""


def page(n: int | str) -> dict[str, Any]:
    return {"type": "page", "messageId": f"p-{n}", "timestamp": "2026-11-27T10:00:00Z", "anonymousId": "a",
            "properties": {"page": {"type": "home", "pageId": "home"}}}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def lines(events: list[Any]) -> bytes:
    """NDJSON, written by the standard library: orjson does not write what nests over 254 levels."""
    return b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)


def hostile_file(path: Path) -> Path:
    """1 000 good lines, an event nested 300 deep, ``quantity: 1e20``, a line over the limit, 1 000 good lines."""
    order = {"type": "track", "event": "Order Completed", "messageId": "q", "anonymousId": "a",
             "timestamp": "2026-11-27T10:00:00Z",
             "properties": {"order_id": "o", "products": [{"product_id": "p", "price": 1, "quantity": 1e20}]}}
    with open(path, "wb") as out:
        out.write(lines([page(n) for n in range(1000)]))
        out.write(lines([{**page("deep"), "context": {"x": nested(300)}}, order]))
        out.write(b'{"type": "page", "messageId": "huge", "x": "' + b"a" * (MAX_LINE_BYTES + 1) + b'"}\n')
        out.write(lines([page(n) for n in range(1000, 2000)]))
    return path


def map_outcomes(*args: str) -> tuple[Any, list[dict[str, Any]]]:
    done = run_cli("map", "--format", "outcomes", *args)
    return done, [orjson.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=KEY) as server:
        yield server


def run_env() -> dict[str, str]:
    return {**os.environ, "TOPSORT_API_KEY": KEY, "PYTHONPATH": str(ROOT)}


# -- 3: one line no longer blocks run, map and explain -------------------------------------------


def test_3_map_goes_past_a_deep_a_huge_number_and_an_over_long_line(tmp_path: Path) -> None:
    source = hostile_file(tmp_path / "events.ndjson")
    done, outcomes = map_outcomes(str(source), "--rejects", str(tmp_path / "rejects.ndjson"))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert len(outcomes) == 2003  # one outcome per input line
    assert sum(len(o["emitted"]) for o in outcomes) == 2000
    reasons = {o["line"]: o["rejected"][0]["reason"] for o in outcomes if o["rejected"]}
    assert "nested deeper than 128 levels" in reasons[1001]
    assert "9223372036854775807" in reasons[1002]  # the quantity, refused by validation with the bound
    assert f"{source}:1003: line longer than 16 MiB (--max-line-bytes)" in reasons[1003]
    letters = list(read_dead_letters(tmp_path / "rejects.ndjson"))
    assert [letter["line"] for letter in letters] == [1001, 1002, 1003]
    assert letters[0]["raw"].startswith('{"type":"page","messageId":"p-deep"')  # orjson cannot write it again
    assert len(letters[2]["raw"]) <= 1024  # the over-long line is not copied whole


def test_3_run_delivers_every_good_event_around_them(sandbox: Sandbox, tmp_path: Path) -> None:
    source = hostile_file(tmp_path / "events.ndjson")
    command = [sys.executable, "-m", "engine", "run", str(source), "--endpoint", sandbox.url,
               "--spool", str(tmp_path / "run.spool"), "--dead-letters", str(tmp_path / "dead.ndjson")]
    done = subprocess.run(command, env=run_env(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    stored = [event["id"] for event in sandbox.store.events("pageviews")]
    assert sorted(stored) == sorted(f"p-{n}" for n in range(2000))
    assert [letter["line"] for letter in read_dead_letters(tmp_path / "dead.ndjson")] == [1001, 1002, 1003]


def test_3_explain_refuses_a_deep_event_in_one_sentence_and_explains_a_huge_number(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_bytes(lines([{**page(1), "properties": {"page": nested(300)}}]))
    done = run_cli("explain", str(deep))
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert b"nests deeper than 128 levels" in done.stderr
    order = tmp_path / "order.json"
    order.write_bytes(orjson.dumps({"type": "track", "event": "Order Completed", "messageId": "q", "anonymousId": "a",
                                    "timestamp": "2026-11-27T10:00:00Z", "properties": {
                                        "order_id": "o", "products": [{"product_id": "p", "price": 1,
                                                                       "quantity": "9" * 5000}]}}))
    done = run_cli("explain", str(order))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"rejected $.items[0].quantity" in done.stdout


# -- 4: a gzip bomb is refused early, a gzip of blank lines read fast ------------------------------


def gzip_of(path: Path, part: bytes, times: int) -> Path:
    """``part`` repeated ``times`` times, gzipped as it streams (the whole is never in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as out:
        for _ in range(times):
            out.write(compressor.compress(part))
        out.write(compressor.flush())
    return path


def test_4_a_gzip_bomb_is_refused_with_its_ratio_and_path(tmp_path: Path) -> None:
    bomb = gzip_of(tmp_path / "bomb.gz", b"0" * (1 << 20), 512)  # 0.5 MB -> 512 MiB on one line
    good = tmp_path / "good.ndjson"
    good.write_bytes(lines([page(1)]))
    done = run_cli("map", str(bomb), str(good), "--rejects", str(tmp_path / "rejects.ndjson"))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stderr = done.stderr.decode()
    assert done.returncode == 3, stderr[-2000:]
    assert re.search(rf"{re.escape(str(bomb))}(:\d+)?: gzip expands [\d,]+× .* past the limit of 200×", stderr)
    assert b'"pageviews"' in done.stdout  # the next file was read
    rejects = tmp_path / "rejects.ndjson"
    assert not rejects.exists() or rejects.stat().st_size < 10_000
    assert peak_kib < 400 * 1024, f"peak RSS {peak_kib} KiB"


def test_4_run_refuses_the_bomb_without_a_sqlite_error(sandbox: Sandbox, tmp_path: Path) -> None:
    bomb = gzip_of(tmp_path / "bomb.gz", b"0" * (1 << 20), 64)
    command = [sys.executable, "-m", "engine", "run", str(bomb), "--endpoint", sandbox.url,
               "--spool", str(tmp_path / "run.spool"), "--dead-letters", str(tmp_path / "dead.ndjson")]
    done = subprocess.run(command, env=run_env(), capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    assert b"Traceback" not in done.stderr and b"gzip expands" in done.stderr


def test_4_a_gzip_of_blank_lines_is_read_a_buffer_at_a_time(tmp_path: Path) -> None:
    blank = gzip_of(tmp_path / "blank.gz", b"\n" * (1 << 20), 256)  # 256 M blank lines
    with open(blank, "ab") as out:  # a second gzip member: one event after them
        out.write(gzip.compress(lines([page(1)])))
    # line by line this took minutes; the limit would stop it sooner, so it is lifted here
    done = run_cli("map", "--format", "outcomes", "--max-gzip-ratio", "100000", str(blank))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    [outcome] = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert outcome["line"] == (1 << 28) + 1 and outcome["messageId"] == "p-1"


# -- 5: the API key never reaches a dead letter ---------------------------------------------------


def test_5_a_key_file_with_a_second_line_is_refused_without_showing_the_key(sandbox: Sandbox, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n# rotated 2026-11-01\n")
    events = tmp_path / "events.ndjson"
    events.write_bytes(lines([page(1)]))
    done = CliRunner().invoke(main, ["run", str(events), "--endpoint", sandbox.url, "--api-key-file", str(key_file),
                                     "--spool", str(tmp_path / "s"), "--dead-letters", str(tmp_path / "dead")])
    assert done.exit_code == 2
    assert f"the API key in {key_file} has more than one line" in done.output
    assert KEY not in done.output and not (tmp_path / "dead").exists()


def test_5_dispatch_never_writes_the_authorization_header_into_a_reason(sandbox: Sandbox, tmp_path: Path) -> None:
    bad_key = f"{KEY}\n# comment"  # httpx refuses the header value and quotes it in its error
    event = page(1)
    emitted = Engine.from_folders().process(event).emitted
    with Spool(tmp_path / "spool") as spool:
        chunk = Chunk()
        spool_emitted(chunk, Record("events", 1, orjson.dumps(event), event=event), emitted)
        dispatcher = Dispatcher(spool, endpoint=sandbox.url, api_key=bad_key, policy=RetryPolicy(max_elapsed=0.3))
        deliver(dispatcher, [chunk])
        spool.export_dead_letters(tmp_path / "dead.ndjson")
    text = (tmp_path / "dead.ndjson").read_text()
    assert "Bearer <API key>" in text
    assert KEY not in text


# -- 6 and 8: rule files that exhausted memory or recursion ---------------------------------------


def test_6_a_yaml_alias_bomb_is_refused_with_file_and_line(tmp_path: Path) -> None:
    rows = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join([*rows, "rules: *a9"]) + "\n")
    done = run_cli("check", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path / 'bomb.yaml'}:6:5: error: not valid YAML: aliases expand to more than 100,000 values".encode() \
        in done.stderr


def test_6_recursive_yaml_aliases_are_refused_as_recursive(tmp_path: Path) -> None:
    (tmp_path / "loop.yaml").write_text("base: &base {again: *base}\nrules: []\n")
    done = run_cli("check", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path / 'loop.yaml'}:1:7: error: not valid YAML: an alias refers to a node that contains it".encode() \
        in done.stderr


@pytest.mark.parametrize(("expression", "column", "why"), [
    (" || ".join(f"a{i}" for i in range(300)), 12, "nested more than 64 levels deep"),
    ("(" * 900 + "messageId" + ")" * 900, 12 + 64, "brackets nested more than 64 deep"),
    ("properties.a || " * 300 + "messageId", 12, "longer than 4,096 characters"),
])
def test_8_check_refuses_deep_jmespath_at_its_place(tmp_path: Path, expression: str, column: int, why: str) -> None:
    (tmp_path / "deep.yaml").write_text(
        "rules:\n  - name: deep\n    when: {type: page}\n    emit: pageviews\n    fields:\n"
        f'      id: "{expression}"\n      occurredAt: timestamp\n      opaqueUserId: anonymousId\n'
        "      page: {fields: {type: {const: home}, pageId: {const: home}}}\n"
    )
    done = run_cli("check", str(tmp_path))
    assert done.returncode == 1 and b"RecursionError" not in done.stderr
    assert f"deep.yaml:6:{column}: error: rule 'deep' field 'id': invalid JMESPath".encode() in done.stderr
    assert why.encode() in done.stderr


# -- 7: damaged and unreadable sources are reported, and the next one is read ---------------------


def test_7_damaged_and_unreadable_sources_are_reported_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    (folder / "b-locked").mkdir(parents=True)
    whole = gzip.compress(lines([page(n) for n in range(200)]))
    (folder / "a1-truncated.gz").write_bytes(whole[: len(whole) // 2])
    crc = bytearray(whole)
    crc[-8] ^= 0xFF  # the CRC32 in the trailer
    (folder / "a2-bad-crc.gz").write_bytes(bytes(crc))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "a3-socket"))  # open() fails on it, even for root
    (folder / "b-locked" / "x.ndjson").write_bytes(lines([page("locked")]))
    (folder / "c-good.ndjson").write_bytes(lines([page("last")]))
    walk_listing = os.scandir

    def scandir(path: Any = ".") -> Any:
        if str(path).endswith("b-locked"):  # as a folder without read permission, which root could still list
            raise PermissionError(13, "Permission denied", str(path))
        return walk_listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    try:
        done = CliRunner().invoke(main, ["map", "--format", "outcomes", str(folder)])
    finally:
        listener.close()
    assert done.exit_code == 3, done.output
    output = done.output
    assert f"{folder / 'a1-truncated.gz'}:" in output and "the gzip data is truncated" in output
    assert f"{folder / 'a2-bad-crc.gz'}:200: the gzip data is corrupt (CRC check failed" in output
    assert f"{folder / 'a3-socket'}: cannot be read: No such device or address" in output
    assert f"{folder / 'b-locked'}: cannot be read: Permission denied" in output
    assert re.search(r"files not read to their end\s*│\s*4", output)
    assert '"messageId":"p-last"' in output  # the file after them was read


# -- failing loudly: an endpoint that never answers; SIGTERM ---------------------------------------


def test_run_against_an_endpoint_that_never_answers_stops_and_keeps_the_events(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens there once closed
    events = tmp_path / "events.ndjson"
    events.write_bytes(lines([page(n) for n in range(10)]))
    done = CliRunner().invoke(main, ["run", str(events), "--endpoint", f"http://127.0.0.1:{port}",
                                     "--max-retry-time", "2", "--spool", str(tmp_path / "run.spool"),
                                     "--dead-letters", str(tmp_path / "dead.ndjson")], env={"TOPSORT_API_KEY": KEY})
    assert done.exit_code == 1
    assert f"http://127.0.0.1:{port}/v2/events has not answered once in" in done.output
    assert "the events stay in the spool for the next run" in done.output
    assert not (tmp_path / "dead.ndjson").exists()
    with Spool(tmp_path / "run.spool") as spool:
        assert spool.unsent == 10


def test_sigterm_stops_run_with_a_summary_and_the_next_run_delivers_the_rest(sandbox: Sandbox, tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_bytes(lines([page(n) for n in range(3000)]))
    sandbox.set_faults(Faults(latency=0.2))
    command = [sys.executable, "-m", "engine", "run", str(events), "--endpoint", sandbox.url, "--max-in-flight", "2",
               "--spool", str(tmp_path / "run.spool"), "--dead-letters", str(tmp_path / "dead.ndjson")]
    first = subprocess.Popen(command, env=run_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(sandbox.store.events("pageviews")) < 100:
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGTERM)
    summary = first.communicate(timeout=60)[1].decode()
    assert first.returncode == 143, summary
    assert "Stopped by SIGTERM" in summary and "left in the spool" in summary
    with Spool(tmp_path / "run.spool") as spool:
        assert spool.unsent > 0
    sandbox.set_faults(Faults())
    second = subprocess.run(command, env=run_env(), capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    stored = [event["id"] for event in sandbox.store.events("pageviews")]
    assert sorted(set(stored)) == sorted(f"p-{n}" for n in range(3000))


def test_a_rule_whose_outputs_json_cannot_carry_is_refused_at_load(tmp_path: Path) -> None:
    """A lone surrogate in a rule would make every output it touches unencodable: refused where it is written."""
    (tmp_path / "text.yaml").write_text(
        "rules:\n  - name: text\n    when: {type: page}\n    emit: pageviews\n    fields:\n"
        "      id: \"join('', [messageId, `\\\"\\\\ud800\\\"`])\"\n      occurredAt: timestamp\n"
        "      opaqueUserId: anonymousId\n      page: {fields: {type: {const: home}, pageId: {const: \"\\ud800\"}}}\n"
    )
    done = run_cli("check", str(tmp_path))
    assert done.returncode == 1
    assert b"text.yaml:9:60: error: not valid YAML: a string holds a lone surrogate" in done.stderr
    (tmp_path / "text.yaml").write_text((tmp_path / "text.yaml").read_text().replace('"\\ud800"}', "home}"))
    done = run_cli("check", str(tmp_path))
    assert b"text.yaml:6:12: error: rule 'text' field 'id'" in done.stderr
    assert b"a literal holds text JSON cannot carry" in done.stderr


def test_a_rule_that_fails_is_its_own_rejection_and_the_rules_after_it_still_run(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("""
rules:
  - name: first
    when: {type: page}
    emit: pageviews
    fields: {id: messageId, occurredAt: timestamp, opaqueUserId: anonymousId, page: {const: {type: home, pageId: h}}}
  - name: second
    when: {type: page}
    emit: pageviews
    fields: {id: "concat(messageId, '-2')", occurredAt: timestamp, opaqueUserId: anonymousId,
             page: {const: {type: home, pageId: h}}}
""")
    engine = Engine.from_folders(rules)

    def broken(*_: Any) -> None:
        raise ValueError("a fault inside the first rule")

    object.__setattr__(engine.rule("first"), "apply", broken)
    outcome = engine.process({"type": "page", "messageId": "p-1", "timestamp": "2026-11-27T10:00:00Z",
                              "anonymousId": "a"})
    assert [(r.rule, r.path) for r in outcome.rejected] == [("first", "$")]
    assert "ValueError: a fault inside the first rule" in outcome.rejected[0].reason
    assert [(e.rule, e.event["id"]) for e in outcome.emitted] == [("second", "p-1-2")]
