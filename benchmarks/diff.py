"""`segment-topsort diff` against `segment-topsort map` on the same corpus, as whole processes.

    .venv/bin/python benchmarks/diff.py [--events 100000] [--rounds 3] [--seed 0]

`diff` maps every event twice (the bundled rules, and the same rules with opaqueUserId from
anonymousId only), so about half of map's events/s is its ceiling. Rounds alternate map and diff
(best of each kept), so both see the same load; peak RSS is each process's own, also
measured on a fifth of the corpus to show that memory stays flat as the input grows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corpus import write_ndjson  # noqa: E402
from benchmarks.resources import MAX_RSS, TIME  # noqa: E402
from engine.paths import BUNDLED_RULES  # noqa: E402

_EDIT = ("opaqueUserId: {first: [anonymousId, userId]}", "opaqueUserId: anonymousId")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="segment-topsort-diff-bench-") as folder:
        work = Path(folder)
        corpus, small = work / "corpus.ndjson", work / "small.ndjson"
        print(f"writing {args.events:,} events (seed {args.seed}) …", file=sys.stderr)
        size = write_ndjson(corpus, args.events, args.seed)
        write_ndjson(small, max(1, args.events // 5), args.seed)
        edited = _edited_rules(work / "edited")
        map_command = ["map"]
        diff_command = ["diff", "--base", str(BUNDLED_RULES), "--rules", str(edited), "--format", "json"]
        best: dict[str, tuple[float, float]] = {}
        for round_ in range(args.rounds):
            for name, command in (("map", map_command), ("diff", diff_command)):
                seconds, rss = _run([*command, str(corpus)])
                print(f"round {round_ + 1}: {name} {args.events / seconds:,.0f} events/s, peak RSS {rss:.0f} MiB",
                      file=sys.stderr)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, rss)
        _, small_rss = _run([*diff_command, str(small)])

    rate = {name: args.events / seconds for name, (seconds, _) in best.items()}
    print(f"corpus: {args.events:,} events, {size / 2**20:.0f} MiB NDJSON; best of {args.rounds} rounds, "
          "whole processes (start-up and rule loading included)")
    print(f"map                       {rate['map']:>9,.0f} events/s   peak RSS {best['map'][1]:6.1f} MiB")
    print(f"diff (--format json)      {rate['diff']:>9,.0f} events/s   peak RSS {best['diff'][1]:6.1f} MiB "
          f"({small_rss:.1f} MiB on {max(1, args.events // 5):,} events)")
    print(f"diff / map: {rate['diff'] / rate['map']:.2f}x (target >= 0.40x)")


def _edited_rules(folder: Path) -> Path:
    shutil.copytree(BUNDLED_RULES, folder)
    for file in folder.glob("*.yaml"):
        file.write_text(file.read_text().replace(*_EDIT))
    return folder


def _run(arguments: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one ``python -m engine`` process, its output discarded.

    The RSS comes from ``/usr/bin/time -v`` where it is installed: a child forked from this
    (larger) process would carry this process's peak into its own across exec.
    """
    command = [sys.executable, "-m", "engine", *arguments]
    timed = Path(TIME).exists()
    start = time.perf_counter()
    process = subprocess.Popen([TIME, "-v", *command] if timed else command,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{arguments[0]} failed:\n{errors.decode(errors='replace')[-2000:]}")
    found = MAX_RSS.search(errors) if timed else None
    return seconds, (int(found.group(1)) if found else usage.ru_maxrss) / 1024


if __name__ == "__main__":
    main()
