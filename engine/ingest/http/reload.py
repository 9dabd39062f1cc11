"""``serve``'s rules: the engine in force, reloaded on SIGHUP or when the rule files change.

A reload that finds errors, or cannot load the files at all, is logged and counted
(``rule_reloads_total{result="failed"}``), and the rules in force stay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from ...engine import Engine
from ...rules.loader import RULE_FILE_SUFFIXES, RuleSet, check_rules
from ...paths import BUNDLED_RULES
from .metrics import Metrics

log = logging.getLogger("segment_topsort.serve")


class RuleReloader:
    """The engine built from ``folders`` (none: the bundled rules), and its reloads."""

    def __init__(self, folders: Sequence[Path], metrics: Metrics) -> None:
        self._folders = tuple(folders) or (BUNDLED_RULES,)
        self._metrics = metrics
        self._lock = threading.Lock()
        self._loaded_state = _rule_files_state(self._folders)
        """The rule files as they were when the rules in force were read (taken before reading)."""
        self.engine = Engine.from_folders(*self._folders)
        metrics.rules_loaded(self.engine.rules)

    def reload(self) -> bool:
        """Load the rule folders again and use them, unless they have errors or cannot be loaded at all
        (then log why, count it, and keep the rules in force). True when the new rules are in force."""
        with self._lock:
            self._loaded_state = _rule_files_state(self._folders)
            try:
                rules, problems = check_rules(self._folders, double_counts=False)
                errors = [str(p) for p in problems if p.severity == "error"]
            except Exception as exc:  # a loader fault (RecursionError, MemoryError, ...) must not end serve
                rules, problems, errors = [], [], [f"{exc.__class__.__name__}: {exc}"]
            if errors:
                self._metrics.count("rule_reloads", ("failed",))
                log.error("rules not reloaded: %d error(s); the previous rules stay in force\n%s",
                          len(errors), "\n".join(errors))
                return False
            for warning in problems:
                log.warning("%s", warning)
            self.engine = Engine(RuleSet(tuple(rules), tuple(problems)))
            self._metrics.rules_loaded(self.engine.rules)
            self._metrics.count("rule_reloads", ("ok",))
            log.info("rules reloaded: %d rule(s), %d enabled", len(rules), sum(r.enabled for r in rules))
            return True

    def watch(self, seconds: float, closing: threading.Event) -> None:
        """Reload whenever the rule files change, looking every ``seconds``, until ``closing`` is set.

        Changes are judged against the files as they were when the rules in force were read, so an
        edit made before this thread first looks is not missed."""
        while not closing.wait(seconds):
            if _rule_files_state(self._folders) != self._loaded_state:
                self.reload()


def _rule_files_state(folders: Sequence[Path]) -> list[tuple[str, int, int]]:
    """Path, size and modification time of each rule file: what editing the rules changes."""
    state = []
    for folder in map(Path, folders):
        files = [folder] if folder.is_file() else sorted(folder.rglob("*"))
        for file in files:
            try:
                stat = file.stat()
            except OSError:  # gone since listed
                continue
            if file.suffix in RULE_FILE_SUFFIXES:
                state.append((str(file), stat.st_size, stat.st_mtime_ns))
    return state
