"""Deliver spooled events to Topsort's ``POST /v2/events``.

:meth:`Dispatcher.run` drains the spool, in spool order, so events left by an earlier run go first.
It owns the spool while it runs (SQLite connections stay on one thread), so chunks of mapped input
are handed to it with :meth:`Dispatcher.offer` (from the pipeline's thread, see
:func:`engine.delivery.pipeline.deliver`) and committed by its loop, a few at most ahead of delivery. Events are packed by
:class:`~engine.topsort.batching.Batcher` (up to 50 per array, kinds mixed); a batch leaves when an array is
full or its oldest event has waited ``max_latency`` seconds. Up to ``max_in_flight`` requests run
at once, in worker threads sharing one httpx transport with a keep-alive connection for each
(:func:`~engine.delivery.transport.default_transport`, through the environment's proxy if it names one).

* 2xx: the batch is delivered.
* network errors, timeouts, 408, 429, 5xx: retried as :class:`~engine.delivery.retry.RetryPolicy` says;
  a delay the server names (``Retry-After``, ``X-RateLimit-Reset``) pauses every request. Once the
  time budget is spent, the batch's events are dead-lettered as undeliverable.
* 400, 422 and other refusals: Topsort refused the whole request without saying which event was
  wrong, so the batch is bisected until the refused events are isolated; the rest is delivered.
* 401, 403: :class:`AuthenticationError`; 404, 405: :class:`EndpointError`. Delivery stops and
  every unsettled event stays in the spool for the next run.

Stopping is an explicit state (:class:`State`): :meth:`Dispatcher.stop` sets a deadline, and
``run`` returns once its input ended and the spool is empty, or at that deadline, with the requests
in flight answered and settled; front-ends stop delivery this way, never by raising through it.

Outcomes are settled in the spool in groups (:meth:`Spool.settle`); an outcome lost in a crash only
means its events are sent again, under the same ids, which Topsort deduplicates.

Requests go through ``transport`` when one is given (``httpx.MockTransport`` in unit tests, any
``httpx.BaseTransport`` in a library), and retries wait by ``clock`` (a :class:`Clock`).

One cohesive thing (the delivery loop, its batches and their requests), hence over 350 lines.
"""

from __future__ import annotations

import enum
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from .api_key import scrub
from ..topsort.batching import Batcher, encoded_body
from ..errors import AuthenticationError, DeliveryError, DeliveryStopped, EndpointError, UnreachableError
from ..outcome import KINDS, Kind, Rejection
from .retry import RetryPolicy, is_transient, server_delay
from .spool import Chunk, Spool, Spooled
from .transport import default_transport

EVENTS_PATH = "/v2/events"
_FETCH = 1000
"""Events read from the spool at a time (at least: whole chunks are read)."""
_SETTLE_EVERY = 0.2
"""Seconds between two settlements of delivery outcomes in the spool (and two ticks)."""
_SETTLE_SIZE = 5000
"""Outcomes that trigger a settlement sooner."""
_CHUNKS_AHEAD = 4
"""Chunks of input read ahead of the spool."""


@dataclass(slots=True)
class DeliveryStats:
    """Running totals of one delivery."""

    delivered: int = 0
    failed: int = 0
    """Events given up (each one is part of a ``deliver`` dead letter)."""
    dead_letters: int = 0
    """Dead-letter records made (one per input event, however many of its events failed)."""
    requests: int = 0
    retries: int = 0
    """Requests sent again after a transient failure."""


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why events were not delivered. ``bisect``: Topsort refused the request as a whole (some
    of its events may be fine); otherwise it could not be delivered at all."""

    reason: str
    err_code: str | None
    bisect: bool


@dataclass(slots=True)
class _BatchOutcome:
    """What became of one batch, reported by its worker thread to the main loop."""

    delivered: list[Spooled] = field(default_factory=list)
    failed: list[tuple[Spooled, dict[str, Any]]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0


class Clock:
    """The time retries go by: real time. Tests pass a subclass that only pretends to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (elapsed time, pauses)."""
        return time.monotonic()

    def time(self) -> float:
        """Unix time (for ``Retry-After`` dates and ``X-RateLimit-Reset`` times)."""
        return time.time()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait ``seconds``, or until ``stop`` is set; True if it was."""
        return stop.wait(seconds)


class State(enum.Enum):
    """Where a :class:`Dispatcher` stands; :meth:`Dispatcher.stop` moves it on from ``RUNNING``."""

    READY = "ready"
    """Not run yet."""
    RUNNING = "running"
    """Taking input and delivering."""
    DRAINING = "draining"
    """Asked to stop: delivering what is left until the input ends and the spool is empty, or the deadline."""
    STOPPING = "stopping"
    """The deadline passed: waiting for the requests in flight, then settling."""
    STOPPED = "stopped"
    """:meth:`Dispatcher.run` returned (or is about to)."""


