"""The spool as ``serve`` uses it: requests' events committed together, repeats dropped, each answered.

Repeated messageIds are dropped at commit, against the ids already committed (and remembered in
the same transaction), so an id counts as seen only once its event is safely spooled. A commit
that fails for the machine (a full disk) answers its requests with :class:`ServeError` (503); one
that fails for what the events hold answers :class:`ContentError` (500), after the requests merged
with it were committed one by one, so that none of them pays for another.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ContentError, ServeError
from ...mapping import Mapped
from .dedupe import SeenIds
from .metrics import Causes, Metrics
from ...record import Record
from ...delivery.spool import Chunk, Spool, Spooled

log = logging.getLogger("segment_topsort.serve")

_TRACKED_LATENCIES = 1_000_000
"""Most spooled events whose arrival time is kept to measure their delivery latency."""
_PRUNE_EVERY = 10.0
"""Seconds between two prunings of the stored messageIds."""
ENVIRONMENT = (sqlite3.Error, OSError)
"""Failures of the machine rather than of the events: answered 503, retried by the sender."""


@dataclass(slots=True)
class Entry:
    """One input event of a request, mapped: what the spool keeps of it."""

    message_id: str | None
    record: Record
    mapped: Mapped


@dataclass(slots=True)
class Submission:
    """A request's entries; ``ack`` gets the positions of entries dropped as already seen."""

    entries: list[Entry]
    received: float
    ack: Future[set[int]] = field(default_factory=Future)


class Trouble:
    """The current fault of the spool, logged once when it starts and once when it is over."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.cause: str | None = None
        self._lock = threading.Lock()

    def report(self, exc: BaseException, consequence: str) -> None:
        cause = f"spool {exc.__class__.__name__}: {exc}"
        self._metrics.count("spool_errors", (exc.__class__.__name__,))
        with self._lock:
            first, self.cause = cause != self.cause, cause
        if first:
            log.error("%s; %s", cause, consequence)

    def over(self, how: str) -> None:
        with self._lock:
            was, self.cause = self.cause, None
        if was is not None:
            log.info("%s: events are taken again (was: %s)", how, was)


@dataclass(slots=True)
class Batch(Chunk):
    """Submissions of several requests, committed together."""

    submissions: list[Submission] = field(default_factory=list)
    size: int = 0

    def add_submission(self, submission: Submission) -> None:
        self.submissions.append(submission)
        self.size += len(submission.entries)


class AckingSpool(Spool):
    """A spool that drops repeated messageIds at commit, answers each request once its events are
    committed (or could not be), and times deliveries."""

    def __init__(self, path: Path, metrics: Metrics, seen: SeenIds, trouble: Trouble) -> None:
        super().__init__(path)
        self._metrics = metrics
        self._seen = seen
        self._trouble = trouble
        self._arrived: dict[tuple[str, str], float] = {}
        self._pruned = time.monotonic()
        self._content_errors = Causes()

    def commit(self, chunk: Chunk) -> None:
        if not isinstance(chunk, Batch):
            super().commit(chunk)
            return
        groups = [chunk.submissions]
        if len(chunk.submissions) > 1:
            groups += [[submission] for submission in chunk.submissions]
        for group in groups:  # all together; if that fails, one request at a time
            try:
                self._commit(group)
                return
            except ENVIRONMENT as exc:
                self._trouble.report(exc, "requests are answered 503 until a commit succeeds")
                failure: ServeError = ServeError(f"the spool cannot store events now ({exc}); retry later")
            except Exception as exc:  # what the events hold: answered 500, never the others' loss
                if cause := self._content_errors.first(exc):
                    log.error("a request's events could not be spooled (logged once per cause): %s", cause)
                failure = ContentError(f"the events could not be stored: {exc.__class__.__name__}: {exc}")
            if len(group) == 1:
                group[0].ack.set_exception(failure)

    def _commit(self, submissions: Sequence[Submission]) -> None:
        chunk, dropped, arrivals = _merged(submissions, self._seen)
        super().commit(chunk)
        self._trouble.over("a commit succeeded")
        self._seen.remember(chunk.seen)
        if len(self._arrived) < _TRACKED_LATENCIES:
            for (_, events), arrived in zip(chunk.encoded, arrivals, strict=True):
                for e in events:
                    self._arrived[(e.kind, e.id)] = arrived
        for submission, gone in zip(submissions, dropped, strict=True):
            submission.ack.set_result(gone)

    def prune(self) -> None:
        """Forget stored messageIds beyond the window, now and then."""
        if time.monotonic() - self._pruned >= _PRUNE_EVERY:
            self._pruned = time.monotonic()
            self.forget_messages(time.time() - self._seen.seconds, self._seen.size)

    def settle(self, delivered: Sequence[Spooled], failed: Sequence[tuple[Spooled, dict[str, Any]]]) -> int:
        made = super().settle(delivered, failed)
        now = time.monotonic()
        for row in delivered:
            self._metrics.count("topsort_events", (row.rule, row.kind, "delivered"))
            arrived = self._arrived.pop((row.kind, row.event_id), None)
            if arrived is not None:
                self._metrics.observe("delivery_latency_seconds", now - arrived)
        for row, _ in failed:
            self._metrics.count("topsort_events", (row.rule, row.kind, "undeliverable"))
            self._arrived.pop((row.kind, row.event_id), None)
        return made


def _merged(submissions: Sequence[Submission], seen: SeenIds) -> tuple[Chunk, list[set[int]], list[float]]:
    """One chunk of the submissions' entries, without those whose messageId was committed before
    (or comes twice here); the positions dropped per submission; the arrival of each input kept."""
    chunk, dropped, arrivals = Chunk(), [], []
    taken: set[str] = set()
    now = time.time()
    for submission in submissions:
        gone = set()
        for index, entry in enumerate(submission.entries):
            message_id = entry.message_id
            if message_id is not None and seen.enabled:
                if message_id in taken or message_id in seen:
                    gone.add(index)
                    continue
                taken.add(message_id)
                chunk.seen.append((message_id, now))
            chunk.add_mapped(entry.record, entry.mapped)  # counted once answered, without the duplicates
            if entry.mapped.events:
                arrivals.append(submission.received)
        dropped.append(gone)
    return chunk, dropped, arrivals

