"""The dispatcher on its own: answers scripted with ``httpx.MockTransport``, time kept by a clock that
only pretends to wait. (``test_dispatch.py`` drives it against real servers on 127.0.0.1.)"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from engine.delivery.pipeline import deliver
from engine.delivery.dispatch import AuthenticationError, Clock, Dispatcher, EndpointError, State
from engine.delivery.retry import RetryPolicy
from engine.delivery.spool import Chunk, Spool

from .test_dispatch import _dead_letters, _impression, _purchase, _spool

KEY = "sk_test_unit-0123456789"
URL = "https://api.topsort.test"
NOW = 1_800_000_000.0


class _PretendClock(Clock):
    """Starts at :data:`NOW`; waiting adds to the time at once and is recorded."""

    def __init__(self) -> None:
        self.now = NOW
        self.waits: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def time(self) -> float:
        return self.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        with self._lock:
            self.waits.append(round(seconds, 3))
            self.now += seconds
        return stop.is_set()


Handler = Callable[[httpx.Request], httpx.Response]


class _Topsort:
    """Records each request's event ids, and answers with ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
        return self.handler(request)

    def ids(self, request: httpx.Request) -> list[str]:
        return [event["id"] for events in orjson.loads(request.content).values() for event in events]


def _deliver(spool: Spool, handler: Handler, **options: Any) -> tuple[Dispatcher, _Topsort, _PretendClock]:
    topsort, clock = _Topsort(handler), _PretendClock()
    options.setdefault("policy", RetryPolicy(base=1, cap=1, max_elapsed=60))
    dispatcher = Dispatcher(spool, endpoint=URL, api_key=KEY, transport=httpx.MockTransport(topsort), clock=clock,
                            **options)
    dispatcher.run()
    return dispatcher, topsort, clock


def _script(*answers: httpx.Response) -> Handler:
    """Answer with ``answers`` in turn, then 204."""
    left = list(answers)
    return lambda _request: left.pop(0) if left else httpx.Response(204)


def _refusing(bad: set[str], status: int = 400) -> Handler:
    """Refuse any request holding one of the ``bad`` ids as a whole, as Topsort does."""

    def answer(request: httpx.Request) -> httpx.Response:
        events = [e for events in orjson.loads(request.content).values() for e in events]
        if any(e["id"] in bad for e in events):
            return httpx.Response(status, json={"errCode": "resolved_bid_id_not_found", "message": "unknown bid"})
        return httpx.Response(204)

    return answer


# -- 2xx ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204])
def test_a_2xx_delivers_the_batch(tmp_path: Path, status: int) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(60)] + [_purchase(1)])
    dispatcher, topsort, clock = _deliver(spool, lambda _r: httpx.Response(status))

    first, second = topsort.requests
    assert first.url == URL + "/v2/events" and first.method == "POST"
    assert first.headers["authorization"] == f"Bearer {KEY}" and first.headers["content-type"] == "application/json"
    assert list(orjson.loads(first.content)) == ["impressions"]                  # 50: a full array
    assert list(orjson.loads(second.content)) == ["impressions", "purchases"]    # the rest, kinds mixed
    assert sorted(topsort.ids(first) + topsort.ids(second)) == sorted([f"imp-{n}" for n in range(60)] + ["pur-1"])
    assert (dispatcher.stats.delivered, dispatcher.stats.requests, dispatcher.stats.retries) == (61, 2, 0)
    assert spool.unsent == 0 and clock.waits == []


# -- 400, 422: bisection -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
@pytest.mark.parametrize("bad", [{0}, {49}, {17, 18}, {3, 30, 44}])
def test_a_refusal_is_bisected_down_to_the_bad_events(tmp_path: Path, status: int, bad: set[int]) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(50)])
    dispatcher, topsort, _ = _deliver(spool, _refusing({f"imp-{n}" for n in bad}, status))

    accepted = [i for r in topsort.requests if not set(topsort.ids(r)) & {f"imp-{n}" for n in bad} for i in topsort.ids(r)]
    assert sorted(accepted) == sorted(f"imp-{n}" for n in range(50) if n not in bad)
    letters = _dead_letters(spool, tmp_path)
    assert sorted(letter["line"] - 1 for letter in letters) == sorted(bad)
    for letter in letters:
        [why] = letter["rejected"]
        assert letter["stage"] == "deliver" and why["id"] == f"imp-{letter['line'] - 1}"
        assert (why["errCode"], why["reason"]) == ("resolved_bid_id_not_found", "resolved_bid_id_not_found: unknown bid")
    assert dispatcher.stats.failed == len(bad) and dispatcher.stats.delivered == 50 - len(bad)
    assert dispatcher.stats.requests <= 1 + len(bad) * (2 * math.ceil(math.log2(50)))
    assert dispatcher.stats.retries == 0 and spool.unsent == 0


