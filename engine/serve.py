"""``segment-topsort serve``: receive Segment events over HTTP and deliver them to Topsort.

Two ways in, both answered 200 only once the request's events are committed to the spool:

* ``POST /webhook``: Segment's Webhooks destination, one event or a JSON array of them; with a
  shared secret configured, ``X-Signature`` (hex HMAC-SHA1 of the raw body) must match.
* ``POST /v1/batch`` (``{"batch": [...]}``) and ``POST /v1/{track,page,screen,identify,group,alias}``
  (one event, its ``type`` taken from the path when missing), shaped like Segment's Tracking API,
  with the write key as the HTTP Basic user name, so an analytics library can point here.

Each event is mapped by the rules on arrival; what it emits is spooled and delivered in the
background by the same :class:`~engine.dispatch.Dispatcher` as ``run``, and rejected events become
dead letters the same way. Refusals carry a JSON ``reason``: 400 (malformed), 401 (signature or
write key), 413 (over Segment's limits: 32 KB per event, 500 KB and 2 500 events per request), 503
with ``Retry-After`` (too many events waiting for delivery; nothing was kept, so retrying is safe).

A repeated ``messageId`` (Segment delivers at least once) is dropped at ingest within a window of
the last N ids and S seconds. ``GET /healthz`` and ``GET /metrics`` (Prometheus text) serve
operations. SIGHUP reloads the rules if the new set has no errors; SIGTERM or Ctrl-C stops taking
requests, answers those in flight and gives delivery a moment to empty the spool.

The spool's SQLite connection belongs to the dispatcher's thread, so requests hand their chunks to
that thread through a queue (several requests are committed together); a :class:`Spool` subclass
answers each request when its chunk's transaction has committed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import click
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .http_server import ServerStartError, listen, start_in_thread
from .cli_options import delivery_tuning, rules_option
from .dead_letters import rejected_input
from .dispatch import DeliveryError, Dispatcher
from .engine import Engine
from .errors import EngineError, RulesInvalid
from .loader import RULE_FILE_SUFFIXES, RuleSet, check_rules
from .paths import BUNDLED_RULES
from .retry import RetryPolicy
from .serve_metrics import Metrics, RequestTally
from .source import Record
from .spool import Chunk, Spool, Spooled

log = logging.getLogger("segment_topsort.serve")

MAX_EVENT_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_REQUEST_EVENTS = 2500
"""Segment's Tracking API limits, applied to every request."""

_CALL_TYPES = ("track", "page", "screen", "identify", "group", "alias")
_MERGE_INPUTS = 5000
"""Most input events committed to the spool in one transaction (from several requests)."""
_TRACKED_LATENCIES = 1_000_000
"""Most spooled events whose arrival time is kept to measure their delivery latency."""


class ServeError(EngineError):
    """The receiver cannot take events: its spool could not be opened, or delivery stopped."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``serve`` needs. The secrets are left out of ``repr``."""

    endpoint: str
    api_key: str = field(repr=False)
    spool: Path
    dead_letters: Path
    rule_dirs: tuple[Path, ...] = ()
    shared_secret: str | None = field(default=None, repr=False)
    """Segment webhook secret; when set, ``/webhook`` requires a matching ``X-Signature``."""
    write_keys: frozenset[str] = field(default=frozenset(), repr=False)
    """Write keys accepted on ``/v1/*``; empty accepts any."""
    max_spooled: int = 50_000
    """Above this many Topsort events waiting for delivery, requests are answered 503."""
    retry_after: int = 5
    dedupe_size: int = 100_000
    dedupe_seconds: float = 24 * 3600.0
    drain_timeout: float = 10.0
    watch_rules: float = 0.0
    """Seconds between two looks at the rule files, reloading them when they changed; 0: only on SIGHUP."""
    max_in_flight: int = 8
    max_latency: float = 1.0
    timeout: float = 10.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)


# -- the HTTP side ---------------------------------------------------------------------------------


class _Refused(Exception):
    """A request answered with an error: its status, a short code and a reason the sender can act on."""

    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.headers = status, error, reason, headers or {}


