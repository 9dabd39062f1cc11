"""``serve``'s delivery thread: it owns the spool, commits what requests hand it, and delivers.

The spool's SQLite connection belongs to the dispatcher's thread, so requests hand their
mapped events to that thread through a queue (several requests are committed together, see
:mod:`engine.ingest.http.acking_spool`), and each waits on a future answered once its events' transaction has
committed. Admission reserves room in the spool under one lock, so concurrent requests cannot
overshoot ``max_spooled`` by more than one request.

Faults of the machine (a full disk, an unwritable or broken spool) never stop ``serve``: a commit
that fails answers its requests 503 and delivery goes on; any other failure of the delivery thread
closes the spool and opens it again after a pause, refusing requests meanwhile. Each cause is
logged once, and once more when it is over. Only a refused Topsort API key stops delivery for good.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from ...delivery.dispatch import Dispatcher
from ...delivery.pipeline import deliver
from ...errors import DeliveryError, EngineError, ServeError, SpoolFull
from .dedupe import SeenIds
from .metrics import Metrics
from .settings import ServeSettings
from .acking_spool import ENVIRONMENT, AckingSpool, Batch, Entry, Submission, Trouble
from ...delivery.spool import Spool

log = logging.getLogger("segment_topsort.serve")

_MERGE_INPUTS = 5000
"""Most input events committed to the spool in one transaction (from several requests)."""
_ENDED = object()
"""Taken from the queue by a dispatcher's reader after that dispatcher ended."""


class Reservation:
    """Room in the spool held for one request from admission until its events are committed."""

    def __init__(self, delivery: Delivery, size: int) -> None:
        self._delivery, self.size = delivery, size

    def resize(self, size: int) -> None:
        """Hold room for ``size`` events (what the request's events emitted) instead."""
        with self._delivery._lock:
            self._delivery._reserved += size - self.size
            self.size = size

    def release(self) -> None:
        self.resize(0)


