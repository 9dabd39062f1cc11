"""The command line end to end: map (requests, outcomes, rejects), explain, python -m engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from .conftest import ROOT, assert_valid_request, assert_valid_topsort, ndjson, run_cli

EXAMPLES = "examples/events.ndjson"


def test_map_writes_valid_request_bodies_of_at_most_50_per_array(tmp_path: Path) -> None:
    result = run_cli("map", EXAMPLES)
    assert result.returncode == 0, result.stderr.decode()
    bodies = ndjson(result.stdout)
    for body in bodies:
        assert_valid_request(body)
        assert all(len(items) <= 50 for items in body.values())
    impressions = [i for b in bodies for i in b.get("impressions", [])]
    assert len(impressions) == 62  # 60 listed products + 1 view + 1 banner
    assert len({i["id"] for b in bodies for kind in b.values() for i in kind}) == sum(
        len(kind) for b in bodies for kind in b.values())
    summary = result.stderr.decode()
    assert "events read" in summary and "requests written" in summary


def test_map_outcomes_has_one_line_per_input_event_in_order(tmp_path: Path) -> None:
    rejects = tmp_path / "rejects.ndjson"
    result = run_cli("map", EXAMPLES, "--format", "outcomes", "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr.decode()
    lines = ndjson(result.stdout)
    source = (ROOT / EXAMPLES).read_bytes().splitlines()
    assert [line["line"] for line in lines] == list(range(1, len(source) + 1))
    by_line = {line["line"]: line for line in lines}
    for line in lines:
        assert set(line) == {"origin", "line", "messageId", "emitted", "rejected", "skipped"}
        assert line["skipped"] == (not line["emitted"] and not line["rejected"])
        for emitted in line["emitted"]:
            assert_valid_topsort(emitted["kind"], emitted["event"])
    assert by_line[10]["rejected"][0]["reason"].startswith(f"{EXAMPLES}:10: not valid JSON")
    assert by_line[11]["skipped"] is True  # identify: no rule wants it
    assert by_line[7]["skipped"] is True  # Product Added: its rule ships disabled
    kept = ndjson(rejects.read_bytes())
    assert [(k["line"], k["stage"]) for k in kept] == [(9, "map"), (10, "decode"), (12, "map")]
    assert kept[0]["event"]["messageId"] == "ex-order-1" and kept[0]["rejected"][0]["path"] == "$.items[2].unitPrice"
    assert kept[1]["raw"].startswith('{"type":"track"')


def test_map_reads_stdin_and_goes_on_after_a_malformed_line() -> None:
    events = b'{"type":"page","messageId":"p1","timestamp":"2026-01-01T00:00:00Z","anonymousId":"a",' \
             b'"properties":{"page":{"type":"home","pageId":"h"}}}\nnot json\n\n[1]\n'
    result = run_cli("map", "--format", "outcomes", stdin=events)
    assert result.returncode == 0, result.stderr.decode()
    lines = ndjson(result.stdout)
    assert [(l["line"], bool(l["emitted"]), bool(l["rejected"])) for l in lines] == [
        (1, True, False), (2, False, True), (4, False, True)]
    assert lines[1]["rejected"][0]["reason"].startswith("-:2: not valid JSON")


def test_explain_shows_rules_fields_and_verdict(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_bytes(orjson.dumps({
        "type": "track", "event": "Product List Viewed", "messageId": "m-9", "timestamp": "2026-01-01T00:00:00Z",
        "anonymousId": "a", "properties": {"products": [{"resolvedBidId": "b-1"}, {"resolvedBidId": "b" * 200}]}}))
    result = run_cli("explain", str(event))
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "- product-viewed" in out and "event is 'Product List Viewed', the rule wants Product Viewed" in out
    assert "+ product-list-viewed" in out and "matched" in out
    assert "- product-added" in out and "disabled" in out
    assert 'concat(messageId, \':\', index)' in out and '"m-9:0"' in out
    assert "item 1" in out and "rejected $.resolvedBidId" in out
    assert "Outcome: 1 emitted, 1 rejected" in out


def test_python_dash_m_engine_and_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("check", "test", "map", "explain"):
        assert command in result.stdout.decode()


def test_run_with_sandbox_rehearses_end_to_end(tmp_path: Path) -> None:
    dead = tmp_path / "dead-letters.ndjson"
    for _ in range(2):  # a rehearsal starts afresh each time
        result = run_cli("run", str(ROOT / EXAMPLES), "--sandbox", "--dead-letters", str(dead), cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        err = result.stderr.decode()
        assert "accepted 67 Topsort event(s)" in err
        assert "events read" in err and "delivered" in err
    kept = ndjson(dead.read_bytes())
    assert [(k["stage"], k["line"]) for k in kept] == [("map", 9), ("decode", 10), ("map", 12)] * 2


def test_run_without_endpoint_or_key_points_at_map_and_the_sandbox() -> None:
    result = run_cli("run", EXAMPLES)
    assert result.returncode == 2
    err = " ".join(result.stderr.decode().split())
    assert "segment-topsort map" in err and "segment-topsort sandbox" in err


@pytest.mark.parametrize("command", [
    ["run", "/dev/null"], ["serve"], ["consume", "--topic", "t", "--group", "g", "--bootstrap-servers", "127.0.0.1:1"],
])
def test_every_delivering_command_reads_the_key_from_a_file(tmp_path: Path, command: list[str]) -> None:
    """Each refuses a key file holding two lines, naming the file: it read the key from it."""
    key_file = tmp_path / "key"
    key_file.write_text("sk_first\nsk_second\n")
    env = {name: value for name, value in os.environ.items() if name != "TOPSORT_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "engine", *command, "--endpoint", "http://127.0.0.1:9",
                           "--api-key-file", str(key_file)], capture_output=True, cwd=ROOT, env=env, timeout=60)
    assert done.returncode == 2
    assert f"the API key in {key_file} has more than one line".encode() in done.stderr
