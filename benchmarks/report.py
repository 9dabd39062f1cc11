"""The benchmark's tables: machine, throughput per preset, and the team's acceptance targets."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from .resources import LoadTime, MapRun
from .throughput import STREAM, Timing, overall

TARGET_EVENTS_PER_SECOND = 40_000
TARGET_VS_NAIVE = 20.0
TARGET_VS_HANDWRITTEN = 0.5
TARGET_RSS_MIB = 150.0
TARGET_LOAD_MS = 300.0


@dataclass(frozen=True)
class Results:
    """Everything one benchmark run measured."""

    events: int
    seed: int
    corpus_bytes: int
    engine: Mapping[str, Timing]
    handwritten: Mapping[str, Timing]
    naive: Mapping[str, Timing]
    floor: Mapping[str, Timing]
    map_run: MapRun | None
    load: LoadTime | None
    rss_skipped: bool = False


def machine() -> str:
    """CPU count, CPU model, Python version and load: the context of every figure."""
    cpus = os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpus} CPUs{f' ({model})' if model else ''}, Python {platform.python_version()} "
            f"({sys.implementation.name}), {platform.system()} {platform.machine()}, load average {load}")


def render(console: Console, results: Results) -> None:
    """Print the per-preset table and the acceptance table."""
    console.print(f"[bold]Machine:[/] {machine()}")
    console.print(f"[bold]Corpus:[/] {results.events:,} events (seed {results.seed}), "
                  f"{results.corpus_bytes / results.events / 1024:.2f} KiB per event on average; "
                  "one thread; best of the repeats for engine and hand-written (alternating), one pass for naive")
    console.print(_presets_table(results))
    console.print(_budget_table(results))
    console.print(_targets_table(results))


def _presets_table(results: Results) -> Table:
    table = Table(title="Throughput: decode + map + validate + encode, events/s (µs/event)")
    for column in ("preset", "events", "Topsort out", "engine", "hand-written", "naive", "engine/naive",
                   "engine/hand"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    presets = [name for name in results.engine if name != STREAM]
    rows = [(name, results.engine[name], results.handwritten.get(name), results.naive.get(name))
            for name in presets]
    rows.append(("all, preset by preset (sum)", overall(results.engine), overall(results.handwritten),
                 overall(results.naive)))
    rows.append((STREAM, *_headline(results)))
    for name, engine, hand, naive in rows:
        table.add_row(
            name, f"{engine.events:,}", f"{engine.emitted:,}", _rate(engine), _rate(hand), _rate(naive),
            _ratio(engine, naive), _ratio(engine, hand), style="bold" if name == STREAM else None,
            end_section=name == presets[-1],
        )
    return table


def _headline(results: Results) -> tuple[Timing, Timing, Timing]:
    """Engine, hand-written and naive over the whole corpus in stream order."""
    return results.engine[STREAM], results.handwritten[STREAM], results.naive[STREAM]


def _budget_table(results: Results) -> Table:
    """Per event in stream order: the fixed costs every implementation pays, and what mapping adds."""
    floor = results.floor[STREAM]
    budget = 1e6 / TARGET_EVENTS_PER_SECOND
    table = Table(title=f"Where an event's time goes, stream order (µs/event; {TARGET_EVENTS_PER_SECOND:,}/s "
                        f"allows {budget:.0f})")
    for column in ("", "total", "decode + validate + encode", "routing and mapping"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("fixed costs (no mapping at all)", f"{floor.micros:.1f}", f"{floor.micros:.1f}", "–")
    for name, timing in (("engine", results.engine[STREAM]), ("hand-written", results.handwritten[STREAM])):
        table.add_row(name, f"{timing.micros:.1f}", f"{floor.micros:.1f}", f"{timing.micros - floor.micros:.1f}")
    table.add_row("left for mapping at the target", f"{budget:.1f}", f"{floor.micros:.1f}",
                  f"{budget - floor.micros:.1f}")
    return table


def _targets_table(results: Results) -> Table:
    engine, hand, naive = _headline(results)
    table = Table(title="Acceptance targets (the corpus in stream order)")
    for column in ("figure", "measured", "target", "verdict"):
        table.add_column(column, justify="left" if column in ("figure", "verdict") else "right")
    vs_naive = engine.per_second / naive.per_second
    vs_hand = engine.per_second / hand.per_second
    table.add_row("engine events/s, one core", f"{engine.per_second:,.0f}", f"≥ {TARGET_EVENTS_PER_SECOND:,}",
                  _verdict(engine.per_second, TARGET_EVENTS_PER_SECOND))
    table.add_row("engine / naive", f"{vs_naive:.1f}×", f"≥ {TARGET_VS_NAIVE:.0f}×", _verdict(vs_naive, TARGET_VS_NAIVE))
    table.add_row("engine / hand-written", f"{vs_hand:.2f}×", f"≥ {TARGET_VS_HANDWRITTEN}×",
                  _verdict(vs_hand, TARGET_VS_HANDWRITTEN))
    run = results.map_run
    if run is None:
        table.add_row("peak RSS, map", "skipped" if results.rss_skipped else "failed (see above)",
                      f"< {TARGET_RSS_MIB:.0f} MiB", "")
    else:
        table.add_row(f"peak RSS, map of {run.events:,} events", f"{run.peak_rss_mib:.1f} MiB",
                      f"< {TARGET_RSS_MIB:.0f} MiB", _verdict(TARGET_RSS_MIB, run.peak_rss_mib, strict=True))
        table.add_row("  map end to end (CLI, one process)", f"{run.events / run.seconds:,.0f} events/s",
                      "", f"{run.seconds:.1f} s for {run.corpus_bytes / 2**20:,.0f} MiB; {run.method}")
    load = results.load
    if load is None:
        table.add_row("load + compile 20 rules", "failed (see above)", f"< {TARGET_LOAD_MS:.0f} ms", "")
        return table
    table.add_row(f"load + compile {load.rules} rules, fresh process", f"{load.cold_ms:.0f} ms",
                  f"< {TARGET_LOAD_MS:.0f} ms", _verdict(TARGET_LOAD_MS, load.cold_ms, strict=True))
    table.add_row("  same, warm process (caches kept)", f"{load.warm_ms:.0f} ms", "",
                  f"median of {load.runs}")
    return table


def _rate(timing: Timing | None) -> str:
    if timing is None:
        return "–"
    return f"{timing.per_second:,.0f} ({timing.micros:,.1f})"


def _ratio(engine: Timing, other: Timing | None) -> str:
    if other is None or not other.per_second:
        return "–"
    return f"{engine.per_second / other.per_second:.2f}×"


def _verdict(have: float, need: float, strict: bool = False) -> str:
    """met, or how far from it: ``have`` must reach ``need`` (exceed it when ``strict``)."""
    met = have > need if strict else have >= need
    return "[green]met[/]" if met else f"[red]missed[/] by {need / have:.1f}×"
