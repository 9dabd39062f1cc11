"""``segment-topsort serve``, over 127.0.0.1, delivering into a sandbox.

Every check of what arrived is made after the server has stopped: stopping drains the spool, so
nothing here waits on a clock except the bounded polls of ``_eventually``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from engine import Engine
from engine.delivery.dead_letters import read_dead_letters
from engine.delivery.dispatch import AuthenticationError
from engine.limits import MAX_DEPTH
from engine.delivery.retry import RetryPolicy
from engine.sandbox.server import Faults, Sandbox
from engine.ingest.http.server import MAX_REQUEST_EVENTS, Server, ServeSettings
from engine.delivery.spool import Spool

from .conftest import ROOT

KEY = "serve-test-key"
SECRET = "whsec-serve-test"
WRITE_KEY = "wk-serve-test"
_ENGINE = Engine.from_folders()


def view(message_id: str, **extra: Any) -> dict[str, Any]:
    """A Product Viewed track call, as Segment sends it, that emits one impression."""
    return {
        "type": "track", "event": "Product Viewed", "messageId": message_id,
        "timestamp": "2026-11-27T10:00:00.000Z", "anonymousId": "anon-1",
        "context": {"page": {"path": "/p/1"}, "library": {"name": "analytics.js", "version": "2.11.1"}},
        "properties": {"product_id": f"sku-{message_id}", "resolvedBidId": f"bid-{message_id}", "price": 9.99},
        **extra,
    }


def expected_ids(events: list[dict[str, Any]]) -> Counter[str]:
    """The Topsort event ids the bundled rules make of ``events``."""
    return Counter(e.event["id"] for event in events for e in _ENGINE.process(event).emitted)


def arrived(sandbox: Sandbox) -> Counter[str]:
    return Counter(event["id"] for events in sandbox.store.all().values() for event in events)


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def basic(write_key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()}


def _eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def serving(sandbox: Sandbox, tmp_path: Path) -> Callable[..., Any]:
    """Start ``serve`` against the sandbox: ``with serving(**settings) as server: ...``."""

    @contextmanager
    def start(**overrides: Any) -> Iterator[Server]:
        settings = {
            "endpoint": sandbox.url, "api_key": KEY, "spool": tmp_path / "serve.spool",
            "dead_letters": tmp_path / "dead.ndjson", "max_latency": 0.02, "drain_timeout": 30.0,
            **overrides,
        }
        with Server(ServeSettings(**settings)) as server:
            yield server

    return start


def test_webhook_signed_events_arrive_exactly_once(serving, sandbox: Sandbox, tmp_path: Path) -> None:
    single = view("w-1")
    array = [view(f"w-{i}") for i in range(2, 12)] + [{"type": "identify", "messageId": "w-id", "userId": "u"}]
    with serving(shared_secret=SECRET) as server, httpx.Client(base_url=server.url) as client:
        for payload in (single, array):
            body = orjson.dumps(payload)
            answer = client.post("/webhook", content=body, headers={"X-Signature": sign(body)})
            assert answer.status_code == 200, answer.text
        assert answer.json() == {"success": True, "accepted": 11, "duplicates": 0}
    assert arrived(sandbox) == expected_ids([single, *array]) and len(arrived(sandbox)) == 11
    assert sandbox.store.stats()["duplicates_ignored"] == 0
    assert not (tmp_path / "dead.ndjson").exists()  # the identify is skipped, not dead-lettered


def test_webhook_refuses_missing_and_bad_signatures(serving, sandbox: Sandbox) -> None:
    body = orjson.dumps(view("s-1"))
    with serving(shared_secret=SECRET) as server, httpx.Client(base_url=server.url) as client:
        missing = client.post("/webhook", content=body)
        bad = client.post("/webhook", content=body, headers={"X-Signature": sign(body, "another-secret")})
        tampered = client.post("/webhook", content=body + b" ", headers={"X-Signature": sign(body)})
    assert (missing.status_code, missing.json()["error"]) == (401, "missing_signature")
    assert (bad.status_code, bad.json()["error"]) == (401, "bad_signature")
    assert (tampered.status_code, tampered.json()["error"]) == (401, "bad_signature")
    assert all(SECRET not in answer.text for answer in (missing, bad, tampered))
    assert not arrived(sandbox)


def test_webhook_unsigned_when_no_secret_is_set(serving, sandbox: Sandbox) -> None:
    with serving() as server:
        assert httpx.post(server.url + "/webhook", json=view("u-1")).status_code == 200
    assert arrived(sandbox) == Counter({"u-1": 1})


def test_tracking_api_calls_with_write_keys(serving, sandbox: Sandbox) -> None:
    track = {k: v for k, v in view("t-1").items() if k != "type"}
    page = {"messageId": "t-2", "timestamp": "2026-11-27T10:00:00Z", "anonymousId": "anon-1",
            "context": {"page": {"path": "/"}}, "properties": {"page": {"type": "home", "pageId": "home"}}}
    batch = {"batch": [view("t-3"), view("t-4")], "sentAt": "2026-11-27T10:00:01Z"}
    in_body = {"batch": [view("t-5")], "writeKey": WRITE_KEY}
    with serving(write_keys=frozenset({WRITE_KEY, "other"})) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/track", json=track, headers=basic(WRITE_KEY)).status_code == 200
        assert client.post("/v1/page", json=page, headers=basic(WRITE_KEY)).status_code == 200
        assert client.post("/v1/batch", json=batch, headers=basic(WRITE_KEY)).status_code == 200
        assert client.post("/v1/batch", json=in_body).status_code == 200
        missing = client.post("/v1/batch", json={"batch": [view("t-6")]})
        wrong = client.post("/v1/track", json=view("t-7"), headers=basic("stolen"))
    assert (missing.status_code, missing.json()["error"]) == (401, "missing_write_key")
    assert (wrong.status_code, wrong.json()["error"]) == (401, "bad_write_key")
    page["type"] = "page"
    assert arrived(sandbox) == expected_ids([view("t-1"), page, *batch["batch"], *in_body["batch"]])
    assert set(sandbox.store.all()["pageviews"][0]) >= {"id", "occurredAt", "opaqueUserId", "page"}


def test_oversize_and_malformed_requests_are_refused(serving, sandbox: Sandbox) -> None:
    big = view("b-1", properties={"blob": "x" * 33_000})
    with serving() as server, httpx.Client(base_url=server.url) as client:
        answers = {
            "event": client.post("/v1/track", json=big),
            "item": client.post("/webhook", json=[view("b-2"), big]),
            "request": client.post("/v1/batch", json={"batch": [view(f"b-{i}", pad="y" * 20_000) for i in range(30)]}),
            "count": client.post("/v1/batch", json={"batch": [{"type": "identify"}] * (MAX_REQUEST_EVENTS + 1)}),
            "malformed": client.post("/webhook", content=b'{"type": "track", '),
            "not a batch": client.post("/v1/batch", json=[view("b-3")]),
            "gzip": client.post("/webhook", content=b"\x1f\x8b", headers={"Content-Encoding": "gzip"}),
            "brotli": client.post("/webhook", content=b"{}", headers={"Content-Encoding": "br"}),
        }
    status = {name: (answer.status_code, answer.json()["error"]) for name, answer in answers.items()}
    assert status == {
        "event": (413, "event_too_large"),
        "item": (413, "event_too_large"),
        "request": (413, "request_too_large"),
        "count": (413, "too_many_events"),
        "malformed": (400, "malformed_json"),
        "not a batch": (400, "bad_request"),
        "gzip": (400, "bad_encoding"),
        "brotli": (415, "unsupported_encoding"),
    }
    assert all(answer.json()["reason"] for answer in answers.values())
    assert not arrived(sandbox)


def test_rejected_events_are_accepted_and_dead_lettered(serving, sandbox: Sandbox, tmp_path: Path) -> None:
    no_user = {k: v for k, v in view("r-1").items() if k != "anonymousId"}
    with serving() as server:
        answer = httpx.post(server.url + "/webhook", json=[no_user, view("r-2"), "not an event"])
    assert answer.status_code == 200
    assert arrived(sandbox) == Counter({"r-2": 1})
    letters = list(read_dead_letters(tmp_path / "dead.ndjson"))
    assert [(d["stage"], d["messageId"]) for d in letters] == [("map", "r-1"), ("map", None)]
    assert letters[0]["event"] == no_user and letters[0]["rejected"][0]["path"] == "$.opaqueUserId"
    assert letters[0]["origin"].startswith("/webhook#") and letters[0]["line"] == 1


def test_duplicate_message_ids_are_dropped_at_ingest(serving, sandbox: Sandbox) -> None:
    with serving(dedupe_size=3) as server, httpx.Client(base_url=server.url) as client:
        first = client.post("/webhook", json=[view("d-1"), view("d-1"), view("d-2")]).json()
        again = client.post("/v1/batch", json={"batch": [view("d-2"), view("d-3")]}).json()
        client.post("/v1/batch", json={"batch": [view("d-4"), view("d-5")]})
        forgotten = client.post("/v1/track", json=view("d-1")).json()  # out of a 3-id window by now
        metrics = client.get("/metrics").text
    assert (first["duplicates"], again["duplicates"], forgotten["duplicates"]) == (1, 1, 0)
    assert 'segment_topsort_events_total{outcome="duplicate"} 2' in metrics
    assert arrived(sandbox) == Counter({f"d-{i}": 1 for i in range(1, 6)})
    assert sandbox.store.stats()["duplicates_ignored"] == 1  # the re-sent d-1, deduplicated by Topsort's id


def test_back_pressure_answers_503_and_drops_nothing(serving, sandbox: Sandbox) -> None:
    sandbox.set_faults(Faults(server_error=1.0))  # nothing is delivered: the spool fills
    policy = RetryPolicy(base=0.01, cap=0.05, max_elapsed=300)
    with serving(max_spooled=4, retry_after=7, policy=policy) as server, httpx.Client(base_url=server.url) as client:
        accepted = [view(f"p-{i}") for i in range(5)]
        assert client.post("/webhook", json=accepted).status_code == 200
        full = client.post("/webhook", json=view("p-5"))
        assert full.status_code == 503 and full.headers["Retry-After"] == "7"
        assert full.json()["error"] == "spool_full"
        sandbox.set_faults(Faults())
        _eventually(lambda: server.receiver.spooled == 0)
        assert client.post("/webhook", json=view("p-5")).status_code == 200  # the sender's retry
    assert arrived(sandbox) == Counter({f"p-{i}": 1 for i in range(6)})


def test_a_refused_api_key_stops_serving_and_keeps_the_events(serving, sandbox: Sandbox, tmp_path: Path) -> None:
    wrong = "not-the-sandbox-key"
    with serving(api_key=wrong) as server:
        assert httpx.post(server.url + "/webhook", json=view("k-1")).status_code == 200
        _eventually(lambda: server.receiver.failure is not None)
    assert isinstance(server.receiver.failure, AuthenticationError)
    assert wrong not in str(server.receiver.failure)
    with Spool(tmp_path / "serve.spool") as spool:
        assert spool.unsent == 1
    with serving() as server:  # the next start delivers it
        _eventually(lambda: server.receiver.spooled == 0)
    assert arrived(sandbox) == Counter({"k-1": 1})


def test_metrics_and_health(serving, sandbox: Sandbox) -> None:
    no_user = {k: v for k, v in view("m-2").items() if k != "anonymousId"}
    with serving() as server, httpx.Client(base_url=server.url) as client:
        client.post("/webhook", json=[view("m-1"), no_user])
        client.post("/webhook", content=b"nope")
        _eventually(lambda: "segment_topsort_delivery_latency_seconds_count 1" in client.get("/metrics").text)
        health = client.get("/healthz")
        text = client.get("/metrics")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    for sample in (
        'segment_topsort_requests_total{path="/webhook",status="200"} 1',
        'segment_topsort_requests_total{path="/webhook",status="400"} 1',
        'segment_topsort_events_total{outcome="emitted"} 1',
        'segment_topsort_events_total{outcome="rejected"} 1',
        'segment_topsort_topsort_events_total{rule="product-viewed",kind="impressions",outcome="emitted"} 1',
        'segment_topsort_topsort_events_total{rule="product-viewed",kind="impressions",outcome="rejected"} 1',
        'segment_topsort_topsort_events_total{rule="product-viewed",kind="impressions",outcome="delivered"} 1',
        "segment_topsort_delivery_latency_seconds_count 1",
        "segment_topsort_spool_events 0",
        "segment_topsort_delivery_requests_total 1",
        "segment_topsort_delivery_retries_total 0",
        "# TYPE segment_topsort_dead_letters_total counter",
    ):
        assert sample in text.text, sample


def test_reload_with_bad_rules_keeps_the_old_ones(serving, sandbox: Sandbox, tmp_path: Path) -> None:
    mine = tmp_path / "my-rules"
    mine.mkdir()
    with serving(rule_dirs=(ROOT / "rules", mine)) as server:
        receiver = server.receiver
        before = receiver.engine
        shutil.copy(ROOT / "tests/data/broken_rules/c_jmespath.yaml", mine / "broken.yaml")
        assert receiver.reload_rules() is False
        assert receiver.engine is before
        assert httpx.post(server.url + "/webhook", json=view("h-1")).status_code == 200
        (mine / "broken.yaml").unlink()
        (mine / "off.yaml").write_text("rules:\n  - {name: product-viewed, enabled: false}\n")
        assert receiver.reload_rules() is True
        assert receiver.engine is not before
        assert httpx.post(server.url + "/webhook", json=view("h-2")).status_code == 200
        metrics = receiver.metrics.render({})
    assert 'segment_topsort_rule_reloads_total{result="failed"} 1' in metrics
    assert 'segment_topsort_rule_reloads_total{result="ok"} 1' in metrics
    assert arrived(sandbox) == Counter({"h-1": 1})  # h-2 met the new rules, which skip it


def test_rules_reload_when_their_files_change(serving, sandbox: Sandbox, tmp_path: Path) -> None:
    mine = tmp_path / "my-rules"
    mine.mkdir()
    with serving(rule_dirs=(ROOT / "rules", mine), watch_rules=0.02) as server:
        receiver = server.receiver
        before = receiver.engine
        shutil.copy(ROOT / "tests/data/broken_rules/c_jmespath.yaml", mine / "broken.yaml")
        _eventually(lambda: 'rule_reloads_total{result="failed"}' in receiver.metrics.render({}))
        assert receiver.engine is before
        (mine / "broken.yaml").unlink()
        (mine / "off.yaml").write_text("rules:\n  - {name: product-viewed, enabled: false}\n")
        _eventually(lambda: not receiver.engine.rule("product-viewed").enabled)


def test_command_reloads_on_sighup_and_drains_on_sigterm(sandbox: Sandbox, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    env = {**os.environ, "TOPSORT_API_KEY": KEY, "SEGMENT_SHARED_SECRET": SECRET}
    command = [sys.executable, "-m", "engine", "serve", "--port", "0", "--endpoint", sandbox.url,
               "--rules", str(rules), "--spool", str(tmp_path / "s.spool"),
               "--dead-letters", str(tmp_path / "dead.ndjson"), "--max-latency", "0.02"]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    log: list[str] = []

    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 60
        while True:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                assert process.poll() is None, f"serve exited:\n{''.join(log)}"
                assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(log)}"
                continue
            log.append(line)
            if text in line:
                return line

    try:
        url = wait_for("receiving Segment events on").split(" on ")[1].split()[0]
        body = orjson.dumps([view("c-1")])
        assert httpx.post(url + "/webhook", content=body, headers={"X-Signature": sign(body)}).status_code == 200
        shutil.copy(ROOT / "tests/data/broken_rules/c_jmespath.yaml", rules / "broken.yaml")
        process.send_signal(signal.SIGHUP)
        wait_for("rules not reloaded")
        body = orjson.dumps(view("c-2"))
        assert httpx.post(url + "/webhook", content=body, headers={"X-Signature": sign(body)}).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert arrived(sandbox) == Counter({"c-1": 1, "c-2": 1})
    assert not any(KEY in line or SECRET in line for line in log)


def test_load_over_loopback_loses_nothing(serving, sandbox: Sandbox) -> None:
    threads, requests, per_request = 4, 50, 100  # 20 000 events
    latencies: list[float] = []
    failures: list[str] = []

    def client(number: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for r in range(requests):
                batch = [view(f"L{number}-{r}-{i}") for i in range(per_request)]
                started = time.perf_counter()
                answer = http.post("/v1/batch", content=orjson.dumps({"batch": batch}))
                latencies.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    failures.append(answer.text)

    with serving(max_spooled=1_000_000) as server:
        started = time.perf_counter()
        workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        elapsed = time.perf_counter() - started
    total = threads * requests * per_request
    latencies.sort()
    p50, p99 = (latencies[int(len(latencies) * q)] * 1e3 for q in (0.5, 0.99))
    print(f"\nserve load: {total} events in {threads * requests} requests of {per_request} from {threads} threads:"
          f" {total / elapsed:,.0f} events/s accepted; request latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert not failures and not any(worker.is_alive() for worker in workers)
    got = arrived(sandbox)
    assert len(got) == total and set(got.values()) == {1}
    assert sandbox.store.stats()["duplicates_ignored"] == 0


# -- Segment's own clients ------------------------------------------------------------------------


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_segment_python_library_delivers_every_mappable_event_once(serving, sandbox: Sandbox, gzip: bool) -> None:
    """segment-analytics-python (Segment's own library, batching to /v1/batch, gzip on and off)."""
    from segment.analytics import Client

    errors: list[Any] = []
    with serving(write_keys=frozenset({WRITE_KEY})) as server:
        client = Client(WRITE_KEY, host=server.url, gzip=gzip, on_error=lambda e, batch: errors.append(e),
                        upload_interval=0.05, max_retries=1)
        sent = []
        for i in range(60):
            sent.append(client.track(anonymous_id=f"anon-{i}", event="Product Viewed",
                                     properties={"product_id": f"sku-{i}", "resolvedBidId": f"bid-{i}"},
                                     context={"page": {"path": f"/p/{i}"}})[1])
        for i in range(10):  # no page type: rejected by the rules, as designed
            sent.append(client.page(anonymous_id=f"anon-{i}", name="Home")[1])
        for i in range(5):
            sent.append(client.page(anonymous_id=f"anon-{i}", properties={"page": {"type": "home", "pageId": "h"}})[1])
        sent.append(client.identify(user_id="u-1", traits={"plan": "pro"})[1])
        client.flush()
        client.shutdown()
        assert not errors
    expected = expected_ids(sent)
    assert len(expected) == 65
    assert arrived(sandbox) == expected  # each exactly once


def test_segment_python_library_logs_our_error_code_and_message(serving) -> None:
    """The library reads ``code`` and ``message`` of an error body (segment/analytics/request.py, ``post``)."""
    from segment.analytics import Client

    errors: list[Any] = []
    with serving(write_keys=frozenset({WRITE_KEY})) as server:
        client = Client("stolen", host=server.url, on_error=lambda e, batch: errors.append(e), max_retries=0)
        client.track(anonymous_id="a", event="Product Viewed", properties={"product_id": "p"})
        client.flush()
        client.shutdown()
    assert [(e.status, e.code) for e in errors] == [(401, "bad_write_key")]
    assert "write key is not one this receiver accepts" in errors[0].message


NEXT_VERSION, NODE_VERSION = "1.84.3", "3.1.0"
"""The npm packages whose requests the next test replays."""


def test_analytics_js_and_analytics_node_requests_as_their_packages_make_them(serving, sandbox: Sandbox,
                                                                               tmp_path: Path) -> None:
    """Replays the requests @segment/analytics-next 1.84.3 and @segment/analytics-node 3.1.0 make.

    Read from their built packages (``npm pack``):

    * analytics-next, ``dist/cjs/plugins/segmentio/index.js``: posts to ``${protocol}://${apiHost}/${type[0]}``
      (``apiHost`` defaults to ``api.segment.io/v1``: ``/v1/t``, ``/v1/p``, ...);
      ``batched-dispatcher.js``: ``${apiHost}/b`` with ``{writeKey, batch, sentAt}`` (``sentAt`` removed
      from each event); ``shared-dispatcher.js`` ``createHeaders``: ``Content-Type: text/plain``;
      ``fetch-dispatcher.js``: ``Authorization: Basic base64(writeKey + ':')`` and ``X-Retry-Count`` on
      retries; ``normalize.js``: ``writeKey``, ``sentAt`` and ``_metadata`` {bundled, unbundled,
      bundledIds} in each body; ``core/stats/remote-metrics.js``: its own telemetry to ``${apiHost}/m``.
      The Authorization header makes browsers send a CORS preflight first.
    * analytics-node, ``dist/cjs/plugins/segmentio/publisher.js``: ``POST {host}/v1/batch`` with
      ``Content-Type: application/json``, ``User-Agent: analytics-node-next/latest``, Basic auth,
      body ``{batch, writeKey, sentAt}``; ``index.js``: ``context.library`` and ``_metadata`` {nodeVersion,
      jsRuntime} on each event.
    """
    origin = "https://shop.example"
    auth = basic(WRITE_KEY)["Authorization"]
    now = "2026-11-27T10:00:00.000Z"

    def browser_event(message_id: str, **fields: Any) -> dict[str, Any]:
        return {
            "timestamp": now, "integrations": {}, "messageId": message_id, "anonymousId": "anon-b",
            "userId": None, "context": {"page": {"path": "/p/1", "url": "https://shop.example/p/1"},
                                        "userAgent": "Mozilla/5.0", "locale": "en-US",
                                        "library": {"name": "analytics.js", "version": f"npm:next-{NEXT_VERSION}"}},
            "writeKey": WRITE_KEY, "sentAt": now,
            "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []}, **fields,
        }

    browser = {"Content-Type": "text/plain", "Authorization": auth, "Origin": origin}
    track = browser_event("ajs-next-1", type="track", event="Product Viewed",
                          properties={"product_id": "sku-1", "resolvedBidId": "bid-1"})
    page = browser_event("ajs-next-2", type="page", properties={"page": {"type": "home", "pageId": "home"}})
    batched = [{k: v for k, v in browser_event(f"ajs-next-{i}", type="track", event="Product Viewed",
                                               properties={"product_id": f"sku-{i}"}).items() if k != "sentAt"}
               for i in (3, 4)]
    batched[1]["anonymousId"] = None  # no user at all: rejected, so its dead letter shows what was kept
    node_events = [{"type": "track", "event": "Product Viewed", "properties": {"product_id": "sku-5"},
                    "userId": "u-5", "messageId": "node-next-5", "timestamp": now, "integrations": {},
                    "context": {"library": {"name": "@segment/analytics-node", "version": NODE_VERSION}},
                    "_metadata": {"nodeVersion": "v22.0.0", "jsRuntime": "node"}}]
    with serving(write_keys=frozenset({WRITE_KEY}), cors_origins=frozenset({origin})) as server, \
            httpx.Client(base_url=server.url) as client:
        preflight = client.options("/v1/t", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-retry-count"})
        stranger = client.options("/v1/t", headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "POST"})
        answers = [
            client.post("/v1/t", content=orjson.dumps(track), headers=browser),
            client.post("/v1/p", content=orjson.dumps(page), headers={**browser, "X-Retry-Count": "1"}),
            client.post("/v1/b", content=orjson.dumps({"writeKey": WRITE_KEY, "batch": batched, "sentAt": now}),
                        headers=browser),
            client.post("/v1/batch", content=orjson.dumps({"batch": node_events, "writeKey": WRITE_KEY, "sentAt": now}),
                        headers={"Content-Type": "application/json", "User-Agent": "analytics-node-next/latest",
                                 "Authorization": auth}),
        ]
        telemetry = client.post("/v1/m", content=b'{"series":[]}', headers={"Content-Type": "text/plain"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert {"authorization", "content-type", "x-retry-count"} <= {
        h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert stranger.status_code == 403 and "Access-Control-Allow-Origin" not in stranger.headers
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert all(a.headers["Access-Control-Allow-Origin"] == origin for a in answers[:3])
    assert telemetry.status_code == 204
    assert arrived(sandbox) == Counter({"ajs-next-1": 1, "ajs-next-2": 1, "ajs-next-3": 1, "node-next-5": 1})
    letters = list(read_dead_letters(tmp_path / "dead.ndjson"))
    assert [d["messageId"] for d in letters] == ["ajs-next-4"] and "writeKey" not in letters[0]["event"]
    assert WRITE_KEY not in (tmp_path / "dead.ndjson").read_text()
    assert WRITE_KEY.encode() not in (tmp_path / "serve.spool").read_bytes()


def test_cross_origin_calls_are_closed_by_default(serving) -> None:
    with serving() as server, httpx.Client(base_url=server.url) as client:
        preflight = client.options("/v1/t", headers={"Origin": "https://shop.example",
                                                     "Access-Control-Request-Method": "POST"})
        post = client.post("/v1/t", json=view("o-1"), headers={"Origin": "https://shop.example"})
    assert preflight.status_code == 403 and "Access-Control-Allow-Origin" not in preflight.headers
    assert post.status_code == 200 and "Access-Control-Allow-Origin" not in post.headers  # the browser hides it


# -- Segment's Tracking API semantics --------------------------------------------------------------


def test_batch_context_and_integrations_are_merged_into_each_message(serving, tmp_path: Path) -> None:
    no_user = {k: v for k, v in view("x-1").items() if k not in ("anonymousId", "context")}
    own = {**no_user, "messageId": "x-2", "context": {"page": {"path": "/own"}, "ip": "10.0.0.2"},
           "integrations": {"All": False}}
    batch = {"batch": [no_user, own], "context": {"page": {"path": "/batch"}, "ip": "10.0.0.1", "locale": "fr"},
             "integrations": {"All": True, "Topsort": True}}
    with serving() as server:
        assert httpx.post(server.url + "/v1/batch", json=batch).status_code == 200
    first, second = (d["event"] for d in read_dead_letters(tmp_path / "dead.ndjson"))  # rejected: no user
    assert first["context"] == {"page": {"path": "/batch"}, "ip": "10.0.0.1", "locale": "fr"}
    assert first["integrations"] == {"All": True, "Topsort": True}
    assert second["context"] == {"page": {"path": "/own"}, "ip": "10.0.0.2", "locale": "fr"}  # its keys win
    assert second["integrations"] == {"All": False, "Topsort": True}


def test_clock_skew_is_corrected_and_the_client_time_kept(serving, sandbox: Sandbox, tmp_path: Path) -> None:
    """A client clock an hour ahead: the event happened 2 s before it was sent, so 2 s before arrival."""
    from datetime import UTC, datetime, timedelta

    client_now = datetime.now(UTC) + timedelta(hours=1)
    happened = (client_now - timedelta(seconds=2)).isoformat()
    event = {**view("k-1", timestamp=happened)}
    rejected = {k: v for k, v in view("k-2", timestamp=happened).items() if k != "anonymousId"}
    with serving() as server:
        before = datetime.now(UTC)
        answer = httpx.post(server.url + "/v1/batch", json={"batch": [event, rejected], "sentAt": client_now.isoformat()})
        after = datetime.now(UTC)
    assert answer.status_code == 200
    occurred = datetime.fromisoformat(sandbox.store.all()["impressions"][0]["occurredAt"])
    assert before - timedelta(seconds=2.1) <= occurred <= after - timedelta(seconds=1.9)
    letter = next(read_dead_letters(tmp_path / "dead.ndjson"))["event"]
    assert letter["originalTimestamp"] == happened
    received = datetime.fromisoformat(letter["receivedAt"])
    assert before - timedelta(seconds=0.01) <= received <= after
    assert datetime.fromisoformat(letter["timestamp"]) == received - timedelta(seconds=2)


def test_generated_message_ids_deduplicate_a_retried_body(serving, sandbox: Sandbox) -> None:
    events = [{k: v for k, v in view(f"g-{i}").items() if k != "messageId"} for i in range(3)]
    body = orjson.dumps({"batch": events, "sentAt": "2026-11-27T10:00:01Z"})
    retried = orjson.dumps({"batch": events, "sentAt": "2026-11-27T10:00:09Z"})  # a later attempt
    with serving() as server, httpx.Client(base_url=server.url) as client:
        first = client.post("/v1/batch", content=body).json()
        again = client.post("/v1/batch", content=retried).json()
    assert (first["accepted"], again["accepted"], again["duplicates"]) == (3, 0, 3)
    got = arrived(sandbox)
    assert len(got) == 3 and set(got.values()) == {1}
    assert all(i.startswith("serve-") for i in got)


def test_spool_limit_holds_under_concurrent_batches(serving, sandbox: Sandbox) -> None:
    sandbox.set_faults(Faults(server_error=1.0))  # nothing leaves the spool
    limit, per_batch = 50, 10
    policy = RetryPolicy(base=0.01, cap=0.05, max_elapsed=300)
    barrier = threading.Barrier(20)
    answers: list[int] = []

    def send(number: int) -> None:
        body = orjson.dumps({"batch": [view(f"c{number}-{i}") for i in range(per_batch)]})
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            answers.append(client.post("/v1/batch", content=body).status_code)

    with serving(max_spooled=limit, policy=policy) as server:
        threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        spooled = server.receiver.spooled
        sandbox.set_faults(Faults())
    assert sorted(set(answers)) == [200, 503]
    assert spooled == answers.count(200) * per_batch <= limit + per_batch


def test_dedupe_window_survives_a_restart(serving, sandbox: Sandbox) -> None:
    with serving() as server:
        assert httpx.post(server.url + "/v1/batch", json={"batch": [view("r-1"), view("r-2")]}).status_code == 200
    with serving() as server:
        again = httpx.post(server.url + "/webhook", json=[view("r-2"), view("r-3")]).json()
    assert again["duplicates"] == 1
    assert arrived(sandbox) == Counter({"r-1": 1, "r-2": 1, "r-3": 1})
    assert sandbox.store.stats()["duplicates_ignored"] == 0  # the repeat never left serve


def test_the_stored_window_keeps_the_latest_ids(tmp_path: Path) -> None:
    from engine.delivery.spool import Chunk

    with Spool(tmp_path / "s.spool") as spool:
        spool.commit(Chunk(seen=[("old", 100.0), ("a", 200.0), ("b", 300.0), ("c", 400.0)]))
        spool.forget_messages(before=150.0, keep=2)
        assert spool.seen_messages() == [("b", 300.0), ("c", 400.0)]


# -- compressed bodies -----------------------------------------------------------------------------


def _gzip_stream(pieces: Iterator[bytes]) -> bytes:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(packer.compress(piece) for piece in pieces) + packer.flush()


def test_gzip_and_deflate_bodies_are_accepted(serving, sandbox: Sandbox) -> None:
    import gzip
    import zlib

    with serving() as server, httpx.Client(base_url=server.url) as client:
        answers = [
            client.post("/v1/batch", content=gzip.compress(orjson.dumps({"batch": [view("z-1")]})),
                        headers={"Content-Encoding": "gzip"}),
            client.post("/webhook", content=zlib.compress(orjson.dumps(view("z-2"))),
                        headers={"Content-Encoding": "deflate"}),
            client.post("/v1/track", content=zlib.compress(orjson.dumps(view("z-3")))[2:-4],  # raw deflate
                        headers={"Content-Encoding": "deflate"}),
            client.post("/v1/track", content=gzip.compress(orjson.dumps(view("z-4", pad="y" * 40_000))),
                        headers={"Content-Encoding": "gzip"}),
            client.post("/v1/track", content=gzip.compress(orjson.dumps(view("z-5")))[:-6],
                        headers={"Content-Encoding": "gzip"}),
            client.post("/webhook", content=gzip.compress(b'[{"type": "identify"},') + gzip.compress(
                orjson.dumps(view("z-6")) + b"]"), headers={"Content-Encoding": "gzip"}),  # two gzip members
        ]
    status = [(a.status_code, a.json().get("error")) for a in answers]
    assert status == [(200, None), (200, None), (200, None), (413, "event_too_large"), (400, "bad_encoding"),
                      (200, None)]
    assert arrived(sandbox) == Counter({"z-1": 1, "z-2": 1, "z-3": 1, "z-6": 1})


def test_a_gzip_bomb_is_refused_without_its_expansion(serving) -> None:
    """200 MiB of zeros in ~200 KB of gzip: refused with 413 once 500 KB came out, memory flat."""
    import tracemalloc

    bomb = _gzip_stream(bytes(1 << 20) for _ in range(200))
    assert len(bomb) < 500 * 1024
    with serving() as server, httpx.Client(base_url=server.url) as client:
        tracemalloc.start()
        try:
            answer = client.post("/v1/batch", content=bomb, headers={"Content-Encoding": "gzip"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (answer.status_code, answer.json()["error"]) == (413, "request_too_large")
    assert "once decompressed" in answer.json()["reason"]
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while refusing a 200 MiB expansion"


# -- faults: serve outlives them (issue 11) --------------------------------------------------------


def _deep(levels: int) -> bytes:
    """A Product Viewed event with a property nested ``levels`` deep, as JSON (orjson cannot write it)."""
    event = orjson.dumps(view("q-2", properties={"product_id": "p", "resolvedBidId": "b", "deep": "HERE"}))
    return event.replace(b'"HERE"', b'{"a":' * levels + b"{}" + b"}" * levels)


def test_poison_events_never_stop_serve(serving, sandbox: Sandbox, tmp_path: Path, caplog) -> None:
    """Issue 11 case 1: a quantity of 1e20 or an event nested 300 deep, unauthenticated, stopped serve."""
    order = {"type": "track", "event": "Order Completed", "messageId": "q-1", "anonymousId": "a",
             "timestamp": "2026-11-27T10:00:00Z",
             "properties": {"order_id": "o-1", "products": [{"product_id": "p", "price": 1, "quantity": 1e20}]}}
    with serving() as server, httpx.Client(base_url=server.url) as client:
        poisoned = [client.post("/v1/track", json=order), client.post("/webhook", content=_deep(300))]
        for _ in range(3):  # as Segment retries
            poisoned.append(client.post("/v1/track", json=order))
        after = client.post("/v1/batch", json={"batch": [view("q-3")]})
        health = client.get("/healthz")
        assert server.receiver.failure is None and server._thread is not None and server._thread.is_alive()
    assert after.status_code == 200 and health.status_code == 200
    # the order is taken (its retries as duplicates) and its item dead-lettered with the bound it passed;
    # the deep event is refused whole, before it is decoded
    assert [answer.status_code for answer in poisoned] == [200, 400, 200, 200, 200], [a.text for a in poisoned]
    assert poisoned[1].json()["error"] == "too_deep"
    letters = {d["messageId"]: d for d in read_dead_letters(tmp_path / "dead.ndjson")}
    assert set(letters) == {"q-1"}
    assert "9223372036854775807" in letters["q-1"]["rejected"][0]["reason"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert arrived(sandbox)["q-3"] == 1


class _FullDisk:
    """Makes the spool's commit fail as SQLite does on a full disk, while ``on``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str = "commit") -> None:
        import sqlite3

        self.on = True
        self.calls = 0
        real = getattr(Spool, method)

        def failing(spool: Spool, *args: Any) -> Any:
            if self.on:
                self.calls += 1
                raise sqlite3.OperationalError("database or disk is full")
            return real(spool, *args)

        monkeypatch.setattr(Spool, method, failing)


def test_a_batch_refused_by_the_spool_is_taken_on_retry(serving, sandbox: Sandbox, monkeypatch) -> None:
    """Issue 11 case 2: ids were claimed before the events were spooled, so the retry was 'duplicates'."""
    body = orjson.dumps({"batch": [view("f-1"), view("f-2")]})
    with serving() as server, httpx.Client(base_url=server.url) as client:
        disk = _FullDisk(monkeypatch)
        failed = client.post("/v1/batch", content=body)
        disk.on = False
        retried = client.post("/v1/batch", content=body)
    assert failed.status_code == 503 and disk.calls == 1
    assert retried.json() == {"success": True, "accepted": 2, "duplicates": 0}
    assert arrived(sandbox) == Counter({"f-1": 1, "f-2": 1})


def test_a_full_disk_is_answered_503_logged_once_and_recovered_from(serving, sandbox: Sandbox, monkeypatch,
                                                                   caplog) -> None:
    """Issue 11 case 9: serve answered 503 for a while, then exited."""
    with serving(retry_after=3) as server, httpx.Client(base_url=server.url) as client:
        disk = _FullDisk(monkeypatch)
        refused = [client.post("/webhook", json=view(f"d-{i}")) for i in range(5)]
        health = client.get("/healthz")
        disk.on = False
        taken = client.post("/webhook", json=view("d-0"))
        healthy = client.get("/healthz")
        metrics = client.get("/metrics").text
    assert {(a.status_code, a.headers.get("Retry-After"), a.json()["error"]) for a in refused} == {(503, "3", "unavailable")}
    assert health.status_code == 503 and "disk is full" in health.json()["reason"]
    assert taken.status_code == 200 and healthy.status_code == 200
    assert 'segment_topsort_spool_errors_total{error="OperationalError"} 5' in metrics
    assert len([r for r in caplog.records if "disk is full" in r.getMessage() and r.levelname == "ERROR"]) == 1
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("segment_topsort"))
    assert arrived(sandbox) == Counter({"d-0": 1})


def test_delivery_reopens_the_spool_after_a_fault_and_delivers(serving, sandbox: Sandbox, monkeypatch) -> None:
    """A fault while settling deliveries closes the spool; serve opens it again and goes on."""
    with serving() as server, httpx.Client(base_url=server.url) as client:
        disk = _FullDisk(monkeypatch, "settle")
        assert client.post("/webhook", json=view("e-1")).status_code == 200
        _eventually(lambda: disk.calls > 0)
        disk.on = False
        _eventually(lambda: client.post("/webhook", json=view("e-2")).status_code == 200)
        _eventually(lambda: server.receiver.spooled == 0)
        assert server.receiver.failure is None
    got = arrived(sandbox)
    assert set(got) == {"e-1", "e-2"}


def test_a_reload_that_fails_to_load_is_logged_counted_and_survived(serving, sandbox: Sandbox,
                                                                    tmp_path: Path, caplog) -> None:
    """Issue 11 case 8: a 1 000-term || chain made the reload thread die without a word."""
    mine = tmp_path / "my-rules"
    mine.mkdir()
    chain = " || ".join(f"properties.a{i}" for i in range(1000))
    with serving(rule_dirs=(ROOT / "rules", mine)) as server:
        before = server.receiver.engine
        (mine / "deep.yaml").write_text(
            "rules:\n  - name: deep\n    when: {type: track, event: Deep}\n    emit: clicks\n    fields:\n"
            f'      id: messageId\n      opaqueUserId: "{chain}"\n      occurredAt: {{from: timestamp, as: datetime}}\n')
        assert server.receiver.reload_rules() is False
        assert server.receiver.engine is before
        assert httpx.post(server.url + "/webhook", json=view("l-1")).status_code == 200
        metrics = server.receiver.metrics.render({})
    assert 'segment_topsort_rule_reloads_total{result="failed"} 1' in metrics
    assert any("rules not reloaded" in r.getMessage() for r in caplog.records)
    assert arrived(sandbox) == Counter({"l-1": 1})


# -- refusals --------------------------------------------------------------------------------------


def test_credentials_are_checked_before_size_and_json(serving) -> None:
    big = orjson.dumps({"batch": [view(f"a-{i}", pad="y" * 20_000) for i in range(30)]})
    with serving(write_keys=frozenset({WRITE_KEY}), shared_secret=SECRET) as server, \
            httpx.Client(base_url=server.url) as client:
        answers = {
            "big, no key": client.post("/v1/batch", content=big),
            "big, wrong key": client.post("/v1/batch", content=big, headers=basic("stolen")),
            "malformed, no key": client.post("/v1/track", content=b"{nope"),
            "gzip bomb, no key": client.post("/v1/batch", content=_gzip_stream(bytes(1 << 20) for _ in range(5)),
                                             headers={"Content-Encoding": "gzip"}),
            "big webhook, no signature": client.post("/webhook", content=big),
            "big webhook, bad signature": client.post("/webhook", content=big, headers={"X-Signature": "00"}),
            "big, right key": client.post("/v1/batch", content=big, headers=basic(WRITE_KEY)),
        }
    status = {name: answer.status_code for name, answer in answers.items()}
    assert status == {name: 413 if "right key" in name else 401 for name in answers}


def test_bodies_that_are_not_events_are_refused_400(serving, sandbox: Sandbox) -> None:
    with serving() as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post(path, content=body) for path in ("/webhook", "/v1/track")
                   for body in (b'"hello"', b"null", b'[1,"a"]', b"3")]
        answers.append(client.post("/v1/batch", json={"batch": [1, "a"]}))
        empty = client.post("/webhook", json=[])
    assert {(a.status_code, a.json()["error"]) for a in answers} == {(400, "not_an_event")}
    assert empty.json() == {"success": True, "accepted": 0, "duplicates": 0}
    assert not arrived(sandbox)


def test_refusals_are_logged_one_line_each_without_secrets_and_rate_limited(serving, caplog) -> None:
    with serving(write_keys=frozenset({WRITE_KEY})) as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/v1/batch", json={"batch": [view("n-1")]}, headers=basic("stolen-key"))
        for _ in range(100):
            client.post("/v1/batch", content=b"{}", headers=basic("stolen-key"))
        time.sleep(0.6)
        client.post("/v1/track", content=b"{}", headers=basic("stolen-key"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert lines[0] == ("refused 401 bad_write_key: POST /v1/batch from 127.0.0.1:"
                        " the write key is not one this receiver accepts")
    assert answer.json()["code"] == "bad_write_key" and answer.json()["message"] == answer.json()["reason"]
    assert 15 <= len(lines) <= 25 and "more refusals not logged" in lines[-1]
    assert not any("stolen-key" in r.getMessage() or WRITE_KEY in r.getMessage() for r in caplog.records)


def _raw_request(url: str, head: bytes, body: bytes) -> Any:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(head + body)
    return sock


def test_slow_clients_are_cut_off(serving) -> None:
    with serving(read_timeout=0.3) as server:
        sock = _raw_request(server.url, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b"[")
        started = time.monotonic()
        answer = b""
        while b"request_timeout" not in answer and (part := sock.recv(4096)):
            answer += part
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert time.monotonic() - started < 5
    with serving(read_timeout=0.4) as server:  # headers that never end
        sock = _raw_request(server.url, b"POST /webhook HTTP/1.1\r\nHost: x\r\n", b"")
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed
        waited = time.monotonic() - started
        sock.close()
        assert httpx.get(server.url + "/healthz").status_code == 200
    assert 0.3 < waited < 5


def test_a_client_that_goes_away_logs_no_traceback(serving, sandbox: Sandbox, caplog) -> None:
    with serving() as server:
        sock = _raw_request(server.url, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", b"[{")
        sock.close()
        time.sleep(0.2)
        assert httpx.post(server.url + "/webhook", json=view("v-1")).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert arrived(sandbox) == Counter({"v-1": 1})


def test_a_body_nested_deeper_than_any_input_may_be_is_refused_400(serving, sandbox: Sandbox) -> None:
    deep = {"type": "track", "event": "Order Completed", "messageId": "deep-1", "anonymousId": "a",
            "timestamp": "2026-11-27T10:00:00Z", "context": {"page": {}}, "properties": {}}
    url: Any = 1
    for _ in range(MAX_DEPTH):
        url = [url]
    deep["context"]["page"]["url"] = url
    with serving() as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post("/webhook", json=deep), client.post("/v1/batch", json={"batch": [deep]})]
        fine = client.post("/webhook", json={**deep, "context": {}, "messageId": "shallow-1"})
    assert [(a.status_code, a.json()["error"]) for a in answers] == [(400, "too_deep")] * 2
    assert str(MAX_DEPTH) in answers[0].json()["reason"]
    assert fine.status_code == 200