def test_a_half_known_to_hold_the_refusal_is_split_without_being_sent_whole(tmp_path: Path) -> None:
    """The last of 50 refused: each first half passes, so each second half is split at once."""
    spool = _spool(tmp_path, [_impression(n) for n in range(50)])
    dispatcher, topsort, _ = _deliver(spool, _refusing({"imp-49"}))

    assert [len(r_ids) for r_ids in map(topsort.ids, topsort.requests)] == [50, 25, 12, 6, 3, 2, 1]
    assert dispatcher.stats.failed == 1 and dispatcher.stats.delivered == 49


def test_a_refusal_without_an_errcode_keeps_the_status_and_text(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(1)])
    _deliver(spool, _script(httpx.Response(400, text="  bad body\n")))

    [letter] = _dead_letters(spool, tmp_path)
    [why] = letter["rejected"]
    assert (why["errCode"], why["reason"]) == (None, "HTTP 400: bad body")


# -- 401, 403, 404, 405: stop, events kept ------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_with_one_sentence_and_keeps_the_events(tmp_path: Path, status: int) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(120)])
    with pytest.raises(AuthenticationError) as raised:
        _deliver(spool, lambda _r: httpx.Response(status, json={"message": "nope"}), max_in_flight=1)

    message = str(raised.value)
    assert message.count(". ") == 0 and message.startswith(f"Topsort refused the API key (HTTP {status})")
    assert "TOPSORT_API_KEY" in message and KEY not in message
    assert spool.unsent == 120 and len(spool.unsent_after(0, 1000)) == 120
    assert _dead_letters(spool, tmp_path) == []


@pytest.mark.parametrize("status", [404, 405])
def test_a_wrong_endpoint_stops_and_keeps_the_events(tmp_path: Path, status: int) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(3)])
    with pytest.raises(EndpointError, match=f"answered HTTP {status}: check --endpoint"):
        _deliver(spool, lambda _r: httpx.Response(status))
    assert spool.unsent == 3


# -- 408, 429, 5xx and network errors: retried ---------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_after_a_backoff(tmp_path: Path, status: int) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(5)])
    dispatcher, topsort, clock = _deliver(spool, _script(httpx.Response(status), httpx.Response(status)),
                                          policy=RetryPolicy(base=0.5, cap=4, max_elapsed=60))

    assert len(topsort.requests) == 3 and dispatcher.stats.retries == 2 and dispatcher.stats.delivered == 5
    assert [topsort.ids(r) for r in topsort.requests] == [[f"imp-{n}" for n in range(5)]] * 3   # same ids again
    assert len(clock.waits) == 2 and 0 <= clock.waits[0] <= 0.5 and 0 <= clock.waits[1] <= 1.0
    assert spool.unsent == 0 and _dead_letters(spool, tmp_path) == []


def test_network_errors_are_retried(tmp_path: Path) -> None:
    failures = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]

    def answer(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop(0)
        return httpx.Response(204)

    spool = _spool(tmp_path, [_impression(1)])
    dispatcher, topsort, _ = _deliver(spool, answer)
    assert len(topsort.requests) == 3 and dispatcher.stats.retries == 2 and dispatcher.stats.delivered == 1


@pytest.mark.parametrize(
    "headers, wait",
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"X-RateLimit-Reset": "12"}, 12.0),
        ({"X-RateLimit-Reset": str(int(NOW) + 45)}, 45.0),
        ({"Retry-After": "2", "X-RateLimit-Reset": "5"}, 5.0),
    ],
    ids=["retry-after-seconds", "retry-after-date", "reset-seconds", "reset-unix-time", "longest-wins"],
)
def test_the_delay_the_server_names_is_waited_out(tmp_path: Path, headers: dict[str, str], wait: float) -> None:
    spool = _spool(tmp_path, [_impression(1)])
    dispatcher, topsort, clock = _deliver(spool, _script(httpx.Response(429, headers=headers)),
                                          policy=RetryPolicy(base=100, cap=100, max_elapsed=300))

    assert len(topsort.requests) == 2 and dispatcher.stats.delivered == 1
    assert clock.waits == [wait]               # exactly as named; the 100 s backoff is not used


def test_a_named_delay_pauses_the_other_requests_too(tmp_path: Path) -> None:
    """After a 429 with Retry-After, no request leaves before the pause ends, on any worker."""
    spool = _spool(tmp_path, [_impression(n) for n in range(150)])
    clock = _PretendClock()
    sent_at: list[float] = []
    first = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        sent_at.append(clock.monotonic())
        if not first.is_set():
            first.set()
            return httpx.Response(429, headers={"Retry-After": "20"})
        return httpx.Response(204)

    dispatcher = Dispatcher(spool, endpoint=URL, api_key=KEY, transport=httpx.MockTransport(answer), clock=clock,
                            max_in_flight=1, policy=RetryPolicy(base=1, cap=1))
    dispatcher.run()
    assert dispatcher.stats.delivered == 150 and dispatcher.stats.retries == 1
    assert sent_at[0] == NOW and all(at >= NOW + 20 for at in sent_at[1:])


# -- the retry budget ----------------------------------------------------------------------------------