class Dispatcher:
    """Sends the events of a :class:`Spool` to Topsort and settles each one there. One run each.

    Stopping is a state, not an exception: :meth:`stop` sets a deadline, and :meth:`run` returns
    once the input ended and the spool is empty, or at the deadline (requests in flight answered,
    the rest left in the spool for the next run).
    """

    def __init__(
        self,
        spool: Spool,
        *,
        endpoint: str,
        api_key: str,
        max_in_flight: int = 8,
        max_latency: float = 1.0,
        timeout: float = 10.0,
        policy: RetryPolicy | None = None,
        high_water: int = 20_000,
        transport: httpx.BaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.spool = spool
        self.stats = DeliveryStats()
        self.url = endpoint.rstrip("/") + EVENTS_PATH
        self._api_key = api_key
        self._max_in_flight = max_in_flight
        self._max_latency = max_latency
        self._timeout = timeout
        self._policy = policy or RetryPolicy()
        self._high_water = high_water
        self._transport = transport
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
        self._clock = clock or Clock()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._pause_lock = threading.Lock()
        self._paused_until = 0.0
        self._batcher: Batcher[Spooled] = Batcher()
        self._ready: deque[list[Spooled]] = deque()
        self._chunks: deque[Chunk] = deque()
        self._cursor = 0
        self._oldest = 0.0
        self._caught_up = False
        self._in_flight = 0
        self._delivered: list[Spooled] = []
        self._failed: list[tuple[Spooled, dict[str, Any]]] = []
        self._fatal: BaseException | None = None
        self._first_sent: float | None = None
        self._answered = False
        self._state = State.READY
        self._state_lock = threading.Lock()
        self._deadline = math.inf
        self._credits = threading.Semaphore(_CHUNKS_AHEAD)

    @property
    def state(self) -> State:
        return self._state

    def stop(self, drain_timeout: float | None = 0.0) -> None:
        """Stop (from any thread, at any time, even before :meth:`run`).

        Delivery goes on for at most ``drain_timeout`` seconds more (None: until the input ended and
        the spool is empty; 0: stop now); a later call may only bring the deadline closer. Requests
        in flight are answered either way; what is not delivered stays in the spool.
        """
        with self._state_lock:
            if self._state is State.STOPPED:
                return
            if drain_timeout is not None:
                self._deadline = min(self._deadline, time.monotonic() + drain_timeout)
            if self._state in (State.READY, State.RUNNING):
                self._state = State.DRAINING
        self._inbox.put(("wake", None))

    def offer(self, chunk: Chunk) -> bool:
        """Hand a chunk of mapped input to be committed to the spool by :meth:`run`'s thread (the
        spool's owner), from any thread; waits while a few chunks are ahead of the spool. False once
        delivery has stopped: the chunk was not taken."""
        while not self._credits.acquire(timeout=0.1):
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            return False
        self._inbox.put(("chunk", chunk))
        return True

    def end_input(self, error: BaseException | None = None) -> None:
        """No more chunks will be offered; ``error``: reading them failed (:meth:`run` raises it)."""
        if error is not None:
            self._inbox.put(("fatal", error))
        self._inbox.put(("end", None))

    def run(self, tick: Callable[[], None] | None = None, *, fed: bool = False) -> DeliveryStats:
        """Deliver what the spool holds, and what is :meth:`offer` ed meanwhile when ``fed``.

        ``tick`` is called from this thread about five times a second (progress, exports).
        Returns when the spool is empty (and, when ``fed``, the input ended), or at the deadline
        :meth:`stop` set. Raises :class:`DeliveryError` when delivery cannot go on, or the error
        :meth:`end_input` was given, once the requests in flight have ended and their outcomes are
        settled.
        """
        if tick is not None and not callable(tick):
            raise TypeError("Dispatcher.run takes no chunks: use engine.delivery.pipeline.deliver(dispatcher, chunks)")
        with self._state_lock:
            if self._state is State.READY:
                self._state = State.RUNNING
        with (
            self._transport or default_transport(self.url, self._max_in_flight) as transport,
            ThreadPoolExecutor(self._max_in_flight, thread_name_prefix="segment-topsort-post") as pool,
        ):
            try:
                self._loop(transport, pool, tick, reading=fed)
            finally:
                self._set_state(State.STOPPING)
                self._stop.set()
                while self._in_flight:
                    self._handle(self._inbox.get())
                self._settle()
                self._set_state(State.STOPPED)
        if self._fatal:
            raise self._fatal
        return self.stats

    # -- the main loop: chunks -> spool -> batches -> requests -> outcomes -> spool ---------------

    def _loop(
        self,
        transport: httpx.BaseTransport,
        pool: ThreadPoolExecutor,
        tick: Callable[[], None] | None,
        *,
        reading: bool,
    ) -> None:
        settled_at = time.monotonic()
        while not self._fatal and time.monotonic() < self._deadline:
            while self._chunks and self.spool.unsent < self._high_water:
                self.spool.commit(self._chunks.popleft())
                self._credits.release()
            input_done = not reading and not self._chunks
            self._fill(final=input_done)
            while self._ready and self._in_flight < self._max_in_flight:
                pool.submit(self._post_batch, transport, self._ready.popleft())
                self._in_flight += 1
            now = time.monotonic()
            if now - settled_at >= _SETTLE_EVERY or len(self._delivered) >= _SETTLE_SIZE:
                self._settle()
                if tick:
                    tick()
                settled_at = now
            if input_done and self._caught_up and not (len(self._batcher) or self._ready or self._in_flight):
                return
            wait = min(_SETTLE_EVERY - (now - settled_at), self._deadline - now)
            if len(self._batcher) and self._caught_up:
                wait = min(wait, self._max_latency - (now - self._oldest))
            try:
                message = self._inbox.get(timeout=max(wait, 0.001))
            except queue.Empty:
                continue
            reading &= self._handle(message)
            while not self._inbox.empty():
                reading &= self._handle(self._inbox.get())

    def _handle(self, message: tuple[str, Any]) -> bool:
        """Act on one message from the input or a worker; False once the input has ended."""
        kind, payload = message
        if kind == "chunk":
            self._chunks.append(payload)
        elif kind == "done":
            self._in_flight -= 1
            self._delivered.extend(payload.delivered)
            self._failed.extend(payload.failed)
            self.stats.delivered += len(payload.delivered)
            self.stats.failed += len(payload.failed)
            self.stats.requests += payload.requests
            self.stats.retries += payload.retries
        elif kind == "fatal":
            self._fatal = self._fatal or payload
        return kind != "end"  # "wake": only look at the state again

    def _set_state(self, state: State) -> None:
        with self._state_lock:
            self._state = state

    def _fill(self, *, final: bool) -> None:
        """Batch spooled events until enough requests are ready; flush a batch that waited enough."""
        while len(self._ready) < 2 * self._max_in_flight:
            rows = self.spool.unsent_after(self._cursor, _FETCH)
            if rows and not len(self._batcher):
                self._oldest = time.monotonic()
            for row in rows:
                if full := self._batcher.add(row.kind, row):
                    self._ready.append(_flat(full))
                    self._oldest = time.monotonic()
            if rows:
                self._cursor = rows[-1].chunk
            self._caught_up = len(rows) < _FETCH
            if self._caught_up:
                break
        waited = time.monotonic() - self._oldest
        if len(self._batcher) and self._caught_up and (final or waited >= self._max_latency):
            self._ready.append(_flat(self._batcher.flush() or {}))

    def _settle(self) -> None:
        delivered, failed = self._delivered, self._failed
        self._delivered, self._failed = [], []
        self.stats.dead_letters += self.spool.settle(delivered, failed)

    # -- one batch, on a worker thread: send, retry, bisect ---------------------------------------

    def _post_batch(self, transport: httpx.BaseTransport, rows: list[Spooled]) -> None:
        outcome = _BatchOutcome()
        try:
            self._resolve(transport, rows, self._send(transport, rows, outcome), outcome)
        except DeliveryError as exc:
            self._inbox.put(("fatal", exc))
        except DeliveryStopped:
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. a value httpx cannot send: stop, keep the events
            detail = scrub(f"{type(exc).__name__}: {exc}", self._api_key)
            self._inbox.put(("fatal", DeliveryError(f"delivery failed ({detail}); events stay in the spool")))
        finally:
            self._inbox.put(("done", outcome))

    def _resolve(
        self, transport: httpx.BaseTransport, rows: list[Spooled], refusal: _Refusal | None, outcome: _BatchOutcome
    ) -> None:
        if refusal is None:
            outcome.delivered.extend(rows)
        elif refusal.bisect:
            self._isolate(transport, rows, refusal, outcome)
        else:
            outcome.failed.extend(_failure(row, refusal) for row in rows)

    def _isolate(
        self, transport: httpx.BaseTransport, rows: list[Spooled], refusal: _Refusal, outcome: _BatchOutcome
    ) -> None:
        """``rows`` were refused together: find and fail the refused ones, deliver the rest.

        When the first half goes through, the refusal must come from the second half, which is
        split further without being sent whole: k bad events among n cost O(k log n) requests.
        """
        if len(rows) == 1:
            outcome.failed.append(_failure(rows[0], refusal))
            return
        middle = len(rows) // 2
        first, second = rows[:middle], rows[middle:]
        first_refusal = self._send(transport, first, outcome)
        self._resolve(transport, first, first_refusal, outcome)
        if first_refusal is None:
            self._isolate(transport, second, refusal, outcome)
        else:
            self._resolve(transport, second, self._send(transport, second, outcome), outcome)

    def _send(self, transport: httpx.BaseTransport, rows: Sequence[Spooled], outcome: _BatchOutcome) -> _Refusal | None:
        """POST ``rows`` until answered for good; None when delivered."""
        body = _body(rows)
        clock = self._clock
        started = clock.monotonic()
        attempt = 0
        while True:
            self._sleep(self._paused_until - clock.monotonic())
            outcome.requests += 1
            if self._first_sent is None:
                self._first_sent = clock.monotonic()
            try:
                response = self._post(transport, body)
            except httpx.TransportError as exc:  # its text may quote a header: never the key
                problem, hint = scrub(_transport_problem(exc), self._api_key), None
            else:
                self._answered = True
                status = response.status_code
                if status < 300:
                    return None
                _raise_if_fatal(status, self.url)
                if not is_transient(status):
                    return _refusal(response)
                problem, hint = f"HTTP {status}", server_delay(response.headers, clock.time())
                if hint is not None:
                    with self._pause_lock:
                        self._paused_until = max(self._paused_until, clock.monotonic() + hint)
            delay = self._policy.delay(attempt, hint)
            elapsed = clock.monotonic() - started
            attempt += 1
            self._raise_if_unanswered(elapsed + delay, problem)
            if elapsed + delay > self._policy.max_elapsed:
                reason = f"undeliverable after {attempt} attempt(s) in {elapsed:.1f} s: {problem}"
                return _Refusal(reason, None, bisect=False)
            outcome.retries += 1
            self._sleep(delay)

    def _post(self, transport: httpx.BaseTransport, body: bytes) -> httpx.Response:
        """One POST straight through ``transport`` (an ``httpx.Client`` would cost ~80 µs more per request)."""
        request = httpx.Request("POST", self.url, headers=self._headers, content=body, extensions=self._extensions)
        response = transport.handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        return response

    def _raise_if_unanswered(self, next_try: float, problem: str) -> None:
        """Stop when nothing ever answered within the policy's limit (or before giving up)."""
        limit = self._policy.unanswered_limit
        if limit is None or self._answered or self._first_sent is None:
            return
        waited = self._clock.monotonic() - self._first_sent
        if waited >= limit or next_try > self._policy.max_elapsed:
            raise UnreachableError(
                f"{self.url} has not answered once in {waited:.0f} s ({problem}): check --endpoint and the"
                " network; the events stay in the spool for the next run"
            )

    def _sleep(self, seconds: float) -> None:
        if self._stop.is_set() or (seconds > 0 and self._clock.wait(self._stop, seconds)):
            raise DeliveryStopped


def _flat(batch: dict[str, list[Spooled]]) -> list[Spooled]:
    return [row for kind in KINDS for row in batch.get(kind, ())]


def _body(rows: Sequence[Spooled]) -> bytes:
    """The request body: the spooled JSON of each event, grouped in arrays by kind."""
    arrays: dict[Kind, list[bytes]] = {}
    for row in rows:
        arrays.setdefault(row.kind, []).append(row.body)
    return encoded_body(arrays)


def _failure(row: Spooled, refusal: _Refusal) -> tuple[Spooled, dict[str, Any]]:
    """The rejection of a failed event, as its dead letter lists it."""
    return row, Rejection(row.rule, "$", refusal.reason, None, row.kind, row.event_id, refusal.err_code).to_dict()


def _raise_if_fatal(status: int, url: str) -> None:
    if status in (401, 403):
        raise AuthenticationError(
            f"Topsort refused the API key (HTTP {status}): check TOPSORT_API_KEY or --api-key-file;"
            " undelivered events stay in the spool for the next run"
        )
    if status in (404, 405):
        raise EndpointError(
            f"POST {url} answered HTTP {status}: check --endpoint (Topsort's is"
            " https://api.topsort.com); undelivered events stay in the spool for the next run"
        )


def _refusal(response: httpx.Response) -> _Refusal:
    """Topsort's ``errCode`` and message from a refused request."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("errCode"):
        code = str(data["errCode"])
        message = data.get("message") or ""
        return _Refusal(f"{code}: {message}" if message else code, code, bisect=True)
    text = response.text.strip()[:200]
    status = f"HTTP {response.status_code}"
    return _Refusal(f"{status}: {text}" if text else status, None, bisect=True)


def _transport_problem(exc: httpx.TransportError) -> str:
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "network error"
    detail = str(exc) or type(exc).__name__
    return f"{kind}: {detail}"
