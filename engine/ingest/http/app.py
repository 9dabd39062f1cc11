"""``serve``'s HTTP side: the ASGI application, authentication, CORS and refusals.

Paths (all ``POST`` unless said):

* ``/webhook``: Segment's Webhooks destination, one event or a JSON array of them; with a shared
  secret, ``X-Signature`` (hex HMAC-SHA1 of the body) must match.
* ``/v1/batch`` and ``/v1/{track,page,screen,identify,group,alias}``: Segment's Tracking API, as
  the server libraries call it; ``/v1/b`` and ``/v1/{t,p,s,i,g,a}`` are the short paths
  analytics.js (``@segment/analytics-next``) posts to under its ``apiHost`` (``text/plain`` bodies
  with ``writeKey`` inside), ``OPTIONS`` answers their CORS preflight for the configured origins,
  and ``/v1/m`` (its own telemetry) is answered 204 and ignored.
* ``GET /healthz`` and ``GET /metrics`` (Prometheus text).

Credentials are checked before anything else: a Basic ``Authorization`` header before the body is
read; a ``writeKey`` in the body (or a webhook signature) as soon as the body is read, and any
failure to read a body that must prove itself is answered 401, so an unauthenticated caller
learns nothing of the limits. Every refusal is answered with JSON ``{error, reason, code,
message}`` (``code``/``message`` being what Segment's libraries log) and logged on one line,
at most a few lines a second.

One cohesive thing (the HTTP application and its refusals), hence over 350 lines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ...delivery.pipeline import MapStep
from ...mapping import InProcessMapper
from ...engine import Engine
from ...errors import ContentError, RequestRefused, ServeError, SpoolFull
from .body import check_event_size, parse, read_body
from .delivery import Delivery
from .acking_spool import Entry
from .metrics import Causes, Metrics, RequestTally
from .reload import RuleReloader
from .settings import MAX_REQUEST_EVENTS, ServeSettings
from .tracking import batch_messages, single_message, write_key_in
from ...record import Record

log = logging.getLogger("segment_topsort.serve")

_CALLS = {"track": "track", "page": "page", "screen": "screen", "identify": "identify", "group": "group",
          "alias": "alias", "t": "track", "p": "page", "s": "screen", "i": "identify", "g": "group", "a": "alias"}
"""Tracking API paths under ``/v1/``, long and short (analytics.js), and the call type of each."""
_BATCH_PATHS = frozenset({"batch", "b"})
_TELEMETRY = "m"
_PATHS = frozenset({"/webhook", "/healthz", "/metrics", *(f"/v1/{p}" for p in (*_CALLS, *_BATCH_PATHS, _TELEMETRY))})
_CORS_ALLOW_HEADERS = "Content-Type, Authorization, X-Retry-Count"
_REFUSAL_LOG_BURST = 20
_REFUSAL_LOG_PER_SECOND = 2.0


class Receiver:
    """The ASGI application (:attr:`app`) with its rules, metrics and delivery.

    :meth:`start` opens the spool and starts delivering; :meth:`close` drains and stops.
    """

    def __init__(self, settings: ServeSettings, on_failure: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._rules = RuleReloader(settings.rule_dirs, self.metrics)
        self._closing = threading.Event()
        self._delivery = Delivery(settings, self.metrics, on_failure)
        self._refusals = _RefusalLog()
        self._internal_errors = Causes()
        self._requests = 0
        self.app = Starlette(routes=[
            Route("/webhook", self._endpoint(self._webhook), methods=["POST"]),
            Route("/v1/{call}", self._endpoint(self._tracking), methods=["POST", "OPTIONS"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ])

    @property
    def engine(self) -> Engine:
        """The rules in force."""
        return self._rules.engine

    @property
    def spooled(self) -> int:
        """Topsort events in the spool waiting for delivery."""
        return self._delivery.unsent

    @property
    def failure(self) -> BaseException | None:
        """Why delivery stopped, if it stopped on its own (a refused Topsort API key)."""
        return self._delivery.failure

    def start(self) -> None:
        """Open the spool, start delivering and, if asked, watching the rule files."""
        self._delivery.start()
        if self.settings.watch_rules > 0:
            threading.Thread(target=self._rules.watch, args=(self.settings.watch_rules, self._closing),
                             name="segment-topsort-watch", daemon=True).start()

    def close(self) -> None:
        """Deliver what is left (for up to ``drain_timeout`` seconds) and close the spool."""
        self._closing.set()
        self._delivery.close()

    def reload_rules(self) -> bool:
        """Load the rule folders again and use them unless they have errors (see :class:`RuleReloader`)."""
        return self._rules.reload()

    # -- endpoints --

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            try:
                response = await handler(request)
            except RequestRefused as refused:
                response = _error(refused)
                self._refusals.log(request, refused)
            except ClientDisconnect:
                log.debug("client %s went away during %s", _client(request), request.url.path)
                response = Response(status_code=499)  # nginx's "client closed request", for the metrics
            except Exception as exc:  # a fault of serve itself: answered 500, logged once per cause
                response = _error(RequestRefused(500, "internal_error", "the receiver failed on this request; retry later"))
                self._internal_error(exc)
            else:
                if response.status_code == 200:
                    self.metrics.observe("ingest_latency_seconds", time.monotonic() - started)
            response.headers.update(self._cors(request))
            path = request.url.path if request.url.path in _PATHS else "other"
            self.metrics.count("requests", (path, str(response.status_code)))
            return response

        return endpoint

    async def _webhook(self, request: Request) -> Response:
        secret = self.settings.shared_secret
        if not secret:
            _, body = await read_body(request, self.settings.read_timeout)
        else:
            given = request.headers.get("x-signature", "").strip().lower().encode("latin-1")
            if not given:
                raise RequestRefused(401, "missing_signature", "X-Signature is required: sign the body with the shared secret")
            try:
                sent, body = await read_body(request, self.settings.read_timeout)
            except RequestRefused:
                raise RequestRefused(401, "bad_signature", "the body could not be read to check its X-Signature") from None
            expected = hmac.new(secret.encode(), sent, hashlib.sha1).hexdigest().encode()
            if not hmac.compare_digest(given, expected):
                raise RequestRefused(401, "bad_signature", "X-Signature does not match the body and the shared secret")
        data = parse(body)
        if isinstance(data, dict):
            check_event_size(len(body), "the event")
            return await self._ingest(request, [data])
        if isinstance(data, list):
            _check_events(data, "the array")
            return await self._ingest(request, data)
        raise RequestRefused(400, "not_an_event", f"a webhook body is an event (a JSON object) or an array of them,"
                                           f" not {_kind(data)}")

    async def _tracking(self, request: Request) -> Response:
        call = request.path_params["call"]
        if call not in _CALLS and call not in _BATCH_PATHS and call != _TELEMETRY:
            raise RequestRefused(404, "not_found", f"no Tracking API path /v1/{call}")
        if request.method == "OPTIONS":
            return self._preflight(request)
        if call == _TELEMETRY:
            return Response(status_code=204)
        proven = self._authorize_header(request)
        if proven:
            _, body = await read_body(request, self.settings.read_timeout)
            data = parse(body)
        else:
            missing = "send the write key as the HTTP Basic user name or as writeKey in the body"
            try:
                _, body = await read_body(request, self.settings.read_timeout)
                data = parse(body)
            except RequestRefused:
                raise RequestRefused(401, "missing_write_key", missing) from None
            self._check_write_key(write_key_in(data), missing)
        received = datetime.now(UTC)
        if call in _BATCH_PATHS:
            if not isinstance(data, dict) or not isinstance(data.get("batch"), list):
                raise RequestRefused(400, "bad_request", 'a batch is a JSON object with a "batch" array of events')
            _check_events(data["batch"], "the batch")
            return await self._ingest(request, batch_messages(data, received))
        if not isinstance(data, dict):
            raise RequestRefused(400, "not_an_event", f"{request.url.path} takes one event, a JSON object, not {_kind(data)}")
        check_event_size(len(body), "the event")
        return await self._ingest(request, [single_message(data, _CALLS[call], received)])

    async def _healthz(self, request: Request) -> Response:
        failure = self._delivery.failure
        if failure is not None:
            return _json(503, {"status": "failing", "reason": str(failure)})
        trouble = self._delivery.trouble
        if trouble is not None:
            return _json(503, {"status": "unavailable", "reason": trouble}, self._retry_after())
        return _json(200, {"status": "ok", "spooled": self._delivery.unsent})

    async def _metrics(self, request: Request) -> Response:
        text = self.metrics.render(self._delivery.gauges())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- credentials and CORS --

    def _authorize_header(self, request: Request) -> bool:
        """Check a write key given in the Authorization header; False when it must come from the body."""
        if not self.settings.write_keys:
            return True
        header = request.headers.get("authorization")
        if not header:
            return False
        self._check_write_key(_basic_user(header), "send the write key as the HTTP Basic user name")
        return True

    def _check_write_key(self, key: str | None, missing: str) -> None:
        if key is None:
            raise RequestRefused(401, "missing_write_key", missing)
        given = key.encode()
        matches = [hmac.compare_digest(given, known.encode()) for known in self.settings.write_keys]  # no timing hint
        if not any(matches):
            raise RequestRefused(401, "bad_write_key", "the write key is not one this receiver accepts")

    def _cors(self, request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        allowed = self.settings.cors_origins
        if not origin or not (origin in allowed or "*" in allowed) or not request.url.path.startswith("/v1/"):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "Retry-After", "Vary": "Origin"}

    def _preflight(self, request: Request) -> Response:
        if not self._cors(request):
            raise RequestRefused(403, "origin_not_allowed", "this origin may not call the Tracking API here"
                                                     " (serve --cors-origin)")
        return Response(status_code=204, headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS", "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        })

    # -- ingest --

    async def _ingest(self, request: Request, events: list[Any]) -> Response:
        if len(events) > MAX_REQUEST_EVENTS:
            raise RequestRefused(413, "too_many_events", f"{len(events)} events in one request; at most {MAX_REQUEST_EVENTS}")
        try:
            reservation = self._delivery.admit(len(events))
        except SpoolFull as exc:
            raise RequestRefused(503, "spool_full", str(exc), self._retry_after()) from None
        except ServeError as exc:
            raise RequestRefused(503, "unavailable", f"{exc}; nothing was kept, retry later", self._retry_after()) from None
        try:
            self._requests += 1
            mapped = await run_in_threadpool(self._map, f"{request.url.path}#{self._requests}", events)
            reservation.resize(sum(len(e.mapped.events) for e in mapped.entries))
            dropped: set[int] = set()
            if mapped.entries:
                try:
                    dropped = await asyncio.wrap_future(self._delivery.submit(mapped.entries, mapped.received))
                except ContentError as exc:
                    raise RequestRefused(500, "not_stored", str(exc)) from None
                except ServeError as exc:
                    raise RequestRefused(503, "unavailable", f"{exc}; nothing was kept", self._retry_after()) from None
        finally:
            reservation.release()
        tally = RequestTally()
        for index, entry in enumerate(mapped.entries):
            if index not in dropped:
                tally.add_mapped(entry.mapped)
        duplicates = mapped.duplicates + len(dropped)
        tally.outcomes["duplicate"] += duplicates
        self.metrics.tally(tally)
        return _json(200, {"success": True, "accepted": len(events) - duplicates, "duplicates": duplicates})

    def _map(self, origin: str, events: list[Any]) -> _Mapped:
        """Map a request's events (on a worker thread); skip messageIds already committed."""
        received = time.monotonic()
        seen = self._delivery.seen
        records: list[tuple[str | None, Record]] = []
        duplicates = 0
        for line, event in enumerate(events, start=1):
            message_id = event.get("messageId") if isinstance(event, dict) else None
            message_id = message_id if isinstance(message_id, str) else None
            if message_id in seen:
                duplicates += 1
                continue
            try:
                raw = orjson.dumps(event)
            except orjson.JSONEncodeError as exc:  # nested beyond what can be stored: the event's rejection
                records.append((message_id, Record(origin, line, b"", error=f"the event cannot be stored: {exc}")))
                continue
            check_event_size(len(raw), f"event {line}")
            records.append((message_id, Record(origin, line, raw, event=event)))
        step = MapStep(InProcessMapper(self._rules.engine))
        mapped = step.map([record for _, record in records])
        entries = [Entry(message_id, *done) for (message_id, _), done in zip(records, mapped, strict=True)]
        return _Mapped(entries, duplicates, received)

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after)}

    def _internal_error(self, exc: Exception) -> None:
        cause = self._internal_errors.first(exc)
        if cause is not None:
            log.error("a request failed inside serve (logged once per cause): %s", cause, exc_info=exc)


