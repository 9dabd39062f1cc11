"""The Topsort sandbox, exercised over real HTTP on 127.0.0.1 with httpx."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner

from engine.cli.sandbox import sandbox_command
from engine.sandbox.server import Faults, Sandbox

KEY = "sk_test_sandbox-secret-0123456789"


def _impression(event_id: str, **fields: Any) -> dict[str, Any]:
    """A valid impression (or click): sponsored, unless ``fields`` say otherwise."""
    return {"id": event_id, "occurredAt": "2026-11-27T10:00:00Z", "opaqueUserId": "user-1",
            "resolvedBidId": f"bid-{event_id}", **fields}


def _unattributed(event_id: str) -> dict[str, Any]:
    """An impression or click with neither resolvedBidId nor entity: it attributes to nothing."""
    return {key: value for key, value in _impression(event_id).items() if key != "resolvedBidId"}


def _purchase(event_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": event_id, "occurredAt": "2026-11-27T10:00:00Z", "opaqueUserId": "user-1", "items": items}


@pytest.fixture(scope="module")
def _client(sandbox_server: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox_server.url, timeout=5) as client:
        yield client


@pytest.fixture
def client(sandbox: Sandbox, _client: httpx.Client) -> httpx.Client:
    return _client


def _post(client: httpx.Client, body: Any, key: str | None = KEY, **kwargs: Any) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post("/v2/events", content=content, headers=headers, **kwargs)


def _ids(sandbox: Sandbox, kind: str) -> list[str]:
    return [event["id"] for event in sandbox.store.events(kind)]


def _stored_count(sandbox: Sandbox) -> int:
    return sum(len(events) for events in sandbox.store.all().values())


def test_accepts_stores_and_deduplicates_by_kind_and_id(sandbox: Sandbox, client: httpx.Client) -> None:
    first = {
        "impressions": [_impression("i1"), _impression("i2", placement={"path": "/search", "position": 1})],
        "purchases": [_purchase("p1", [{"productId": "sku-1", "unitPrice": 9.5, "quantity": 2}])],
    }
    assert _post(client, first).status_code == 204
    again = {"impressions": [_impression("i2"), _impression("i3")], "clicks": [_impression("i1")]}
    assert _post(client, again).status_code == 204

    assert _ids(sandbox, "impressions") == ["i1", "i2", "i3"]
    assert _ids(sandbox, "clicks") == ["i1"]  # the same id in another kind is another event
    assert sandbox.store.events("impressions")[1]["placement"] == {"path": "/search", "position": 1}
    served = client.get("/_sandbox/events").json()
    assert [e["id"] for e in served["purchases"]] == ["p1"] and served["pageviews"] == []
    stats = client.get("/_sandbox/stats").json()
    assert stats["events_accepted"] == 5
    assert stats["duplicates_ignored"] == 1
    assert stats["requests"] == {"204": 2}


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x"], ids=["missing", "bad", "longer"])
def test_refuses_missing_or_bad_key_without_revealing_it(
    sandbox: Sandbox, client: httpx.Client, key: str | None
) -> None:
    response = _post(client, {"impressions": [_impression("i1")]}, key=key)
    assert response.status_code == 401
    assert response.json()["errCode"] == "invalid_api_key"
    assert set(response.json()) == {"errCode", "message", "docUrl"}
    assert KEY not in response.text
    assert _stored_count(sandbox) == 0


@pytest.mark.parametrize(
    ("body", "err_code", "where"),
    [
        (b'{"impressions": [', "bad_request", "malformed JSON"),
        ({}, "empty_request", "no events"),
        ({"impressions": [], "clicks": []}, "empty_request", "no events"),
        ({"impressions": [_impression(f"i{n}") for n in range(51)]}, "bad_request", "$.impressions: "),
        (
            {"impressions": [_impression("i1", placement={"position": 2})]},
            "missing_placement",
            "$.impressions[0].placement",
        ),
        ({"purchases": [_purchase("p1", [{"unitPrice": 1}])]}, "missing_product_id", "$.purchases[0].items[0]"),
        ({"purchases": [_purchase("p1", [])]}, "no_purchase_items", "$.purchases[0].items"),
        (
            {"purchases": [_purchase("p1", [{"productId": "a", "unitPrice": 1, "quantity": 0}])]},
            "purchase_item_quantity_less_or_equal_than_zero",
            "$.purchases[0].items[0].quantity",
        ),
        ({"impressions": [_impression("i1", occurredAt="yesterday")]}, "bad_request", "$.impressions[0].occurredAt"),
        ({"impressions": [_impression("i1")], "views": []}, "bad_request", "$: "),
        (
            {"impressions": [_impression("i1"), _impression("i2", entity={"type": "product", "id": "p-2"})],
             "clicks": [_unattributed("c1")]},
            "bad_request",
            "$.clicks[0]: needs resolvedBidId (sponsored) or entity (organic)",
        ),
    ],
    ids=[
        "malformed-json",
        "empty-object",
        "empty-arrays",
        "51-items",
        "missing-placement-path",
        "missing-product-id",
        "empty-items",
        "zero-quantity",
        "bad-date-time",
        "unknown-array",
        "neither-bid-nor-entity",
    ],
)
def test_refuses_invalid_requests_with_topsort_error_codes(
    sandbox: Sandbox, client: httpx.Client, body: Any, err_code: str, where: str
) -> None:
    response = _post(client, body)
    assert response.status_code == 400
    error = response.json()
    assert error["errCode"] == err_code
    assert where in error["message"]
    assert error["docUrl"]
    assert _stored_count(sandbox) == 0
    assert client.get("/_sandbox/stats").json()["errors"] == {err_code: 1}


def test_one_bad_event_refuses_the_whole_request(sandbox: Sandbox, client: httpx.Client) -> None:
    body = {
        "impressions": [_impression("ok-1"), _impression("ok-2")],
        "purchases": [_purchase("p1", [{"productId": "a", "unitPrice": 1}]), _purchase("p2", [])],
    }
    assert _post(client, body).json()["errCode"] == "no_purchase_items"
    assert _stored_count(sandbox) == 0


def test_poisoned_bid_refuses_the_request_and_names_no_event(sandbox: Sandbox, client: httpx.Client) -> None:
    body = {
        "impressions": [_impression("ok-1", resolvedBidId="bid-1")],
        "clicks": [_impression("bad-1", resolvedBidId="poison-42")],
    }
    response = _post(client, body)
    assert response.status_code == 400
    assert response.json()["errCode"] == "resolved_bid_id_not_found"
    assert "bad-1" not in response.text and "poison-42" not in response.text
    assert _stored_count(sandbox) == 0


def test_trailing_slash_is_not_found(sandbox: Sandbox, client: httpx.Client) -> None:
    body = orjson.dumps({"impressions": [_impression("i1")]})
    response = client.post("/v2/events/", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404
    assert _stored_count(sandbox) == 0


def test_rate_limit_fault_answers_429_with_retry_after(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(rate_limit=1.0, retry_after=7))
    response = _post(client, {"impressions": [_impression("i1")]})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert _stored_count(sandbox) == 0


def test_server_error_fault_answers_500(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(server_error=1.0))
    assert _post(client, {"impressions": [_impression("i1")]}).status_code == 500
    assert _stored_count(sandbox) == 0


def test_latency_delays_a_successful_answer(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(latency=0.2))
    started = time.monotonic()
    assert _post(client, {"impressions": [_impression("i1")]}).status_code == 204
    assert time.monotonic() - started >= 0.2
    assert _ids(sandbox, "impressions") == ["i1"]


def test_slow_fault_makes_the_client_time_out_and_stores_nothing(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(slow=1.0, slow_seconds=10))
    with pytest.raises(httpx.ReadTimeout):
        _post(client, {"impressions": [_impression("i1")]}, timeout=0.3)
    deadline = time.monotonic() + 2
    while sandbox.store.stats()["requests"].get("abandoned") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sandbox.store.stats()["requests"] == {"abandoned": 1}
    assert _stored_count(sandbox) == 0


def test_drop_fault_closes_the_connection_without_an_answer(
    sandbox: Sandbox, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox.set_faults(Faults(drop=1.0))
    with pytest.raises(httpx.TransportError) as raised:
        _post(client, {"impressions": [_impression("i1")]})
    assert not isinstance(raised.value, httpx.TimeoutException)
    assert _stored_count(sandbox) == 0

    sandbox.set_faults(Faults())  # the same client carries on over a new connection
    assert _post(client, {"impressions": [_impression("i1")]}).status_code == 204
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # uvicorn saw nothing wrong
    assert KEY not in caplog.text


def test_faults_are_repeatable_for_a_seed(sandbox: Sandbox, client: httpx.Client) -> None:
    def statuses() -> list[int]:
        return [_post(client, {"impressions": [_impression(f"i{n}")]}).status_code for n in range(20)]

    assert client.post("/_sandbox/faults", json={"rate_limit": 0.3, "server_error": 0.2, "seed": 11}).status_code == 200
    first = statuses()
    client.post("/_sandbox/faults", json={"rate_limit": 0.3, "server_error": 0.2, "seed": 11})
    assert statuses() == first
    assert {204, 429, 500} <= set(first)


def test_faults_endpoint_rejects_bad_settings(sandbox: Sandbox, client: httpx.Client) -> None:
    for bad in ({"drop": 2}, {"rate_limit": "often"}, {"explode": 1}, {"drop": 0.6, "server_error": 0.6}):
        response = client.post("/_sandbox/faults", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["errCode"] == "bad_request"
    assert client.get("/_sandbox/faults").json() == {
        "rate_limit": 0.0, "retry_after": 1, "server_error": 0.0, "drop": 0.0,
        "latency": 0.0, "slow": 0.0, "slow_seconds": 30.0,
    }  # fmt: skip


def test_stats_count_requests_events_duplicates_and_faults(sandbox: Sandbox, client: httpx.Client) -> None:
    _post(client, {"impressions": [_impression("i1"), _impression("i2")]})
    pageview = {"id": "v1", "occurredAt": "2026-11-27T10:00:00Z", "opaqueUserId": "user-1",
                "page": {"type": "home", "pageId": "/"}}
    _post(client, {"impressions": [_impression("i2")], "pageviews": [pageview]})
    _post(client, {}, key="nope")
    _post(client, {})
    sandbox.set_faults(Faults(rate_limit=1.0))
    _post(client, {"impressions": [_impression("i9")]})
    sandbox.set_faults(Faults(drop=1.0))
    with pytest.raises(httpx.TransportError):
        _post(client, {"impressions": [_impression("i9")]})

    assert client.get("/_sandbox/stats").json() == {
        "requests": {"204": 2, "401": 1, "400": 1, "429": 1, "dropped": 1},
        "errors": {"invalid_api_key": 1, "empty_request": 1, "too_many_requests": 1},
        "events_accepted": 3,
        "duplicates_ignored": 1,
        "faults": {"rate_limit": 1, "drop": 1},
    }
    assert client.post("/_sandbox/reset").status_code == 204
    assert sandbox.store.stats()["events_accepted"] == 0 and _stored_count(sandbox) == 0


def test_store_file_appends_accepted_events_as_ndjson(tmp_path: Path) -> None:
    log = tmp_path / "events.ndjson"
    with Sandbox(api_key=KEY, store_file=log) as sandbox, httpx.Client(base_url=sandbox.url) as client:
        _post(client, {"impressions": [_impression("i1"), _impression("i1")], "clicks": [_impression("c1")]})
        _post(client, {"impressions": [_impression("i1")]})
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert lines == [
        {"kind": "impressions", "event": _impression("i1")},
        {"kind": "clicks", "event": _impression("c1")},
    ]


def test_cli_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOPSORT_API_KEY", raising=False)
    result = CliRunner().invoke(sandbox_command, ["--port", "0"])
    assert result.exit_code == 2
    assert "TOPSORT_API_KEY" in result.output


def test_the_command_serves_until_terminated(tmp_path: Path) -> None:
    env = {**os.environ, "TOPSORT_API_KEY": "k-cli"}
    command = [sys.executable, "-m", "engine", "sandbox", "--port", "0", "--store", str(tmp_path / "kept.ndjson")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith("Topsort sandbox on http://127.0.0.1:"), first + process.stderr.read()
        url = first.split(" on ")[1].split(": POST")[0]
        answer = httpx.post(f"{url}/v2/events", json={"impressions": [_impression("cli-1")]},
                            headers={"Authorization": "Bearer k-cli"})
        assert answer.status_code == 204, answer.text
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert orjson.loads((tmp_path / "kept.ndjson").read_bytes().splitlines()[0])["event"]["id"] == "cli-1"
