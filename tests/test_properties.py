"""Property-based: whatever JSON arrives, the engine never raises and gives exactly one outcome,
and whatever it emits is valid Topsort."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, Outcome

from .conftest import CheckedEngine

ENGINE = CheckedEngine(Engine.from_folders())

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
EVENTS = ["Product Viewed", "Product Clicked", "Order Completed", "Product List Viewed", "Banner Impression",
          "Banner Click", "Product Added"]


def _event_like(draw: Any) -> dict[str, Any]:
    """Segment-shaped events whose every value may be of the wrong type."""
    anything = json_values
    return draw(st.fixed_dictionaries(
        {"type": st.sampled_from(["track", "page", "screen", "identify"]) | anything},
        optional={
            "event": st.sampled_from(EVENTS) | anything,
            "messageId": st.text(max_size=20) | anything,
            "timestamp": st.sampled_from(["2026-11-27T10:00:00Z", "2026-11-27 10:00", "1764237600000"]) | anything,
            "anonymousId": st.text(max_size=10) | anything,
            "userId": anything,
            "position": anything,
            "context": st.fixed_dictionaries({}, optional={
                "page": st.fixed_dictionaries({}, optional={"path": anything, "title": anything}) | anything,
                "device": st.fixed_dictionaries({}, optional={"type": st.sampled_from(["ios", "tv"]) | anything}),
            }) | anything,
            "properties": st.fixed_dictionaries({}, optional={
                "products": st.lists(st.fixed_dictionaries({}, optional={
                    "product_id": anything, "price": anything, "quantity": anything, "resolvedBidId": anything,
                    "brand": anything, "vendorId": anything, "additionalAttribution": anything}) | anything,
                    max_size=4) | anything,
                "resolvedBidId": anything, "placement": anything, "page": anything, "entity": anything,
                "object": anything, "dspMetadata": anything, "channel": anything, "position": anything,
            }) | anything,
        },
    ))


event_like = st.composite(_event_like)()


def _one_outcome(value: Any) -> Outcome:
    outcome = ENGINE.process(value)  # also checks every emitted event against the reference validator
    assert isinstance(outcome, Outcome)
    assert outcome.skipped == (not outcome.emitted and not outcome.rejected)
    assert outcome.verdict == {(True, False): "emitted", (True, True): "partly rejected",
                               (False, True): "rejected", (False, False): "skipped"}[
        (bool(outcome.emitted), bool(outcome.rejected))]
    for rejection in outcome.rejected:
        assert rejection.path.startswith("$") and rejection.reason
    return outcome


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_never_raises(value: Any) -> None:
    _one_outcome(value)


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_like)
def test_segment_shaped_events_with_wrong_types_never_raise(event: dict[str, Any]) -> None:
    _one_outcome(event)


@settings(max_examples=60, deadline=None)
@given(st.lists(event_like, max_size=8))
def test_one_outcome_per_event_and_stable_ids(events: list[dict[str, Any]]) -> None:
    first = [ENGINE.process(e) for e in events]
    again = [ENGINE.process(e) for e in events]
    assert len(first) == len(events)
    assert [[x.event for x in o.emitted] for o in first] == [[x.event for x in o.emitted] for o in again]
