"""Count outcomes as they stream by, and show them as one table at the end of a run."""

from __future__ import annotations

import time
from collections import Counter

from rich.table import Table

from typing import TYPE_CHECKING

from ..outcome import KINDS, Outcome, Rejection
from ..record import SourceFault

if TYPE_CHECKING:
    from ..mapping import Mapped, MappedSlice


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
        """Count one event's outcome."""
        self._count(outcome.verdict, outcome.rejected, [emitted.kind for emitted in outcome.emitted])

    def add_mapped(self, mapped: Mapped) -> None:
        """Count one event as the map stage gave it back."""
        self._count(mapped.verdict, mapped.rejected, [event.kind for event in mapped.events])

    def _count(self, verdict: str, rejected: tuple[Rejection, ...], kinds: list[str]) -> None:
        self.events[verdict] += 1
        for rejection in rejected:
            self.reasons[rejection.summary_key()] += 1
        self.emitted.update(kinds)

    def add_slice(self, mapped: MappedSlice) -> None:
        """Count the events of a slice as the map stage summed them up."""
        self.events.update(mapped.verdicts)
        self.reasons.update(mapped.reasons)
        for code, kind in enumerate(KINDS):
            self.emitted[kind] += mapped.kinds.count(code)

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
