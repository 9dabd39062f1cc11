"""``segment-topsort serve``, over 127.0.0.1, delivering into a sandbox.

Every check of what arrived is made after the server has stopped: stopping drains the spool, so
nothing here waits on a clock except the bounded polls of ``_eventually``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
from engine.dead_letters import read_dead_letters
from engine.dispatch import AuthenticationError
from engine.retry import RetryPolicy
from engine.sandbox import Faults, Sandbox
from engine.serve import MAX_REQUEST_EVENTS, Server, ServeSettings
from engine.spool import Spool

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
