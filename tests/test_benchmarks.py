"""The benchmark compares equal work: on generated events the naive interpreter and the hand-written
mapping make exactly the engine's outputs. Plus the corpus itself, and a smoke run of the entry point."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from benchmarks.__main__ import main as bench
from benchmarks.corpus import NOT_WANTED, PRESETS, generate, lines, preset, write_ndjson
from benchmarks.handwritten import HandWritten
from benchmarks.naive import NaiveInterpreter
from benchmarks.resources import build_rule_set
from engine import Engine

from .conftest import run_cli

ENGINE = Engine.from_folders()
CORPUS = [event for seed in (1, 2) for event in generate(200, seed)]


def _engine_outputs(event: Any) -> list[tuple[str, str, dict[str, Any]]]:
    return [(made.kind, made.rule, made.event) for made in ENGINE.process(event).emitted]


@pytest.mark.parametrize("implementation", [NaiveInterpreter, HandWritten], ids=["naive", "hand-written"])
def test_same_outputs_as_the_engine(implementation: Any) -> None:
    other = implementation()
    for event in CORPUS:
        assert other.process(event) == _engine_outputs(event), event


def test_same_encoded_outputs_from_ndjson_lines() -> None:
    naive, hand = NaiveInterpreter(), HandWritten()
    for line in lines(100, seed=3):
        expected = [made.event for made in ENGINE.process(orjson.loads(line)).emitted]
        assert [orjson.loads(text) for text in naive.process_line(line)] == expected
        assert [orjson.loads(data) for data in hand.process_line(line)] == expected


def test_the_corpus_has_every_preset_emitted_and_rejected_events() -> None:
    groups = Counter(preset(event) for event in CORPUS)
    assert set(groups) == set(PRESETS)
    outcomes = [ENGINE.process(event) for event in CORPUS]
    assert sum(len(outcome.emitted) for outcome in outcomes) > len(CORPUS)
    assert 0 < sum(bool(outcome.rejected) for outcome in outcomes) < len(CORPUS) / 10
    assert all(outcome.skipped for event, outcome in zip(CORPUS, outcomes) if preset(event) == NOT_WANTED)


def test_the_corpus_is_messy_like_real_sources() -> None:
    timestamps = {type(event["timestamp"]).__name__ for event in CORPUS}
    assert timestamps == {"str", "int"}
    assert any(isinstance(event.get("userId"), int) for event in CORPUS)
    assert any("anonymousId" not in event and "userId" in event for event in CORPUS)
    prices = [p.get("price") for e in CORPUS for p in e.get("properties", {}).get("products", [])]
    assert any(isinstance(price, str) for price in prices) and any(isinstance(price, float) for price in prices)
    devices = {e["context"].get("device", {}).get("type") for e in CORPUS}
    assert {"iOS", "ios"} <= devices
    sizes = sorted(len(orjson.dumps(event)) for event in CORPUS)
    assert 1500 <= sizes[len(sizes) // 2] <= 3500


def test_the_corpus_follows_the_seed(tmp_path: Path) -> None:
    assert list(lines(50, seed=7)) == list(lines(50, seed=7))
    assert list(lines(50, seed=7)) != list(lines(50, seed=8))
    size = write_ndjson(tmp_path / "corpus.ndjson", 50, seed=7, chunk=16)
    written = (tmp_path / "corpus.ndjson").read_bytes()
    assert len(written) == size
    assert written.splitlines() == list(lines(50, seed=7))


def test_the_rule_set_for_load_time_has_twenty_valid_rules(tmp_path: Path) -> None:
    assert build_rule_set(tmp_path, 20) == 20
    assert len(Engine.from_folders(tmp_path).rules.rules) == 20


def test_smoke_run_of_the_entry_point() -> None:
    result = CliRunner().invoke(bench, ["--events", "80", "--repeat", "1", "--rss-events", "200", "--load-runs", "1"])
    assert result.exit_code == 0, result.output
    for figure in ("Throughput", "Acceptance targets", "peak RSS", "load + compile 20 rules", "Python 3.",
                   "Where an event's time goes", "fixed costs (no mapping at all)"):
        assert figure in result.output
    assert "different numbers of events" not in result.output


def test_the_benchmark_runs_from_the_checkout_not_the_installed_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert b"--rss-events" in done.stdout
    gone = run_cli("bench", "--help")
    assert gone.returncode == 2 and b"No such command 'bench'" in gone.stderr
