"""A local stand-in for Topsort's ``POST /v2/events``, for tests, demos and CI.

It checks the key and the body as Topsort does (all or nothing per request, Topsort-like
``errCode``), keeps the accepted events deduplicated by ``(kind, id)``, and injects faults on
request: 429 with ``Retry-After``, 500, slow answers and dropped connections.

Use it from Python::

    with Sandbox(api_key="k", faults=Faults(rate_limit=0.1), seed=7) as sandbox:
        deliver(url=sandbox.url + "/v2/events")
        assert len(sandbox.store.events("impressions")) == 10

or from the command line (``segment-topsort sandbox --help``). Besides the events endpoint it
serves ``GET /_sandbox/events``, ``GET /_sandbox/stats``, ``POST /_sandbox/reset`` and
``GET``/``POST /_sandbox/faults``; these need no key.

Dropped connections: ASGI has no way to close a connection without answering, so the sandbox runs
uvicorn with its own HTTP protocol class (uvicorn's h11 protocol, passed through the public
``uvicorn.Config(http=...)`` option) that records each connection's transport. A request drawn for
a drop aborts that transport once its body is read, so the client sees the connection close with
no answer at all. This works when the sandbox is served by :class:`Sandbox` or the CLI, which
always use that protocol.

One cohesive thing (the stand-in: its faults, store and service), hence over 350 lines.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import jsonschema_rs
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..http_server import listen, start_in_thread
from ..outcome import KINDS
from ..paths import TOPSORT_SCHEMA
from ..topsort.schema import json_path, topsort_schema

_DOC_URL = "https://docs.topsort.com/"
_JSON = "application/json"


@dataclass(frozen=True)
class Faults:
    """Which faults to inject; shares are probabilities per request, drawn from a seeded RNG.

    A request gets at most one of ``drop``, ``rate_limit`` and ``server_error`` (so their sum must
    not exceed 1). Independently, every answer waits ``latency`` seconds and a ``slow`` share waits
    ``slow_seconds`` more; a request whose client hangs up while waiting stores nothing.
    """

    rate_limit: float = 0.0
    retry_after: int = 1
    server_error: float = 0.0
    drop: float = 0.0
    latency: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("rate_limit", "server_error", "drop", "slow"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"fault share {name}={share} must be between 0 and 1")
        if self.rate_limit + self.server_error + self.drop > 1.0:
            raise ValueError("rate_limit + server_error + drop must not exceed 1")
        for name in ("retry_after", "latency", "slow_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        """Faults from a JSON object; keys not given take their defaults (no fault)."""
        defaults, settings = cls(), {}
        for name, value in data.items():
            if name not in defaults.__dataclass_fields__:
                raise ValueError(f"unknown fault setting {name!r}; known: {', '.join(asdict(defaults))}")
            kind = type(getattr(defaults, name))
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise ValueError(f"fault setting {name} must be {'an integer' if kind is int else 'a number'}")
            settings[name] = kind(value)
        return cls(**settings)


class EventStore:
    """Accepted events by kind, deduplicated by ``(kind, id)``, and counters of what happened.

    Safe to read from another thread than the server's. Accepted requests are kept as received
    (raw JSON, with which of their events were new) and parsed again when read, which keeps
    accepting cheap. With ``log_file``, every newly accepted event is also appended to it as one
    NDJSON line ``{"kind": ..., "event": ...}``.
    """

    def __init__(self, log_file: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._log: IO[bytes] | None = log_file.open("ab") if log_file else None
        self._requests_kept: list[tuple[bytes, dict[str, list[int]]]] = []
        self._ids: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._accepted = 0
        self._duplicates = 0

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The accepted events of one kind (``impressions``, ``clicks``, ...), oldest first."""
        if kind not in self._ids:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {', '.join(KINDS)}")
        return self.all()[kind]

    def all(self) -> dict[str, list[dict[str, Any]]]:
        """Every accepted event, by kind, oldest first."""
        with self._lock:
            kept = list(self._requests_kept)
        events: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for raw, new in kept:
            body = orjson.loads(raw)
            for kind, positions in new.items():
                events[kind].extend(body[kind][i] for i in positions)
        return events

    def stats(self) -> dict[str, Any]:
        """Requests by status, errors by errCode, events accepted, duplicates ignored, faults by kind."""
        with self._lock:
            return {
                "requests": dict(self._requests),
                "errors": dict(self._errors),
                "events_accepted": self._accepted,
                "duplicates_ignored": self._duplicates,
                "faults": dict(self._faults),
            }

    def reset(self) -> None:
        """Forget all events and counters (the NDJSON log, if any, is left as it is)."""
        with self._lock:
            self._requests_kept.clear()
            for ids in self._ids.values():
                ids.clear()
            for counter in (self._requests, self._errors, self._faults):
                counter.clear()
            self._accepted = self._duplicates = 0

    def close(self) -> None:
        """Close the NDJSON log, if any."""
        if self._log:
            self._log.close()

    def _add(self, raw: bytes, body: dict[str, Any]) -> None:
        new: dict[str, list[int]] = {}
        with self._lock:
            for kind, ids in self._ids.items():
                positions = []
                for position, event in enumerate(body.get(kind, ())):
                    if event["id"] in ids:
                        self._duplicates += 1
                    else:
                        ids.add(event["id"])
                        positions.append(position)
                if positions:
                    new[kind] = positions
                    self._accepted += len(positions)
            if new:
                self._requests_kept.append((raw, new))
            if new and self._log:
                lines = (
                    b'{"kind":"%s","event":%s}\n' % (kind.encode(), orjson.dumps(body[kind][i]))
                    for kind, positions in new.items()
                    for i in positions
                )
                self._log.write(b"".join(lines))
                self._log.flush()

    def _count(self, status: str, err_code: str | None = None, fault: str | None = None) -> None:
        with self._lock:
            self._requests[status] += 1
            if err_code:
                self._errors[err_code] += 1
            if fault:
                self._faults[fault] += 1

    def _count_fault(self, fault: str) -> None:
        with self._lock:
            self._faults[fault] += 1


