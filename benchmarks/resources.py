"""Figures measured on separate processes: peak RSS of ``segment-topsort map`` on a large corpus,
and the time to load and compile a set of rules."""

from __future__ import annotations

import copy
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine import Engine
from engine.paths import BUNDLED_RULES

from .corpus import write_ndjson

TIME = "/usr/bin/time"
MAX_RSS = re.compile(rb"Maximum resident set size \(kbytes\): (\d+)")
_COLD_LOAD = (
    "import sys, time\n"
    "from engine import Engine\n"
    "start = time.perf_counter()\n"
    "Engine.from_folders(sys.argv[1])\n"
    "print(time.perf_counter() - start)\n"
)


@dataclass(frozen=True)
class MapRun:
    """One ``map`` run: its peak RSS, how long it took, and the corpus it read."""

    events: int
    peak_rss_mib: float
    seconds: float
    corpus_bytes: int
    method: str


@dataclass(frozen=True)
class LoadTime:
    """Median load-and-compile time of ``rules`` rules, in a fresh process and in a warm one."""

    rules: int
    cold_ms: float
    warm_ms: float
    runs: int


def map_peak_rss(events: int, seed: int, workdir: Path) -> MapRun:
    """Write ``events`` corpus events to an NDJSON file and stream them through ``segment-topsort map``."""
    corpus = workdir / "corpus.ndjson"
    size = write_ndjson(corpus, events, seed)
    command = [sys.executable, "-m", "engine", "map", str(corpus), "--rejects", str(workdir / "rejects.ndjson")]
    start = time.perf_counter()
    if Path(TIME).exists():
        done = subprocess.run([TIME, "-v", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        found = MAX_RSS.search(done.stderr)
        kib, method = (int(found.group(1)) if found else 0), "/usr/bin/time -v"
    else:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        kib, method = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "getrusage(RUSAGE_CHILDREN)"
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or not kib:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"segment-topsort map failed (exit {done.returncode}):\n{tail}")
    corpus.unlink()
    return MapRun(events, kib / 1024, elapsed, size, method)


def rule_load_time(workdir: Path, count: int = 20, runs: int = 5) -> LoadTime:
    """Median time to load and compile ``count`` rules: the bundled ones plus generated variants."""
    folder = workdir / "rules"
    total = build_rule_set(folder, count)
    cold = [_cold_load(folder) for _ in range(runs)]
    Engine.from_folders(folder)  # the first in-process load pays for imports and the schema
    warm = []
    for _ in range(runs):
        start = time.perf_counter()
        Engine.from_folders(folder)
        warm.append(time.perf_counter() - start)
    return LoadTime(total, statistics.median(cold) * 1000, statistics.median(warm) * 1000, runs)


def build_rule_set(folder: Path, count: int) -> int:
    """Fill ``folder`` with the bundled rule files plus renamed variants, ``count`` rules in all."""
    folder.mkdir(parents=True, exist_ok=True)
    bundled = sorted(BUNDLED_RULES.glob("*.yaml"))
    rules: list[dict[str, Any]] = []
    for file in bundled:
        shutil.copy(file, folder / file.name)
        rules.extend(yaml.safe_load(file.read_text())["rules"])
    variants = [_variant(rules[i % len(rules)], i) for i in range(max(0, count - len(rules)))]
    if variants:
        (folder / "zz-variants.yaml").write_text(yaml.safe_dump({"rules": variants}, sort_keys=False))
    return len(rules) + len(variants)


def _variant(rule: dict[str, Any], number: int) -> dict[str, Any]:
    """A copy of ``rule`` with its own name, for its own track event, without inline tests."""
    variant = copy.deepcopy(rule)
    variant.pop("tests", None)
    variant["name"] = f"{rule['name']}-variant-{number}"
    if "event" in variant["when"]:
        variant["when"]["event"] = f"{variant['when']['event']} (variant {number})"
    else:
        variant["when"] = {"type": "track", "event": f"Screen Variant {number}"}
    return variant


def _cold_load(folder: Path) -> float:
    done = subprocess.run([sys.executable, "-c", _COLD_LOAD, str(folder)], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"loading the rules failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return float(done.stdout)