def test_events_are_undeliverable_once_the_retry_time_is_spent(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(3)])
    dispatcher, topsort, clock = _deliver(spool, lambda _r: httpx.Response(503),
                                          policy=RetryPolicy(base=4, cap=4, max_elapsed=10))

    assert sum(clock.waits) <= 10 and len(topsort.requests) == len(clock.waits) + 1
    letters = _dead_letters(spool, tmp_path)
    assert len(letters) == 3 and dispatcher.stats.failed == 3 and spool.unsent == 0
    reasons = {letter["rejected"][0]["reason"] for letter in letters}
    [reason] = reasons
    assert reason.startswith(f"undeliverable after {len(topsort.requests)} attempt(s) in ") and reason.endswith(": HTTP 503")
    assert {letter["rejected"][0]["errCode"] for letter in letters} == {None}


def test_a_named_delay_past_the_budget_is_not_waited(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(1)])
    dispatcher, topsort, clock = _deliver(spool, _script(httpx.Response(429, headers={"Retry-After": "3600"})),
                                          policy=RetryPolicy(max_elapsed=120))

    assert len(topsort.requests) == 1 and clock.waits == [] and dispatcher.stats.failed == 1
    [letter] = _dead_letters(spool, tmp_path)
    assert letter["rejected"][0]["reason"] == "undeliverable after 1 attempt(s) in 0.0 s: HTTP 429"


# -- stopping: a state, not an exception ----------------------------------------------------------------


def _dispatcher(spool: Spool, handler: Handler, **options: Any) -> tuple[Dispatcher, _Topsort]:
    topsort = _Topsort(handler)
    dispatcher = Dispatcher(spool, endpoint=URL, api_key=KEY, transport=httpx.MockTransport(topsort),
                            clock=_PretendClock(), **options)
    return dispatcher, topsort


def _endless(dispatcher: Dispatcher) -> Iterator[Any]:
    """Input that never ends by itself (a consumer, a server): it only waits until delivery stops."""
    while dispatcher.state not in (State.STOPPING, State.STOPPED):
        time.sleep(0.01)
    yield from ()


def test_stop_before_run_ends_at_once_and_keeps_the_spool(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(60)])
    dispatcher, topsort = _dispatcher(spool, lambda _r: httpx.Response(204))
    assert dispatcher.state is State.READY

    dispatcher.stop(0)
    assert dispatcher.state is State.DRAINING
    dispatcher.run()

    assert dispatcher.state is State.STOPPED
    assert topsort.requests == [] and spool.unsent == 60


def test_a_drain_timeout_delivers_what_is_spooled_then_ends_an_endless_input(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(120)])
    dispatcher, topsort = _dispatcher(spool, lambda _r: httpx.Response(204), max_latency=0.01)
    threading.Timer(0.2, dispatcher.stop, args=(0.5,)).start()

    started = time.monotonic()
    stats = deliver(dispatcher, _endless(dispatcher))

    assert 0.6 <= time.monotonic() - started < 5
    assert dispatcher.state is State.STOPPED
    assert stats.delivered == 120 and spool.unsent == 0 and len(topsort.requests) == 3


def test_stop_now_answers_the_request_in_flight_and_leaves_the_rest_in_the_spool(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(120)])
    sent, release = threading.Event(), threading.Event()

    def slow(_request: httpx.Request) -> httpx.Response:
        sent.set()
        release.wait(5)
        return httpx.Response(204)

    dispatcher, topsort = _dispatcher(spool, slow, max_in_flight=1)

    def stop_while_in_flight() -> None:
        sent.wait(5)
        dispatcher.stop(0)
        dispatcher.stop(30)  # a later call never moves the deadline away
        release.set()

    threading.Thread(target=stop_while_in_flight).start()
    stats = deliver(dispatcher, _endless(dispatcher))

    assert dispatcher.state is State.STOPPED
    assert len(topsort.requests) == 1 and stats.delivered == 50   # the request in flight was answered, settled
    assert spool.unsent == 70                                      # the rest waits for the next run


def test_a_failing_input_is_raised_by_deliver_and_a_stopped_dispatcher_takes_no_more(tmp_path: Path) -> None:
    spool = _spool(tmp_path, [_impression(n) for n in range(3)])
    dispatcher, _ = _dispatcher(spool, lambda _r: httpx.Response(204))

    def broken() -> Iterator[Chunk]:
        yield Chunk()
        raise ValueError("the input broke")

    with pytest.raises(ValueError, match="the input broke"):
        deliver(dispatcher, broken())
    assert dispatcher.state is State.STOPPED
    assert dispatcher.offer(Chunk()) is False


def test_run_says_where_chunks_go_now(tmp_path: Path) -> None:
    dispatcher, _ = _dispatcher(_spool(tmp_path, []), lambda _r: httpx.Response(204))
    with pytest.raises(TypeError, match="pipeline.deliver"):
        dispatcher.run([Chunk()])  # type: ignore[arg-type]