class Sandbox:
    """The sandbox server: a context manager serving on a background thread, or :meth:`serve_forever`.

    ``port=0`` picks a free port; ``.url`` is the base URL once started. ``poison_prefix``: any
    impression or click whose ``resolvedBidId`` starts with it makes its whole request answer 400
    ``resolved_bid_id_not_found`` (``None`` disables this).
    """

    def __init__(
        self,
        api_key: str,
        *,
        faults: Faults | None = None,
        seed: int | None = 0,
        poison_prefix: str | None = "poison",
        store_file: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not api_key:
            raise ValueError("the sandbox needs a non-empty API key")
        self.store = EventStore(store_file)
        self._service = _Service(api_key, self.store, faults or Faults(), seed, poison_prefix)
        self._address = (host, port)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __repr__(self) -> str:
        return f"Sandbox(url={self.url!r})"

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        return self._service.faults

    def set_faults(self, faults: Faults, seed: int | None = None) -> None:
        """Change the faults; with ``seed``, also restart the fault RNG from that seed."""
        self._service.set_faults(faults, seed)

    def reset(self) -> None:
        """Forget all events and counters."""
        self.store.reset()

    def __enter__(self) -> Sandbox:
        sock, self.url = listen(*self._address)
        self._server = _server(self._service.app, log_config=None)
        self._thread = start_in_thread(self._server, sock, "topsort-sandbox")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server and self._thread:
            self._server.should_exit = True
            self._thread.join()
        self.store.close()

    def serve_forever(self, listening: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until interrupted (Ctrl-C or SIGTERM); ``listening`` is told the URL
        once the socket is bound."""
        sock, self.url = listen(*self._address)
        if listening is not None:
            listening(self.url)
        try:
            _server(self._service.app).run(sockets=[sock])
        finally:
            self.store.close()


# --- the ASGI application --------------------------------------------------------------------------

_TRANSPORTS: dict[tuple[Any, Any], asyncio.Transport] = {}
"""Open connections of :class:`_DroppableH11Protocol`, by (server address, client address)."""


class _DroppableH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, recording each connection's transport so a request can drop it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _TRANSPORTS[(self.server, self.client)] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        _TRANSPORTS.pop((self.server, self.client), None)
        super().connection_lost(exc)


class _NoAnswer(Response):
    """Sends nothing: the connection is already gone."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


class _Service:
    """The sandbox's behaviour: one instance per :class:`Sandbox`, serving :attr:`app`."""

    def __init__(
        self, api_key: str, store: EventStore, faults: Faults, seed: int | None, poison_prefix: str | None
    ) -> None:
        self._expected_auth = b"bearer " + api_key.encode()
        self._store = store
        self._poison = poison_prefix or None
        self._validator = jsonschema_rs.validator_for(
            orjson.loads(TOPSORT_SCHEMA.read_bytes()), validate_formats=True, mask="value"
        )
        self.faults = faults
        self._rng = random.Random(seed)
        self.app = Starlette(
            routes=[
                Route("/v2/events", self._post_events, methods=["POST"]),
                Route("/_sandbox/events", self._get_events, methods=["GET"]),
                Route("/_sandbox/stats", self._get_stats, methods=["GET"]),
                Route("/_sandbox/reset", self._post_reset, methods=["POST"]),
                Route("/_sandbox/faults", self._faults_endpoint, methods=["GET", "POST"]),
            ],
            exception_handlers={HTTPException: _http_error},
        )
        self.app.router.redirect_slashes = False  # Topsort answers 404 to a trailing slash

    def set_faults(self, faults: Faults, seed: int | None = None) -> None:
        self.faults = faults
        if seed is not None:
            self._rng = random.Random(seed)

    async def _post_events(self, request: Request) -> Response:
        if not self._authorized(request):
            self._store._count("401", "invalid_api_key")
            return _error(401, "invalid_api_key", "missing or invalid API key: send 'Authorization: Bearer <key>'")
        raw = await request.body()
        fault, slow, delay = self._draw_fault()
        if slow:
            self._store._count_fault("slow")
        if delay and await _client_gone(request.receive, delay):
            self._store._count("abandoned")
            return _NoAnswer()
        if fault == "drop":
            self._store._count("dropped", fault=fault)
            _transport(request.scope).abort()
            await _client_gone(request.receive, None)
            return _NoAnswer()
        if fault == "rate_limit":
            self._store._count("429", "too_many_requests", fault)
            response = _error(429, "too_many_requests", "injected fault: rate limited, retry later")
            response.headers["Retry-After"] = str(self.faults.retry_after)
            return response
        if fault == "server_error":
            self._store._count("500", "internal_server_error", fault)
            return _error(500, "internal_server_error", "injected fault: internal server error")
        return self._accept(raw)

    def _accept(self, raw: bytes) -> Response:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._refuse("bad_request", f"malformed JSON body: {exc}")
        try:
            self._validator.validate(body)
        except jsonschema_rs.ValidationError as exc:
            return self._refuse(*_describe(exc))
        if self._poison and _poisoned(body, self._poison):
            return self._refuse("resolved_bid_id_not_found", "one or more resolved bid ids were not found")
        self._store._add(raw, body)
        self._store._count("204")
        return Response(status_code=204)

    def _refuse(self, err_code: str, message: str) -> Response:
        self._store._count("400", err_code)
        return _error(400, err_code, message)

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode("latin-1")
        scheme, _, key = given.partition(b" ")
        return hmac.compare_digest(scheme.lower() + b" " + key.strip(), self._expected_auth)

    def _draw_fault(self) -> tuple[str | None, bool, float]:
        """For one request: the fault (``drop``, ``rate_limit``, ``server_error`` or None), whether
        it is slow, and how long to wait before answering."""
        faults, rng = self.faults, self._rng
        draw, slow = rng.random(), rng.random() < faults.slow
        delay = faults.latency + (faults.slow_seconds if slow else 0.0)
        for fault in ("drop", "rate_limit", "server_error"):
            share = getattr(faults, fault)
            if draw < share:
                return fault, slow, delay
            draw -= share
        return None, slow, delay

    async def _get_events(self, request: Request) -> Response:
        return _json(200, self._store.all())

    async def _get_stats(self, request: Request) -> Response:
        return _json(200, self._store.stats())

    async def _post_reset(self, request: Request) -> Response:
        self._store.reset()
        return Response(status_code=204)

    async def _faults_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                data = orjson.loads(await request.body())
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of fault settings")
                seed = data.pop("seed", None)
                self.set_faults(Faults.from_json(data), seed)
            except (ValueError, TypeError) as exc:
                return _error(400, "bad_request", str(exc))
        return _json(200, asdict(self.faults))


def _describe(error: jsonschema_rs.ValidationError) -> tuple[str, str]:
    """A Topsort-like errCode and a message with the JSON path for a schema error."""
    path, keyword = list(error.instance_path), error.schema_path[-1]
    where = json_path(path)
    missing = getattr(error.kind, "property", None) if keyword == "required" else None
    if not path and keyword == "anyOf":
        return "empty_request", "the request holds no events: send at least one non-empty array of " + ", ".join(KINDS)
    if missing == "path" and path[-1:] == ["placement"]:
        code = "missing_placement"
    elif missing == "productId":
        code = "missing_product_id"
    elif path[:1] == ["purchases"] and missing == "occurredAt":
        code = "missing_purchased_at"
    elif path[:1] == ["purchases"] and (missing == "items" or (path[-1] == "items" and keyword == "minItems")):
        code = "no_purchase_items"
    elif path[-1:] == ["quantity"] and keyword == "minimum":
        code = "purchase_item_quantity_less_or_equal_than_zero"
    else:
        code = "bad_request"
    return code, f"{where}: {topsort_schema().reason(error)}"


def _transport(scope: Scope) -> asyncio.Transport:
    transport = _TRANSPORTS.get((scope["server"], scope["client"]))
    if transport is None:
        raise RuntimeError("dropping a connection needs the sandbox's own server: use Sandbox or the CLI")
    return transport


def _poisoned(body: dict[str, Any], prefix: str) -> bool:
    return any(
        event.get("resolvedBidId", "").startswith(prefix)
        for kind in ("impressions", "clicks")
        for event in body.get(kind, ())
    )


async def _client_gone(receive: Receive, seconds: float | None) -> bool:
    """Wait up to ``seconds`` (forever if None) for the client to hang up; whether it did."""
    try:
        async with asyncio.timeout(seconds):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


def _error(status: int, err_code: str, message: str) -> Response:
    return _json(status, {"errCode": err_code, "message": message, "docUrl": _DOC_URL})


def _json(status: int, content: Any) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=_JSON)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return _error(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")


def _server(app: Starlette, **config: Any) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            http=_DroppableH11Protocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=1,
            **config,
        )
    )


# --- command line ----------------------------------------------------------------------------------