class Receiver:
    """The ASGI application (:attr:`app`) with its rules, deduplication, metrics and delivery.

    :meth:`start` opens the spool and starts delivering; :meth:`close` drains and stops.
    """

    def __init__(self, settings: ServeSettings, on_failure: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._engine = Engine.from_folders(*settings.rule_dirs)
        self.metrics.rules_loaded(self._engine.rules)
        self._reload_lock = threading.Lock()
        self._closing = threading.Event()
        self._dedupe = _Deduper(settings.dedupe_size, settings.dedupe_seconds)
        self._delivery = _Delivery(settings, self.metrics, on_failure)
        self._requests = 0
        routes = [
            Route("/webhook", self._endpoint(self._webhook), methods=["POST"]),
            Route("/v1/batch", self._endpoint(self._batch), methods=["POST"]),
            *(Route(f"/v1/{t}", self._endpoint(self._call), methods=["POST"]) for t in _CALL_TYPES),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes)

    @property
    def engine(self) -> Engine:
        """The rules in force."""
        return self._engine

    @property
    def spooled(self) -> int:
        """Topsort events in the spool waiting for delivery."""
        return self._delivery.unsent

    def start(self) -> None:
        """Open the spool, start delivering and, if asked, watching the rule files."""
        self._delivery.start()
        if self.settings.watch_rules > 0:
            threading.Thread(target=self._watch_rules, name="segment-topsort-watch", daemon=True).start()

    def close(self) -> None:
        """Deliver what is left (for up to ``drain_timeout`` seconds) and close the spool."""
        self._closing.set()
        self._delivery.close()

    @property
    def failure(self) -> BaseException | None:
        """Why delivery stopped, if it stopped on its own."""
        return self._delivery.failure

    def reload_rules(self) -> bool:
        """Load the rule folders again and use them, unless they have errors (then log them and
        keep the rules in force). True when the new rules are in force."""
        with self._reload_lock:
            rules, problems = check_rules(self.settings.rule_dirs or (BUNDLED_RULES,))
            errors = [p for p in problems if p.severity == "error"]
            if errors:
                self.metrics.count("rule_reloads", ("failed",))
                log.error("rules not reloaded: %d error(s); the previous rules stay in force\n%s",
                          len(errors), "\n".join(map(str, errors)))
                return False
            for warning in problems:
                log.warning("%s", warning)
            self._engine = Engine(RuleSet(tuple(rules), tuple(problems)))
            self.metrics.rules_loaded(self._engine.rules)
            self.metrics.count("rule_reloads", ("ok",))
            log.info("rules reloaded: %d rule(s), %d enabled", len(rules), sum(r.enabled for r in rules))
            return True

    def _watch_rules(self) -> None:
        folders = self.settings.rule_dirs or (BUNDLED_RULES,)
        seen = _rule_files_state(folders)
        while not self._closing.wait(self.settings.watch_rules):
            state = _rule_files_state(folders)
            if state != seen:
                seen = state
                self.reload_rules()

    # -- endpoints --

    def _endpoint(self, handler: Callable[[Request, bytes], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            try:
                response = await handler(request, await _body(request))
            except _Refused as refused:
                response = _json(refused.status, {"error": refused.error, "reason": refused.reason}, refused.headers)
            else:
                self.metrics.observe("ingest_latency_seconds", time.monotonic() - started)
            self.metrics.count("requests", (request.url.path, str(response.status_code)))
            return response

        return endpoint

    async def _webhook(self, request: Request, body: bytes) -> Response:
        secret = self.settings.shared_secret
        if secret:
            given = request.headers.get("x-signature", "").strip().lower().encode("latin-1")
            if not given:
                raise _Refused(401, "missing_signature",
                               "X-Signature is required: sign the body with the shared secret")
            expected = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest().encode()
            if not hmac.compare_digest(given, expected):
                raise _Refused(401, "bad_signature", "X-Signature does not match the body and the shared secret")
        data = _parse(body)
        if isinstance(data, list):
            return await self._ingest(request, data, None)
        _check_size(len(body), "the event")
        return await self._ingest(request, [data], [body])

    async def _batch(self, request: Request, body: bytes) -> Response:
        data = _parse(body)
        self._authorize(request, data)
        if not isinstance(data, dict) or not isinstance(data.get("batch"), list):
            raise _Refused(400, "bad_request", 'a batch is a JSON object with a "batch" array of events')
        return await self._ingest(request, data["batch"], None)

    async def _call(self, request: Request, body: bytes) -> Response:
        _check_size(len(body), "the event")
        event = _parse(body)
        self._authorize(request, event)
        if not isinstance(event, dict):
            raise _Refused(400, "bad_request", f"{request.url.path} takes one event, a JSON object")
        if event.get("type") is not None:
            return await self._ingest(request, [event], [body])
        event["type"] = request.url.path.rsplit("/", 1)[1]
        return await self._ingest(request, [event], None)

    async def _healthz(self, request: Request) -> Response:
        failure = self._delivery.failure
        if failure is not None:
            return _json(503, {"status": "failing", "reason": str(failure)})
        return _json(200, {"status": "ok", "spooled": self._delivery.unsent})

    async def _metrics(self, request: Request) -> Response:
        text = self.metrics.render(self._delivery.gauges())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- ingest --

    def _authorize(self, request: Request, data: Any) -> None:
        keys = self.settings.write_keys
        if not keys:
            return
        key = _basic_user(request.headers.get("authorization"))
        if key is None and isinstance(data, dict) and isinstance(data.get("writeKey"), str):
            key = data["writeKey"]
        if key is None:
            raise _Refused(401, "missing_write_key", "send the write key as the HTTP Basic user name")
        given = key.encode()
        matches = [hmac.compare_digest(given, known.encode()) for known in keys]  # all compared: no timing hint
        if not any(matches):
            raise _Refused(401, "bad_write_key", "the write key is not one this receiver accepts")

    async def _ingest(self, request: Request, events: list[Any], raws: list[bytes] | None) -> Response:
        if len(events) > MAX_REQUEST_EVENTS:
            raise _Refused(413, "too_many_events", f"{len(events)} events in one request; at most {MAX_REQUEST_EVENTS}")
        self._refuse_if_full()
        self._requests += 1
        origin = f"{request.url.path}#{self._requests}"
        mapped = await run_in_threadpool(self._map, origin, events, raws)
        if mapped.chunk.inputs or mapped.chunk.dead_letters:
            try:
                await asyncio.wrap_future(self._delivery.submit(mapped.chunk, mapped.received))
            except BaseException as exc:
                self._dedupe.release(mapped.claimed)
                if isinstance(exc, ServeError):
                    raise _Refused(503, "unavailable", f"{exc}; nothing was kept, retry later",
                                   {"Retry-After": str(self.settings.retry_after)}) from None
                raise
        self.metrics.tally(mapped.tally)
        duplicates = mapped.tally.outcomes["duplicate"]
        return _json(200, {"success": True, "accepted": len(events) - duplicates, "duplicates": duplicates})

    def _refuse_if_full(self) -> None:
        failure = self._delivery.failure
        if failure is not None:
            raise _Refused(503, "unavailable", f"delivery stopped: {failure}",
                           {"Retry-After": str(self.settings.retry_after)})
        if self._delivery.unsent > self.settings.max_spooled:
            raise _Refused(503, "spool_full", f"{self._delivery.unsent} events wait for delivery; retry later",
                           {"Retry-After": str(self.settings.retry_after)})

    def _map(self, origin: str, events: list[Any], raws: list[bytes] | None) -> _Mapped:
        """Map a request's events (on a worker thread) into one chunk; drop repeated messageIds."""
        received = time.monotonic()
        if raws is None:
            raws = [orjson.dumps(event) for event in events]
            for index, raw in enumerate(raws):
                _check_size(len(raw), f"event {index}")
        ids = [e.get("messageId") if isinstance(e, dict) else None for e in events]
        fresh = self._dedupe.claim(ids)
        engine, chunk, tally = self._engine, Chunk(), RequestTally()
        claimed = []
        for line, (event, raw, message_id, new) in enumerate(zip(events, raws, ids, fresh, strict=True), start=1):
            if not new:
                tally.outcomes["duplicate"] += 1
                continue
            if isinstance(message_id, str):
                claimed.append(message_id)
            record = Record(origin, line, raw, event=event)
            outcome = engine.process(event)
            tally.add(outcome)
            if outcome.rejected:
                chunk.dead_letter(rejected_input(record, outcome))
            chunk.add(record, outcome.emitted)
        return _Mapped(chunk, received, claimed, tally)


@dataclass(slots=True)
class _Mapped:
    chunk: Chunk
    received: float
    claimed: list[str]
    tally: RequestTally


def _rule_files_state(folders: Sequence[str | Path]) -> list[tuple[str, int, int]]:
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


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Refused(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def _check_size(size: int, what: str) -> None:
    if size > MAX_EVENT_BYTES:
        raise _Refused(413, "event_too_large", f"{what} is {size} bytes; at most {MAX_EVENT_BYTES} per event")


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it exceeds the request limit."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise _Refused(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; send plain JSON")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise _Refused(413, "request_too_large", f"{declared} bytes; at most {MAX_REQUEST_BYTES} per request")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_REQUEST_BYTES:
            raise _Refused(413, "request_too_large", f"more than {MAX_REQUEST_BYTES} bytes in one request")
        parts.append(part)
    return b"".join(parts)


def _basic_user(header: str | None) -> str | None:
    """The user name of an ``Authorization: Basic`` header (Segment's write key), if any."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _Refused(401, "bad_authorization", "the Basic authorization header is not valid base64") from None
    return decoded.partition(":")[0]


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


# -- deduplication ---------------------------------------------------------------------------------


class _Deduper:
    """The messageIds seen lately: at most ``size`` of them, none older than ``seconds``."""

    def __init__(self, size: int, seconds: float) -> None:
        self._size, self._seconds = size, seconds
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, message_ids: Sequence[Any]) -> list[bool]:
        """For each id, whether it is new (and now remembered); ids that are not strings are always new."""
        if self._size <= 0:
            return [True] * len(message_ids)
        now = time.monotonic()
        fresh = []
        with self._lock:
            seen = self._seen
            while seen and next(iter(seen.values())) < now - self._seconds:
                seen.popitem(last=False)
            for message_id in message_ids:
                if not isinstance(message_id, str):
                    fresh.append(True)
                elif message_id in seen:
                    fresh.append(False)
                else:
                    seen[message_id] = now
                    fresh.append(True)
            while len(seen) > self._size:
                seen.popitem(last=False)
        return fresh

    def release(self, message_ids: Sequence[str]) -> None:
        """Forget ids whose events were not kept after all, so that a retry is not a duplicate."""
        with self._lock:
            for message_id in message_ids:
                self._seen.pop(message_id, None)


# -- delivery: the dispatcher's thread owns the spool -----------------------------------------------


@dataclass(slots=True)
class _Batch(Chunk):
    """Chunks of several requests, committed together; each request waits on its future."""

    acks: list[Future[None]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    """When each input arrived, for the delivery latency."""


class _AckingSpool(Spool):
    """A spool that answers each request once its chunk is committed, and times deliveries."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        super().__init__(path)
        self._metrics = metrics
        self._arrived: dict[tuple[str, str], float] = {}

    def commit(self, chunk: Chunk) -> None:
        acks = chunk.acks if isinstance(chunk, _Batch) else []
        try:
            super().commit(chunk)
        except BaseException as exc:
            for ack in acks:
                ack.set_exception(ServeError(f"the spool refused the events: {exc}"))
            raise
        if isinstance(chunk, _Batch) and len(self._arrived) < _TRACKED_LATENCIES:
            for (_, emitted), arrived in zip(chunk.inputs, chunk.arrivals, strict=True):
                for e in emitted:
                    self._arrived[(e.kind, str(e.event["id"]))] = arrived
        for ack in acks:
            ack.set_result(None)

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


class _Delivery:
    """The spool and its dispatcher, on a thread of their own; requests hand chunks to it."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, on_failure: Callable[[], None] | None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._on_failure = on_failure
        self._queue: queue.SimpleQueue[tuple[Chunk, float, Future[None]] | None] = queue.SimpleQueue()
        self._waiting: set[Future[None]] = set()
        self._waiting_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._spool: _AckingSpool | None = None
        self._dispatcher: Dispatcher | None = None
        self._closing = False
        self.failure: BaseException | None = None

    @property
    def unsent(self) -> int:
        return self._spool.unsent if self._spool else 0

    def gauges(self) -> dict[str, float]:
        stats = self._dispatcher.stats if self._dispatcher else None
        return {
            "spool_events": self.unsent,
            "delivery_requests_total": stats.requests if stats else 0,
            "delivery_retries_total": stats.retries if stats else 0,
        }

    def start(self) -> None:
        """Open the spool and start delivering; raises :class:`ServeError` if the spool cannot be used."""
        self._thread = threading.Thread(target=self._run, name="segment-topsort-delivery", daemon=True)
        self._thread.start()
        self._ready.result()

    def submit(self, chunk: Chunk, received: float) -> Future[None]:
        """Queue a request's chunk for the spool; the future is done once it is committed."""
        ack: Future[None] = Future()
        ack.set_running_or_notify_cancel()  # a request given up while waiting cannot cancel the commit
        with self._waiting_lock:
            if self._closing or self.failure is not None:
                ack.set_exception(ServeError("the receiver is stopping; retry later"))
                return ack
            self._waiting.add(ack)
        ack.add_done_callback(self._done)
        self._queue.put((chunk, received, ack))
        return ack

    def close(self) -> None:
        with self._waiting_lock:
            self._closing = True
        self._queue.put(None)
        if self._thread:
            self._thread.join()

    def _done(self, ack: Future[None]) -> None:
        with self._waiting_lock:
            self._waiting.discard(ack)

    def _run(self) -> None:
        settings = self._settings
        try:
            spool = _AckingSpool(settings.spool, self._metrics)
        except EngineError as exc:
            self._ready.set_exception(ServeError(str(exc)))
            return
        with spool:
            self._spool = spool
            self._export()
            self._dispatcher = Dispatcher(
                spool, endpoint=settings.endpoint, api_key=settings.api_key,
                max_in_flight=settings.max_in_flight, max_latency=settings.max_latency,
                timeout=settings.timeout, policy=settings.policy, high_water=sys.maxsize,
            )
            self._ready.set_result(None)
            try:
                self._dispatcher.run(self._chunks(), self._export)
            except _DrainTimeout as exc:
                log.warning("%s", exc)
            except (DeliveryError, ServeError, OSError) as exc:
                self._fail(exc)
            except BaseException as exc:
                self._fail(exc)
                raise
            finally:
                self._export()
                self._abandon_waiting()

    def _chunks(self) -> Iterator[_Batch]:
        """Queued chunks, merged while more are at hand; after close, wait for the spool to empty."""
        last: _Batch | None = None
        while (item := self._queue.get()) is not None:
            batch = _Batch()
            stop = False
            while True:
                chunk, received, ack = item
                batch.inputs.extend(chunk.inputs)
                batch.dead_letters.extend(chunk.dead_letters)
                batch.acks.append(ack)
                batch.arrivals.extend([received] * len(chunk.inputs))
                if len(batch.inputs) >= _MERGE_INPUTS or self._queue.empty():
                    break
                item = self._queue.get()
                if item is None:
                    stop = True
                    break
            last = batch
            yield batch
            if stop:
                break
        if last is not None:
            for ack in last.acks:
                ack.exception()  # waits until the last chunk is committed (or refused)
        deadline = time.monotonic() + self._settings.drain_timeout
        while self.unsent and time.monotonic() < deadline and self.failure is None:
            time.sleep(0.02)
        if self.unsent:
            raise _DrainTimeout(f"stopped with {self.unsent} event(s) still in the spool {self._settings.spool};"
                                " they are delivered on the next start")

    def _export(self) -> None:
        if self._spool is not None:
            made = self._spool.export_dead_letters(self._settings.dead_letters)
            if made:
                self._metrics.count("dead_letters", (), made)

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        log.error("delivery stopped: %s", exc)
        if self._on_failure:
            self._on_failure()

    def _abandon_waiting(self) -> None:
        """Answer requests whose chunks never reached the spool: they were not kept."""
        with self._waiting_lock:
            self._closing = True
            waiting = list(self._waiting)
        for ack in waiting:
            if not ack.done():
                ack.set_exception(ServeError("delivery stopped before the events were spooled"))


class _DrainTimeout(EngineError):
    """Stopping took longer than the drain timeout; what is left stays in the spool."""


# -- the server ------------------------------------------------------------------------------------


class Server:
    """A :class:`Receiver` served by uvicorn on a background thread: a context manager.

    ``port=0`` picks a free port; :attr:`url` is the base URL once started. Leaving the context
    stops taking requests, answers those in flight, then drains and closes the spool.
    """

    def __init__(self, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.receiver = Receiver(settings, on_failure=self.stop)
        self._address = (host, port)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> Self:
        sock, self.url = listen(*self._address)
        try:
            self.receiver.start()
        except BaseException:
            sock.close()
            raise
        config = uvicorn.Config(
            self.receiver.app, lifespan="off", access_log=False, log_config=None, log_level="warning",
            timeout_graceful_shutdown=self.receiver.settings.drain_timeout,
        )
        self._server = uvicorn.Server(config)
        try:
            self._thread = start_in_thread(self._server, sock, "segment-topsort-serve")
        except ServerStartError:
            self.receiver.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._thread:
            self._thread.join()
        self.receiver.close()

    def stop(self) -> None:
        """Stop taking requests (those in flight are answered); safe from any thread or a signal handler."""
        if self._server:
            self._server.should_exit = True

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM; SIGHUP reloads the rules. Call from the main thread."""
        with self:
            log.info("receiving Segment events on %s (POST /webhook, /v1/batch, /v1/track, ...)", self.url)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_hup)
            assert self._thread is not None
            while self._thread.is_alive():
                self._thread.join(0.2)
            log.info("stopping: delivering what is left in the spool")
        if self.receiver.failure is not None:
            raise ServeError(str(self.receiver.failure))

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self._server and self._server.should_exit:
            self._server.force_exit = True  # a second signal: do not wait for requests in flight
        self.stop()

    def _on_hup(self, signum: int, frame: Any) -> None:
        threading.Thread(target=self.receiver.reload_rules, name="segment-topsort-reload", daemon=True).start()


# -- the command -----------------------------------------------------------------------------------


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--endpoint", envvar="TOPSORT_ENDPOINT", metavar="URL", required=True,
              help="Topsort's base URL, e.g. https://api.topsort.com (or TOPSORT_ENDPOINT).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the Topsort API key (default: the TOPSORT_API_KEY environment variable).")
@rules_option
@click.option("--spool", "spool_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("segment-topsort-serve.spool"), show_default=True,
              help="SQLite file holding received events until Topsort accepts them.")
@click.option("--dead-letters", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("dead-letters.ndjson"), show_default=True,
              help="NDJSON file that receives every event that could not be delivered, with why.")
@click.option("--write-key", "write_keys", multiple=True, metavar="KEY",
              help="A write key to accept on /v1/* (repeatable; also SEGMENT_WRITE_KEYS, comma-separated)."
                   " None given: any.")
@click.option("--max-spooled", type=click.IntRange(1), default=50_000, show_default=True,
              help="Answer 503 with Retry-After while more Topsort events than this wait for delivery.")
@click.option("--retry-after", type=click.IntRange(1), default=5, show_default=True,
              help="Seconds a 503 asks the sender to wait.")
@click.option("--dedupe-window", "dedupe_size", type=click.IntRange(0), default=100_000, show_default=True,
              help="Remember this many recent messageIds to drop repeats (0: off).")
@click.option("--dedupe-seconds", type=click.FloatRange(min=0), default=86_400.0, show_default=True,
              help="Forget a messageId after this many seconds.")
@click.option("--watch-rules", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Also reload the rules when their files change, looking every SECONDS (0: only on SIGHUP).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On stop, seconds to wait for requests in flight and for the spool to empty.")
@delivery_tuning
def serve_command(
    host: str, port: int, endpoint: str, api_key_file: Path | None, rule_dirs: tuple[Path, ...],
    spool_path: Path, dead_letters: Path, write_keys: tuple[str, ...], max_retry_time: float, **tuning: Any,
) -> None:
    """Receive Segment events over HTTP (Webhooks destination, Tracking API) and deliver them to Topsort.

    Each request is answered 200 once its events are in the spool; delivery runs in the
    background. The webhook secret comes from SEGMENT_SHARED_SECRET. SIGHUP reloads the rules.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not endpoint.startswith(("http://", "https://")):
        raise click.UsageError(f"--endpoint must be an http:// or https:// URL, not {endpoint!r}")
    keys = {*write_keys, *re.split(r"[,\s]+", os.environ.get("SEGMENT_WRITE_KEYS", ""))} - {""}
    settings = ServeSettings(
        endpoint=endpoint, api_key=_api_key(api_key_file), spool=spool_path, dead_letters=dead_letters,
        rule_dirs=rule_dirs, shared_secret=os.environ.get("SEGMENT_SHARED_SECRET") or None,
        write_keys=frozenset(keys), policy=RetryPolicy(max_elapsed=max_retry_time), **tuning,
    )
    try:
        Server(settings, host=host, port=port).serve_forever()
    except RulesInvalid as exc:
        raise click.ClickException(f"{exc}\nRun `segment-topsort check` for details.") from None
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None


def _api_key(api_key_file: Path | None) -> str:
    if api_key_file:
        try:
            key = api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"cannot read the API key from {api_key_file}: {exc.__class__.__name__}") from None
    else:
        key = os.environ.get("TOPSORT_API_KEY", "").strip()
    if not key:
        raise click.UsageError("serve needs Topsort's API key: set TOPSORT_API_KEY or pass --api-key-file")
    return key
