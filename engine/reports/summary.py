"""Count outcomes as they stream by, and show them as one table at the end of a run."""

from __future__ import annotations

import time
from collections import Counter

from rich.table import Table

from ..outcome import KINDS, Outcome, Rejection
from ..ingest.files import SourceFault
from ..mapping import Mapped


class Tally:
    """Every input event lands in exactly one of: emitted, partly rejected, rejected, skipped."""

    def __init__(self) -> None:
        self.events = Counter[str]()
        self.emitted = Counter[str]()
        self.reasons = Counter[tuple[str, str]]()
        self.faults: list[SourceFault] = []
        """Sources (or their rest) that could not be read."""
        self.started = time.perf_counter()

    @property
    def read(self) -> int:
        return sum(self.events.values())

    def add(self, outcome: Outcome) -> None:
        self._count(outcome.verdict, outcome.rejected)
        for emitted in outcome.emitted:
            self.emitted[emitted.kind] += 1

    def add_mapped(self, mapped: Mapped) -> None:
        """Count what one input event became, as the map stage gave it."""
        self._count(mapped.verdict, mapped.rejected)
        for event in mapped.events:
            self.emitted[event.kind] += 1

    def _count(self, verdict: str, rejected: tuple[Rejection, ...]) -> None:
        self.events[verdict] += 1
        for rejection in rejected:
            parts = rejection.reason.split(": ")
            # an input's own problem reads "origin:line: what: detail"; a rule's "…: why"
            reason = parts[-1] if rejection.rule is not None else parts[min(1, len(parts) - 1)]
            self.reasons[(rejection.rule or "(input)", f"{rejection.path} {reason}")] += 1

    def fault(self, fault: SourceFault) -> None:
        """Count a source that could not be read to its end."""
        self.faults.append(fault)

    def table(self, title: str = "Outcomes", extra: dict[str, int] | None = None, top: int = 10) -> Table:
        """The summary: events by outcome, Topsort events by kind, the commonest rejection reasons."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("events read", f"{self.read:,}")
        if self.faults:
            table.add_row("files not read to their end", f"{len(self.faults):,}")
        for outcome in ("emitted", "partly rejected", "rejected", "skipped"):
            table.add_row(f"  {outcome}", f"{self.events[outcome]:,}")
        for kind in KINDS:
            table.add_row(f"Topsort {kind}", f"{self.emitted[kind]:,}")
        for label, value in (extra or {}).items():
            table.add_row(label, f"{value:,}")
        for (rule, reason), count in self.reasons.most_common(top):
            table.add_row(f"rejected by {rule}: {reason}", f"{count:,}")
        table.add_row("events/s", f"{self.read / elapsed:,.0f}")
        return table
