"""``python -m benchmarks``: the engine against a naive interpreter
of the same rules and a hand-written mapping, on one seeded corpus; peak RSS of ``map``; rule load time."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import click
import orjson
from rich.console import Console

from engine import Engine

from .corpus import PRESETS, generate, preset, write_ndjson
from .handwritten import HandWritten
from .naive import NaiveInterpreter
from .report import Results, render
from .resources import map_peak_rss, rule_load_time
from .throughput import (
    STREAM,
    Timing,
    engine_pipeline,
    floor_pipeline,
    handwritten_pipeline,
    naive_pipeline,
    time_groups,
)

T = TypeVar("T")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--events", default=10_000, show_default=True, help="Corpus size for the throughput figures.")
@click.option("--seed", default=0, show_default=True, help="Seed of the corpus generator.")
@click.option("--repeat", default=5, show_default=True,
              help="Rounds of timed passes of engine and hand-written, alternating (best kept).")
@click.option("--rss-events", default=1_000_000, show_default=True,
              help="Events streamed through `segment-topsort map` for the peak RSS.")
@click.option("--skip-rss", is_flag=True, help="Skip the peak RSS measurement.")
@click.option("--load-runs", default=5, show_default=True, help="Runs of the rule load time (median kept).")
@click.option("--write-corpus", type=click.Path(dir_okay=False, path_type=Path),
              help="Only write the corpus (--events events) to this NDJSON file, and exit.")
def main(events: int, seed: int, repeat: int, rss_events: int, skip_rss: bool, load_runs: int,
         write_corpus: Path | None) -> None:
    """Measure the engine: events/s overall and per preset, ratios to naive and hand-written,
    peak RSS of `map`, and load time of 20 rules."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=150)
    status = Console(stderr=True, highlight=False)
    if write_corpus is not None:
        size = write_ndjson(write_corpus, events, seed)
        status.print(f"wrote {events:,} events ({size / 2**20:.1f} MiB) to {write_corpus}")
        return
    status.print(f"generating {events:,} events (seed {seed})")
    groups: dict[str, list[bytes]] = defaultdict(list)
    stream: list[bytes] = []
    for event in generate(events, seed):
        stream.append(orjson.dumps(event))
        groups[preset(event)].append(stream[-1])
    # each preset on its own, then the whole corpus in the order a real stream mixes them
    ordered = {**{name: groups[name] for name in PRESETS if groups.get(name)}, STREAM: stream}
    corpus_bytes = sum(len(line) for line in stream)

    status.print(f"timing the engine, the hand-written mapping and the fixed costs ({repeat} rounds)")
    mapper = Engine.from_folders()
    fast = {"engine": engine_pipeline(mapper), "hand-written": handwritten_pipeline(HandWritten()),
            "floor": floor_pipeline(mapper, stream)}
    timed = time_groups(fast, ordered, repeat)
    engine, handwritten, floor = timed["engine"], timed["hand-written"], timed["floor"]
    status.print("timing the naive interpreter (slow, one round)")
    naive = time_groups({"naive": naive_pipeline(NaiveInterpreter())}, ordered, 1)["naive"]
    _check_same_counts(status, engine, handwritten, naive, floor)

    with tempfile.TemporaryDirectory(prefix="segment-topsort-bench-") as tmp:
        status.print(f"loading and compiling 20 rules ({load_runs} runs)")
        load = _unless_failing(status, lambda: rule_load_time(Path(tmp), runs=load_runs))
        map_run = None
        if not skip_rss:
            status.print(f"writing {rss_events:,} events and streaming them through `segment-topsort map`")
            map_run = _unless_failing(status, lambda: map_peak_rss(rss_events, seed, Path(tmp)))
    render(console, Results(events, seed, corpus_bytes, engine, handwritten, naive, floor, map_run, load, skip_rss))


def _unless_failing(status: Console, measure: Callable[[], T]) -> T | None:
    """A measurement made in another process, or None (and why on stderr) when that process failed."""
    try:
        return measure()
    except RuntimeError as exc:
        status.print(f"[red]failed:[/] {exc}")
        return None


def _check_same_counts(status: Console, *measured: Mapping[str, Timing]) -> None:
    """Warn when the implementations did not make the same number of Topsort events."""
    counts = {tuple(timing.emitted for timing in timings.values()) for timings in measured}
    if len(counts) > 1:
        status.print("[red]warning: the implementations emitted different numbers of events; "
                     "the comparison is not of equal work (run tests/test_benchmarks.py)[/]")


if __name__ == "__main__":
    main()