class Delivery:
    """The spool and its dispatcher, on a thread of their own; requests hand submissions to it."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, on_failure: Callable[[], None] | None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._on_failure = on_failure
        self.seen = SeenIds(settings.dedupe_size, settings.dedupe_seconds)
        self._queue: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        self._waiting: set[Future[set[int]]] = set()
        self._lock = threading.Lock()
        self._reserved = 0
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._spool: AckingSpool | None = None
        self._dispatcher: Dispatcher | None = None
        self._totals = {"delivery_requests_total": 0, "delivery_retries_total": 0}
        self._closing = threading.Event()
        self._trouble = Trouble(metrics)
        self.failure: BaseException | None = None

    @property
    def unsent(self) -> int:
        spool = self._spool
        return spool.unsent if spool else 0

    @property
    def trouble(self) -> str | None:
        """Why the spool cannot take events right now, if so."""
        return self._trouble.cause

    def gauges(self) -> dict[str, float]:
        stats = self._dispatcher.stats if self._dispatcher else None
        return {
            "spool_events": self.unsent,
            "delivery_requests_total": self._totals["delivery_requests_total"] + (stats.requests if stats else 0),
            "delivery_retries_total": self._totals["delivery_retries_total"] + (stats.retries if stats else 0),
        }

    def start(self) -> None:
        """Open the spool and start delivering; raises :class:`ServeError` if the spool cannot be used."""
        self._thread = threading.Thread(target=self._run, name="segment-topsort-delivery", daemon=True)
        self._thread.start()
        self._ready.result()

    def admit(self, size: int) -> Reservation:
        """Hold room for a request of ``size`` events, checked and reserved at once (one lock), or refuse.

        Admission needs the spool and its waiting and reserved events below ``max_spooled``, so
        concurrent requests can pass it by at most one request's events in all.
        """
        with self._lock:
            if self.failure is not None:
                raise ServeError(f"delivery stopped: {self.failure}")
            if self._spool is None or self._closing.is_set():
                raise ServeError(self._trouble.cause or "the receiver is stopping")
            waiting = self._spool.unsent + self._reserved
            if waiting >= self._settings.max_spooled:
                raise SpoolFull(f"{waiting} events wait for delivery; retry later")
            self._reserved += size
        return Reservation(self, size)

    def submit(self, entries: list[Entry], received: float) -> Future[set[int]]:
        """Queue a request's entries for the spool; the future is done once they are committed."""
        submission = Submission(entries, received)
        ack = submission.ack
        ack.set_running_or_notify_cancel()  # a request given up while waiting cannot cancel the commit
        with self._lock:
            if self._closing.is_set() or self.failure is not None or self._spool is None:
                ack.set_exception(ServeError("the receiver is stopping or restarting its spool; retry later"))
                return ack
            self._waiting.add(ack)
        ack.add_done_callback(self._done)
        self._queue.put(submission)
        return ack

    def close(self) -> None:
        """Take no more requests; deliver what was committed for at most the drain timeout."""
        with self._lock:
            self._closing.set()
            if self._dispatcher is not None:
                self._dispatcher.stop(self._settings.drain_timeout)
        self._queue.put(None)
        if self._thread:
            self._thread.join()

    def _done(self, ack: Future[set[int]]) -> None:
        with self._lock:
            self._waiting.discard(ack)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        pause = 0.1
        while True:
            outcome = self._run_once()
            if outcome is not None or self._closing.is_set():
                return
            if self._closing.wait(pause):
                return
            pause = min(pause * 2, float(self._settings.retry_after))

    def _run_once(self) -> bool | None:
        """Open the spool and deliver until closed (True) or stopped for good (False); None: open again."""
        settings = self._settings
        try:
            spool = AckingSpool(settings.spool, self._metrics, self.seen, self._trouble)
        except EngineError as exc:
            return self._spool_failed(exc)
        with spool:
            try:
                self.seen.clear()
                self.seen.remember(spool.seen_messages())
                self._export(spool)
                dispatcher = settings.target.dispatcher(spool, high_water=sys.maxsize)
            except ENVIRONMENT as exc:
                return self._spool_failed(exc)
            with self._lock:
                self._spool, self._dispatcher = spool, dispatcher
                if self._closing.is_set():
                    dispatcher.stop(settings.drain_timeout)
            if not self._ready.done():
                self._ready.set_result(None)
            self._trouble.over("the spool opened again")
            ended = threading.Event()
            try:
                deliver(dispatcher, self._submissions(ended), lambda: self._tick(spool))
                if spool.unsent:
                    log.warning("stopped with %d event(s) still in the spool %s; they are delivered on the next"
                                " start", spool.unsent, settings.spool)
                return True
            except DeliveryError as exc:
                self._fail(exc)
                return False
            except Exception as exc:  # the machine's fault, or serve's own: never its end
                self._trouble.report(exc, "delivery paused, the spool is opened again shortly")
                return None
            except BaseException as exc:
                self._fail(exc)
                raise
            finally:
                ended.set()
                with self._lock:
                    self._spool = None
                    stats = dispatcher.stats
                    self._totals["delivery_requests_total"] += stats.requests
                    self._totals["delivery_retries_total"] += stats.retries
                    self._dispatcher = None
                self._abandon_waiting()
                try:
                    self._export(spool)
                except ENVIRONMENT as exc:
                    self._trouble.report(exc, "dead letters are exported later")

    def _spool_failed(self, exc: BaseException) -> bool | None:
        if not self._ready.done():  # the first start: serve cannot begin
            self._ready.set_exception(ServeError(str(exc)))
            return False
        self._trouble.report(exc, "requests are answered 503 until it opens again")
        return None

    def _submissions(self, ended: threading.Event) -> Iterator[Batch]:
        """Queued submissions, merged while more are at hand, until close.

        Once ``ended`` (its dispatcher is gone and the spool about to be opened again), whatever it
        takes from the queue is put back for the next one.
        """
        stop = False
        while not stop:
            item = self._take(ended)
            if item is _ENDED:
                return
            batch = Batch()
            while isinstance(item, Submission):
                if not item.ack.done():  # else abandoned when the spool was opened again
                    batch.add_submission(item)
                if batch.size >= _MERGE_INPUTS or self._queue.empty():
                    break
                item = self._take(ended)
            stop = item is None or item is _ENDED
            if batch.submissions:
                yield batch

    def _take(self, ended: threading.Event) -> Submission | None | object:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if ended.is_set():
                    return _ENDED
                continue
            if ended.is_set():
                self._queue.put(item)
                return _ENDED
            return item

    def _tick(self, spool: AckingSpool) -> None:
        self._export(spool)
        spool.prune()

    def _export(self, spool: Spool) -> None:
        made = spool.export_dead_letters(self._settings.dead_letters)
        if made:
            self._metrics.count("dead_letters", (), made)

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        log.error("delivery stopped: %s", exc)
        if self._on_failure:
            self._on_failure()

    def _abandon_waiting(self) -> None:
        """Answer requests whose events never reached the spool: they were not kept."""
        with self._lock:
            waiting = list(self._waiting)
        for ack in waiting:
            if not ack.done():
                ack.set_exception(ServeError("the spool closed before the events were committed; retry later"))