@dataclass(slots=True)
class _Mapped:
    entries: list[Entry]
    duplicates: int
    received: float


class _RefusalLog:
    """One line per refused request, at most a burst and then a few a second; the rest counted and
    reported with the next line logged."""

    def __init__(self) -> None:
        self._tokens = float(_REFUSAL_LOG_BURST)
        self._at = time.monotonic()
        self._skipped = 0
        self._lock = threading.Lock()

    def log(self, request: Request, refused: RequestRefused) -> None:
        now = time.monotonic()
        with self._lock:
            self._tokens = min(_REFUSAL_LOG_BURST, self._tokens + (now - self._at) * _REFUSAL_LOG_PER_SECOND)
            self._at = now
            if self._tokens < 1:
                self._skipped += 1
                return
            self._tokens -= 1
            skipped, self._skipped = self._skipped, 0
        more = f" ({skipped} more refusals not logged)" if skipped else ""
        log.warning("refused %d %s: %s %s from %s: %s%s", refused.status, refused.error, request.method,
                    request.url.path, _client(request), refused.reason, more)


def _check_events(items: list[Any], what: str) -> None:
    if items and not any(isinstance(item, dict) for item in items):
        raise RequestRefused(400, "not_an_event", f"{what} holds no event (JSON object)")


def _kind(value: Any) -> str:
    return "null" if value is None else f"a JSON {type(value).__name__.replace('str', 'string')}"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _basic_user(header: str) -> str:
    """The user name of an ``Authorization: Basic`` header (Segment's write key)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        raise RequestRefused(401, "bad_authorization", "the Authorization header is not Basic with the write key as user")
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise RequestRefused(401, "bad_authorization", "the Basic authorization header is not valid base64") from None
    return decoded.partition(":")[0]


def _error(refused: RequestRefused) -> Response:
    body = {"success": False, "error": refused.error, "reason": refused.reason,
            "code": refused.error, "message": refused.reason}
    return _json(refused.status, body, refused.headers)


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)
