"""Delivery to a Topsort stand-in over real HTTP on 127.0.0.1: batching, retries, bisection, keys."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.delivery.dead_letters import read_dead_letters
from engine.delivery.pipeline import deliver
from engine.delivery.dispatch import AuthenticationError, Dispatcher, EndpointError
from engine.errors import EngineError
from engine.outcome import Emitted
from engine.delivery.retry import RetryPolicy, server_delay
from engine.sandbox.server import Faults, Sandbox
from engine.record import Record
from engine.delivery.spool import Chunk, Spool

from .conftest import spool_emitted

KEY = "sk_test_dispatch-0123456789"
WHEN = "2026-11-27T10:00:00Z"


# -- events and spools -----------------------------------------------------------------------------


def _impression(n: int, bid: str | None = None) -> Emitted:
    event = {"id": f"imp-{n}", "occurredAt": WHEN, "opaqueUserId": f"u-{n % 7}", "resolvedBidId": bid or f"bid-{n}"}
    return Emitted("impressions", "product-viewed", event)


def _click(n: int) -> Emitted:
    event = {"id": f"clk-{n}", "occurredAt": WHEN, "opaqueUserId": "u-1", "resolvedBidId": f"bid-{n}"}
    return Emitted("clicks", "product-clicked", event)


def _purchase(n: int) -> Emitted:
    item = {"productId": f"p-{n}", "unitPrice": 9.5, "quantity": 2}
    event = {"id": f"pur-{n}", "occurredAt": WHEN, "opaqueUserId": "u-1", "items": [item]}
    return Emitted("purchases", "order-completed", event)


def _spool(path: Path, emitted: list[Emitted]) -> Spool:
    """A spool holding each event as the only output of its own input line."""
    spool = Spool(path / "spool.db")
    chunk = Chunk()
    for line, e in enumerate(emitted, start=1):
        segment = {"type": "track", "messageId": f"m-{line}", "properties": {"n": line}}
        spool_emitted(chunk, Record("events.ndjson", line, orjson.dumps(segment), event=segment), [e])
    spool.commit(chunk)
    return spool


def _deliver(spool: Spool, url: str, key: str = KEY, **options: Any) -> Dispatcher:
    dispatcher = Dispatcher(spool, endpoint=url, api_key=key, **options)
    dispatcher.run()
    return dispatcher


def _dead_letters(spool: Spool, tmp_path: Path) -> list[dict[str, Any]]:
    out = tmp_path / "dead.ndjson"
    spool.export_dead_letters(out)
    return list(read_dead_letters(out)) if out.exists() else []


def _stored_ids(sandbox: Sandbox) -> list[str]:
    return [event["id"] for events in sandbox.store.all().values() for event in events]


# -- the happy path ----------------------------------------------------------------------------------


def test_kinds_are_mixed_in_requests_of_at_most_50_per_array(sandbox: Sandbox, tmp_path: Path) -> None:
    emitted = [_impression(n) for n in range(120)] + [_click(n) for n in range(30)] + [_purchase(n) for n in range(10)]
    spool = _spool(tmp_path, emitted)
    dispatcher = _deliver(spool, sandbox.url)

    assert sorted(_stored_ids(sandbox)) == sorted(e.event["id"] for e in emitted)
    assert dispatcher.stats.delivered == 160 and dispatcher.stats.failed == 0
    # impressions fill an array at 50, 100; the rest (20 + 30 + 10) goes as one mixed request
    assert dispatcher.stats.requests == 3 == sandbox.store.stats()["requests"]["204"]
    assert spool.unsent == 0 and spool.unsent_after(0, 10) == []


def test_a_partial_batch_leaves_after_the_maximum_latency(sandbox: Sandbox, tmp_path: Path) -> None:
    """Events from a source that stays open go after ~max_latency, not when the source ends;
    so do events spooled after the spool had emptied."""
    spool = Spool(tmp_path / "spool.db")
    seen_after: list[float] = []

    def chunks() -> Iterator[Chunk]:
        for first in (0, 3):
            chunk = Chunk()
            for n in range(first, first + 3):
                spool_emitted(chunk, Record("live", n + 1, b"{}", event={}), [_impression(n)])
            yield chunk
            started = time.monotonic()
            while time.monotonic() - started < 3 and len(_stored_ids(sandbox)) < first + 3:
                time.sleep(0.01)
            seen_after.append(time.monotonic() - started)
            time.sleep(0.3)  # let the spool settle and empty

    deliver(Dispatcher(spool, endpoint=sandbox.url, api_key=KEY, max_latency=0.3), chunks())
    assert sorted(_stored_ids(sandbox)) == sorted(f"imp-{n}" for n in range(6))
    assert all(after < 1.5 for after in seen_after), seen_after
    assert spool.unsent == 0


# -- 400: bisection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("poisoned", [0, 17, 25, 49])
def test_one_poisoned_event_among_50_is_isolated_in_logarithmic_requests(
    sandbox: Sandbox, tmp_path: Path, poisoned: int
) -> None:
    emitted = [_impression(n, bid="poison-bid" if n == poisoned else None) for n in range(50)]
    spool = _spool(tmp_path, emitted)
    dispatcher = _deliver(spool, sandbox.url)

    assert sorted(_stored_ids(sandbox)) == sorted(f"imp-{n}" for n in range(50) if n != poisoned)
    [letter] = _dead_letters(spool, tmp_path)
    assert letter["stage"] == "deliver" and letter["line"] == poisoned + 1
    [why] = letter["rejected"]
    assert why["errCode"] == "resolved_bid_id_not_found"
    assert why["id"] == f"imp-{poisoned}" and why["rule"] == "product-viewed"
    assert why["reason"].startswith("resolved_bid_id_not_found: ")
    assert dispatcher.stats.requests <= 2 * math.log2(50) + 2
    assert dispatcher.stats.requests == sum(sandbox.store.stats()["requests"].values())


def test_a_few_poisoned_events_cost_k_log_n_requests(sandbox: Sandbox, tmp_path: Path) -> None:
    bad = {3, 77, 150}
    emitted = [_impression(n, bid="poison-x" if n in bad else None) for n in range(200)]
    spool = _spool(tmp_path, emitted)
    dispatcher = _deliver(spool, sandbox.url)

    assert len(_stored_ids(sandbox)) == 197
    assert sorted(letter["line"] - 1 for letter in _dead_letters(spool, tmp_path)) == sorted(bad)
    batches = 4  # 200 impressions in requests of 50, one bad event in three of them
    assert dispatcher.stats.requests <= batches + len(bad) * (2 * math.log2(50) + 1)


# -- transient failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        Faults(server_error=0.4),
        Faults(drop=0.4),
        Faults(rate_limit=0.3, retry_after=0),
        Faults(server_error=0.2, drop=0.2, rate_limit=0.2, retry_after=0),
    ],
    ids=["500", "dropped", "429", "mixed"],
)
def test_transient_failures_are_retried_until_delivered(sandbox: Sandbox, tmp_path: Path, faults: Faults) -> None:
    sandbox.set_faults(faults, seed=3)
    emitted = [_impression(n) for n in range(500)]
    spool = _spool(tmp_path, emitted)
    dispatcher = _deliver(spool, sandbox.url, policy=RetryPolicy(base=0.01, cap=0.1, max_elapsed=30))

    assert len(_stored_ids(sandbox)) == 500
    assert dispatcher.stats.retries > 0 and dispatcher.stats.failed == 0
    assert dispatcher.stats.requests == 10 + dispatcher.stats.retries
    assert spool.unsent == 0 and _dead_letters(spool, tmp_path) == []


def test_timeouts_are_retried(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.set_faults(Faults(slow=0.4, slow_seconds=5), seed=5)
    spool = _spool(tmp_path, [_impression(n) for n in range(300)])
    dispatcher = _deliver(spool, sandbox.url, timeout=0.3, policy=RetryPolicy(base=0.01, cap=0.05))

    assert len(_stored_ids(sandbox)) == 300
    slow = sandbox.store.stats()["faults"].get("slow", 0)
    assert slow >= 1 and dispatcher.stats.retries >= slow  # each slow answer timed out, then was retried


def test_retry_after_pauses_every_request(sandbox: Sandbox, tmp_path: Path) -> None:
    """A 429 storm: each Retry-After: 1 is waited out, and the storm passes."""
    sandbox.set_faults(Faults(rate_limit=0.5, retry_after=1), seed=11)
    spool = _spool(tmp_path, [_impression(n) for n in range(200)])
    started = time.monotonic()
    dispatcher = _deliver(spool, sandbox.url, max_in_flight=2)
    elapsed = time.monotonic() - started

    limited = sandbox.store.stats()["requests"]["429"]
    assert limited >= 1 and dispatcher.stats.retries == limited
    assert len(_stored_ids(sandbox)) == 200
    assert elapsed >= 1.0  # at least one full Retry-After was waited out


def test_gives_up_after_the_retry_budget(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.set_faults(Faults(server_error=1.0))
    spool = _spool(tmp_path, [_impression(n) for n in range(60)])
    dispatcher = _deliver(spool, sandbox.url, policy=RetryPolicy(base=0.05, cap=0.1, max_elapsed=0.5))

    letters = _dead_letters(spool, tmp_path)
    assert len(letters) == 60 and dispatcher.stats.failed == 60
    reasons = {letter["rejected"][0]["reason"] for letter in letters}
    assert all(r.startswith("undeliverable after ") and r.endswith("HTTP 500") for r in reasons)
    assert {letter["rejected"][0]["errCode"] for letter in letters} == {None}
    assert spool.unsent == 0


# -- exact waits, with a scripted server ------------------------------------------------------------


class _Scripted(ThreadingHTTPServer):
    """Answers each POST with the next scripted (status, headers), recording when it came.

    Headers may be given as a function, called when answering (for times relative to then).
    """

    daemon_threads = True

    def __init__(self, script: list[tuple[int, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script = script
        self.arrivals: list[float] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Scripted

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.arrivals.append(time.monotonic())
        status, headers = self.server.script.pop(0) if self.server.script else (204, {})
        headers = headers() if callable(headers) else headers
        body = b'{"errCode":"bad_request","message":"scripted %d"}' % status if status >= 400 else b""
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Callable[[list[tuple[int, Any]]], _Scripted]]:
    servers: list[_Scripted] = []

    def start(script: list[tuple[int, Any]]) -> _Scripted:
        server = _Scripted(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_each_kind_of_server_delay_is_waited_out(scripted: Any, tmp_path: Path) -> None:
    server = scripted([
        (429, {"Retry-After": "1"}),
        (503, lambda: {"Retry-After": formatdate(time.time() + 2, usegmt=True)}),
        (429, lambda: {"X-RateLimit-Reset": str(time.time() + 1.5)}),
        (429, {"X-RateLimit-Reset": "0.5"}),
    ])
    spool = _spool(tmp_path, [_impression(n) for n in range(10)])
    dispatcher = _deliver(spool, server.url, policy=RetryPolicy(base=5, cap=5))  # backoff alone: 5 s

    gaps = [later - earlier for earlier, later in zip(server.arrivals, server.arrivals[1:])]
    assert len(gaps) == 4 and dispatcher.stats.retries == 4 and dispatcher.stats.delivered == 10
    # each named delay is waited out, and no longer than the 5 s the backoff alone would take
    # (an HTTP date has whole seconds: "in 2 s" is between 1 and 2 s from now)
    for gap, low in zip(gaps, [1.0, 0.9, 1.4, 0.5]):
        assert low - 0.05 <= gap < 3, gaps


def test_a_wait_past_the_budget_is_not_waited(scripted: Any, tmp_path: Path) -> None:
    server = scripted([(429, {"Retry-After": "3600"})])
    spool = _spool(tmp_path, [_impression(1)])
    started = time.monotonic()
    dispatcher = _deliver(spool, server.url, policy=RetryPolicy(max_elapsed=60))

    assert time.monotonic() - started < 2
    assert dispatcher.stats.failed == 1 and len(server.arrivals) == 1
    [letter] = _dead_letters(spool, tmp_path)
    reason = letter["rejected"][0]["reason"]
    assert reason.startswith("undeliverable after 1 attempt(s) in ") and reason.endswith(" s: HTTP 429")


def test_a_422_is_bisected_like_a_400(scripted: Any, tmp_path: Path) -> None:
    server = scripted([(422, {})])  # then 204: the first half passes, so the second one is the bad one
    spool = _spool(tmp_path, [_impression(1), _impression(2)])
    dispatcher = _deliver(spool, server.url)

    assert len(server.arrivals) == 2 and dispatcher.stats.delivered == 1
    [letter] = _dead_letters(spool, tmp_path)
    [why] = letter["rejected"]
    assert (why["id"], why["errCode"], why["reason"]) == ("imp-2", "bad_request", "bad_request: scripted 422")


# -- fatal answers ------------------------------------------------------------------------------------


def test_a_bad_key_stops_delivery_and_keeps_the_events(sandbox: Sandbox, tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(500)])
    wrong = "sk_live_wrong-key-9876543210"
    with pytest.raises(AuthenticationError) as raised:
        _deliver(spool, sandbox.url, key=wrong)
    assert isinstance(raised.value, EngineError)
    message = str(raised.value)
    assert "refused the API key" in message and "TOPSORT_API_KEY" in message
    assert wrong not in message and KEY not in message
    assert spool.unsent == 500 and len(spool.unsent_after(0, 1000)) == 500
    assert _stored_ids(sandbox) == []

    dispatcher = _deliver(spool, sandbox.url)
    assert dispatcher.stats.delivered == 500 and len(_stored_ids(sandbox)) == 500
    assert spool.unsent == 0 and _dead_letters(spool, tmp_path) == []


def test_a_wrong_endpoint_stops_delivery(sandbox: Sandbox, tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(1)])
    with pytest.raises(EndpointError, match="check --endpoint"):
        _deliver(spool, sandbox.url + "/v1")
    assert spool.unsent == 1


# -- retry policy ------------------------------------------------------------------------------------


def test_server_delay_headers() -> None:
    now = 1_800_000_000.0
    assert server_delay({"retry-after": "7"}, now) == 7
    assert server_delay({"retry-after": formatdate(now + 30, usegmt=True)}, now) == pytest.approx(30, abs=1)
    assert server_delay({"retry-after": formatdate(now - 30, usegmt=True)}, now) == 0
    assert server_delay({"x-ratelimit-reset": str(now + 12)}, now) == pytest.approx(12)
    assert server_delay({"x-ratelimit-reset": "4"}, now) == 4
    assert server_delay({"retry-after": "2", "x-ratelimit-reset": "5"}, now) == 5
    assert server_delay({"retry-after": "soon"}, now) is None
    assert server_delay({}, now) is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(base=0.5, cap=4)
    for attempt, ceiling in enumerate([0.5, 1, 2, 4, 4, 4]):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8
    assert policy.delay(3, hint=1.25) == 1.25
