"""The numbers ``serve`` exposes at ``GET /metrics``, in the Prometheus text format.

Hand-written (a few counters and two histograms) rather than a client library: nothing else
in the process needs one.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from ...rules.loader import RuleSet
from ...mapping import Mapped

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(slots=True)
class RequestTally:
    """What one request's events became, counted into the metrics once they are spooled."""

    outcomes: Counter[str] = field(default_factory=Counter)
    """Segment events by outcome: emitted, partly_rejected, rejected, skipped, duplicate."""
    emitted: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Topsort events by (rule, kind)."""
    rejected: Counter[str | None] = field(default_factory=Counter)
    """Rejections by rule (None: the input itself)."""

    def add_mapped(self, mapped: Mapped) -> None:
        self.outcomes[mapped.verdict.replace(" ", "_")] += 1
        for event in mapped.events:
            self.emitted[(event.rule, event.kind)] += 1
        for rejection in mapped.rejected:
            self.rejected[rejection.rule] += 1


_PREFIX = "segment_topsort_"
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "requests": ("HTTP requests answered on the ingest paths, by path and status.", ("path", "status")),
    "events": ("Segment events received, by outcome (emitted, partly_rejected, rejected, skipped, duplicate).",
               ("outcome",)),
    "topsort_events": ("Topsort events by rule, kind and outcome (emitted, rejected, delivered, undeliverable).",
                       ("rule", "kind", "outcome")),
    "dead_letters": ("Dead-letter records written to the dead-letter file.", ()),
    "rule_reloads": ("Rule reloads, by result (ok, failed).", ("result",)),
    "spool_errors": ("Faults of the spool (a full disk, a broken file), by error; requests meanwhile get 503.",
                     ("error",)),
}
_HISTOGRAMS = {
    "ingest_latency_seconds": "Time from a request's arrival to its answer, for requests answered 200.",
    "delivery_latency_seconds": "Time from an event's arrival to Topsort accepting it.",
}
_GAUGES = {
    "spool_events": ("gauge", "Topsort events in the spool waiting for delivery."),
    "delivery_requests_total": ("counter", "Requests sent to Topsort (retries and bisections included)."),
    "delivery_retries_total": ("counter", "Requests sent again after a transient failure."),
}


class Metrics:
    """Counters and latency histograms, rendered in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name in _COUNTERS}
        self._histograms = {name: _Histogram() for name in _HISTOGRAMS}
        self._kinds: dict[str, str] = {}

    def rules_loaded(self, rules: RuleSet) -> None:
        """Learn each rule's kind, to label its rejections."""
        self._kinds = {rule.name: rule.kind for rule in rules.rules}

    def count(self, name: str, labels: tuple[str, ...], by: int = 1) -> None:
        with self._lock:
            self._counters[name][labels] += by

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._histograms[name].observe(seconds)

    def tally(self, tally: RequestTally) -> None:
        """Count what a request's events became."""
        with self._lock:
            self._counters["events"].update({(outcome,): n for outcome, n in tally.outcomes.items()})
            topsort = self._counters["topsort_events"]
            for (rule, kind), n in tally.emitted.items():
                topsort[(rule, kind, "emitted")] += n
            for rule, n in tally.rejected.items():
                topsort[(rule or "", self._kinds.get(rule or "", ""), "rejected")] += n

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text, with ``gauges`` (values read at the time) appended."""
        lines: list[str] = []
        with self._lock:
            for name, (help_text, label_names) in _COUNTERS.items():
                full = f"{_PREFIX}{name}_total"
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} counter"]
                values = self._counters[name] or ({(): 0} if not label_names else {})
                for labels, value in sorted(values.items()):
                    lines.append(f"{full}{_labels(label_names, labels)} {value}")
            for name, help_text in _HISTOGRAMS.items():
                lines += self._histograms[name].render(f"{_PREFIX}{name}", help_text)
        for name, value in gauges.items():
            kind, help_text = _GAUGES[name]
            lines += [f"# HELP {_PREFIX}{name} {help_text}", f"# TYPE {_PREFIX}{name} {kind}",
                      f"{_PREFIX}{name} {value}"]
        return "\n".join(lines) + "\n"


class Causes:
    """Causes of failure already logged, so that each is logged once (at most ``limit`` remembered)."""

    def __init__(self, limit: int = 100) -> None:
        self._seen: set[str] = set()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, exc: BaseException) -> str | None:
        """The cause of ``exc`` as text if it was not logged before (and now counts as logged), else None."""
        cause = f"{exc.__class__.__name__}: {exc}"[:300]
        with self._lock:
            if cause in self._seen:
                return None
            if len(self._seen) < self._limit:
                self._seen.add(cause)
        return cause


class _Histogram:
    def __init__(self) -> None:
        self._buckets = [0] * len(_LATENCY_BUCKETS)
        self._count = 0
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._count += 1
        self._sum += value
        for index, bound in enumerate(_LATENCY_BUCKETS):
            if value <= bound:
                self._buckets[index] += 1
                break

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(_LATENCY_BUCKETS, self._buckets, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self._count}', f"{name}_sum {self._sum:.6f}",
                  f"{name}_count {self._count}"]
        return lines


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"
