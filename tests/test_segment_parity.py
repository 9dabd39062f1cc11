"""Every behaviour of Segment's Topsort destination (shared/docs/segment-topsort-destination.md),
with concrete events and the exact Topsort events expected, improvements included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine import Batcher, Engine, check_rules
from engine.paths import BUNDLED_RULES

from .conftest import CheckedEngine, assert_valid_request

T = "2026-11-27T10:00:00Z"


def track(name: str, message_id: str = "m-1", **fields: Any) -> dict[str, Any]:
    event = {"type": "track", "event": name, "messageId": message_id, "timestamp": T, "anonymousId": "anon-1"}
    event.update(fields)
    return event


def sponsored(name: str, **fields: Any) -> dict[str, Any]:
    """A track event with a bid (``resolvedBidId: bid-1`` joins its properties): the events
    Segment's destination maps, which the bundled rules map exactly as it does."""
    return track(name, **{**fields, "properties": {"resolvedBidId": "bid-1", **fields.get("properties", {})}})


# --- presets ---------------------------------------------------------------------------------

def test_impression_preset_maps_every_field(bundled: CheckedEngine) -> None:
    event = track(
        "Product Viewed",
        position=4,
        context={"page": {"path": "/search", "title": "Search"}, "device": {"type": "android"}},
        properties={
            "resolvedBidId": "bid-1",
            "additionalAttribution": {"id": "v-1", "type": "vendor"},
            "externalVendorId": "ev-1",
            "externalCampaignId": "ec-1",
            "entity": {"id": "p-1", "type": "product"},
            "object": {"type": "listing", "clickType": "product"},
            "channel": "onsite",
            "dspMetadata": {"gclid": "g-1", "rank": 2},
            "placement": {"pageSize": 20},
            "page": {"type": "search", "pageId": "results"},
        },
    )
    assert bundled.outputs(event) == [{
        "id": "m-1",
        "occurredAt": T,
        "opaqueUserId": "anon-1",
        "resolvedBidId": "bid-1",
        "additionalAttribution": {"id": "v-1", "type": "vendor"},
        "externalVendorId": "ev-1",
        "externalCampaignId": "ec-1",
        "entity": {"id": "p-1", "type": "product"},
        "object": {"type": "listing", "clickType": "product"},
        "channel": "onsite",
        "dsp_metadata": {"gclid": "g-1", "rank": "2"},
        "placement": {"path": "/search", "position": 4, "pageSize": 20},
        "page": {"value": "Search", "type": "search", "pageId": "results"},
        "deviceType": "mobile",
    }]
    assert [e.kind for e in bundled.process(event).emitted] == ["impressions"]


@pytest.mark.parametrize(("preset", "kind"), [("Product Clicked", "clicks"), ("Banner Click", "clicks"),
                                              ("Banner Impression", "impressions")])
def test_click_and_banner_presets_map_like_the_impression(bundled: CheckedEngine, preset: str, kind: str) -> None:
    properties = {"resolvedBidId": "bid-9", "object": {"type": "banner", "assetId": "hero"}, "channel": "offsite",
                  "product_id": "p-9"}  # with a bid, no entity is made of the product id
    viewed = bundled.outputs(track("Product Viewed", properties=properties))
    outcome = bundled.process(track(preset, properties=properties))
    assert [(e.kind, e.event) for e in outcome.emitted] == [(kind, viewed[0])]
    assert viewed == [{"id": "m-1", "occurredAt": T, "opaqueUserId": "anon-1", "resolvedBidId": "bid-9",
                       "object": {"type": "banner", "assetId": "hero"}, "channel": "offsite"}]


def test_purchase_preset(bundled: CheckedEngine) -> None:
    event = track("Order Completed", context={"device": {"type": "ios"}}, properties={
        "channel": "onsite",
        "products": [
            {"product_id": "p-1", "price": 12.5, "quantity": 2, "vendorId": "v-1", "brand": "b-1"},
            {"product_id": "p-2", "price": 3, "brand": "b-2"},
        ],
    })
    assert bundled.outputs(event, "purchases") == [{
        "id": "m-1", "occurredAt": T, "opaqueUserId": "anon-1", "deviceType": "mobile", "channel": "onsite",
        "items": [
            {"productId": "p-1", "unitPrice": 12.5, "quantity": 2, "vendorId": "v-1"},
            {"productId": "p-2", "unitPrice": 3, "vendorId": "b-2"},
        ],
    }]


def test_impressions_list_preset_gives_each_item_its_own_stable_id(bundled: CheckedEngine) -> None:
    event = track("Product List Viewed", message_id="list-1", context={"device": {"type": "windows"}}, properties={
        "channel": "onsite",
        "products": [
            {"product_id": "p-1", "resolvedBidId": "bid-1"},
            {"product_id": "p-2"},
            {"product_id": "p-3", "resolvedBidId": "bid-3", "additionalAttribution": {"id": "p-3", "type": "product"}},
        ],
    })
    common = {"occurredAt": T, "opaqueUserId": "anon-1", "deviceType": "desktop", "channel": "onsite"}
    expected = [
        {"id": "list-1:0", **common, "resolvedBidId": "bid-1"},
        {"id": "list-1:1", **common, "entity": {"type": "product", "id": "p-2"}},  # improve: organic, no bid
        {"id": "list-1:2", **common, "resolvedBidId": "bid-3", "additionalAttribution": {"id": "p-3", "type": "product"}},
    ]
    assert _sorted_keys(bundled.outputs(event)) == _sorted_keys(expected)
    assert bundled.outputs(event) == bundled.outputs(event)  # stable across re-runs


def test_lists_over_50_are_split_across_requests(bundled: CheckedEngine) -> None:
    products = [{"product_id": f"p-{i}", "resolvedBidId": f"bid-{i}"} for i in range(120)]
    outcome = bundled.process(track("Product List Viewed", properties={"products": products}))
    batcher: Batcher[dict[str, Any]] = Batcher()
    bodies = [b for e in outcome.emitted if (b := batcher.add(e.kind, e.event))] + [batcher.flush()]
    assert [len(b["impressions"]) for b in bodies] == [50, 50, 20]
    assert len({i["id"] for b in bodies for i in b["impressions"]}) == 120
    for body in bodies:
        assert_valid_request(body)


@pytest.mark.parametrize("call", ["page", "screen"])
def test_page_views_preset(bundled: CheckedEngine, call: str) -> None:
    event = {"type": call, "messageId": "pv-1", "timestamp": T, "userId": "u-1",
             "context": {"page": {"title": "Cart"}, "device": {"type": "desktop"}},
             "properties": {"channel": "onsite", "page": {"type": "cart", "pageId": "cart", "value": ["p-1", "p-2"]}}}
    assert bundled.outputs(event) == [{
        "id": "pv-1", "occurredAt": T, "opaqueUserId": "u-1", "deviceType": "desktop", "channel": "onsite",
        "page": {"value": ["p-1", "p-2"], "type": "cart", "pageId": "cart"},
    }]


def test_page_view_without_page_is_rejected(bundled: CheckedEngine) -> None:
    outcome = bundled.process({"type": "page", "messageId": "pv-2", "timestamp": T, "anonymousId": "a"})
    assert not outcome.emitted
    assert [(r.rule, r.path) for r in outcome.rejected] == [("page-viewed", "$.page")]


def test_product_added_is_off_by_default_and_warned_about_when_on(bundled: CheckedEngine, tmp_path: Path) -> None:
    added = track("Product Added", properties={"resolvedBidId": "bid-1"})
    assert bundled.process(added).skipped
    (tmp_path / "on.yaml").write_text("rules:\n  - {name: product-added, enabled: true}\n")
    rules, problems = check_rules([BUNDLED_RULES, tmp_path])
    warnings = [p for p in problems if p.severity == "warning"]
    assert [(w.rule, "counted twice" in w.message) for w in warnings] == [("product-added", True)]
    engine = Engine.from_folders(BUNDLED_RULES, tmp_path)
    assert [e.event for e in engine.process(added).emitted] == [
        {"id": "m-1", "occurredAt": T, "opaqueUserId": "anon-1", "resolvedBidId": "bid-1", "clickType": "add-to-cart"}
    ]


def test_skip_zero_price_purchases_setting(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text(
        "rules:\n"
        "  - {name: order-completed, enabled: false}\n"
        "  - {name: order-completed-skip-zero-price, enabled: true}\n"
    )
    engine = CheckedEngine(Engine.from_folders(BUNDLED_RULES, tmp_path))
    order = track("Order Completed", properties={"products": [
        {"product_id": "p-1", "price": 0}, {"product_id": "p-2"}, {"product_id": "p-3", "price": "4.5"}]})
    assert engine.outputs(order) == [
        {"id": "m-1", "occurredAt": T, "opaqueUserId": "anon-1", "items": [{"productId": "p-3", "unitPrice": 4.5}]}]
    free = track("Order Completed", properties={"products": [{"product_id": "p-1", "price": 0}]})
    assert engine.process(free).skipped  # nothing is sent, and it is not an error


# --- field mappings --------------------------------------------------------------------------

@pytest.mark.parametrize(("ids", "expected"), [
    ({"anonymousId": "anon-1", "userId": "u-1"}, "anon-1"),
    ({"userId": "u-1"}, "u-1"),               # improve: userId fallback
    ({"anonymousId": "", "userId": 77}, "77"),
])
def test_opaque_user_id(bundled: CheckedEngine, ids: dict[str, Any], expected: str) -> None:
    event = {"type": "track", "event": "Product Viewed", "messageId": "m-1", "timestamp": T, **ids,
             "properties": {"resolvedBidId": "bid-1"}}
    assert bundled.outputs(event)[0]["opaqueUserId"] == expected


@pytest.mark.parametrize(("event_fields", "placement"), [
    # context.page.path exists: {path, position} merged with properties.placement, properties win
    ({"position": 2, "context": {"page": {"path": "/a"}}, "properties": {"placement": {"path": "/b", "page": 3}}},
     {"path": "/b", "position": 2, "page": 3}),
    ({"position": 2, "context": {"page": {"path": "/a"}}}, {"path": "/a", "position": 2}),
    # improve: properties.position, where the e-commerce spec puts it
    ({"context": {"page": {"path": "/a"}}, "properties": {"position": "5"}}, {"path": "/a", "position": 5}),
    # no page path: properties.placement alone
    ({"position": 2, "properties": {"placement": {"path": "/app/home", "searchQuery": "shoes"}}},
     {"path": "/app/home", "position": 2, "searchQuery": "shoes"}),
    ({"position": 2}, None),
])
def test_placement(bundled: CheckedEngine, event_fields: dict[str, Any], placement: Any) -> None:
    output = bundled.outputs(sponsored("Product Viewed", **event_fields))[0]
    assert output.get("placement") == placement


def test_position_joins_properties_placement_without_a_page_path(bundled: CheckedEngine) -> None:
    # Segment sends properties.placement alone when there is no context.page.path; here the
    # position (top level, else properties.position) joins it (improve), and properties still win.
    joined = bundled.outputs(sponsored("Product Viewed", position=3, properties={"placement": {"path": "/x"}}))[0]
    assert joined["placement"] == {"path": "/x", "position": 3}
    kept = bundled.outputs(sponsored("Product Viewed", position=3, properties={"placement": {"path": "/x", "position": 9}}))
    assert kept[0]["placement"] == {"path": "/x", "position": 9}


@pytest.mark.parametrize(("event_fields", "page"), [
    ({"context": {"page": {"title": "Shoes"}}, "properties": {"page": {"type": "category", "pageId": "c-1"}}},
     {"value": "Shoes", "type": "category", "pageId": "c-1"}),
    ({"context": {"page": {"title": "Shoes"}},
      "properties": {"page": {"type": "category", "pageId": "c-1", "value": "Boots"}}},
     {"value": "Boots", "type": "category", "pageId": "c-1"}),
    ({"context": {"page": {"title": "Shoes"}}}, None),
])
def test_page(bundled: CheckedEngine, event_fields: dict[str, Any], page: Any) -> None:
    assert bundled.outputs(sponsored("Product Viewed", **event_fields))[0].get("page") == page


@pytest.mark.parametrize(("device", "expected"), [
    ("ios", "mobile"), ("android", "mobile"), ("macos", "desktop"), ("windows", "desktop"),
    ("mobile", "mobile"), ("desktop", "desktop"), ("iOS", "mobile"), ("tv", None), (None, None),
])
def test_device_type(bundled: CheckedEngine, device: str | None, expected: str | None) -> None:
    event = sponsored("Product Viewed", context={"device": {"type": device}})
    assert bundled.outputs(event)[0].get("deviceType") == expected


def test_purchase_vendor_falls_back_to_brand(bundled: CheckedEngine) -> None:
    event = track("Order Completed", properties={"products": [
        {"product_id": "p-1", "price": 1, "brand": "acme"},
        {"product_id": "p-2", "price": 1, "brand": "acme", "vendorId": "v-7"},
        {"product_id": "p-3", "price": 1}]})
    items = bundled.outputs(event)[0]["items"]
    assert [i.get("vendorId") for i in items] == ["acme", "v-7", None]


# --- how values are treated ------------------------------------------------------------------

def test_missing_null_and_top_level_empty_values_are_dropped(bundled: CheckedEngine) -> None:
    event = track("Product Viewed", properties={
        "resolvedBidId": "bid-1", "externalVendorId": "", "externalCampaignId": None,
        "placement": {"path": "/p", "searchQuery": "", "page": None}})
    assert bundled.outputs(event) == [{"id": "m-1", "occurredAt": T, "opaqueUserId": "anon-1",
                                       "resolvedBidId": "bid-1", "placement": {"path": "/p", "searchQuery": ""}}]


def test_values_are_coerced_to_the_declared_types(bundled: CheckedEngine) -> None:
    event = track("Order Completed", messageId=123, properties={"products": [
        {"product_id": 42, "price": "9.99", "quantity": "2"}]})
    event["messageId"] = 123
    assert bundled.outputs(event) == [{"id": "123", "occurredAt": T, "opaqueUserId": "anon-1",
                                       "items": [{"productId": "42", "unitPrice": 9.99, "quantity": 2}]}]


def test_unknown_keys_inside_known_objects_are_dropped(bundled: CheckedEngine) -> None:
    event = track("Product Viewed", properties={
        "resolvedBidId": "b", "placement": {"path": "/p", "name": "carousel"}, "entity": {"id": "e", "type": "product", "x": 1}})
    output = bundled.outputs(event)[0]
    assert output["placement"] == {"path": "/p"}
    assert output["entity"] == {"id": "e", "type": "product"}


@pytest.mark.parametrize(("timestamp", "expected"), [
    ("2026-11-27T10:00:00Z", "2026-11-27T10:00:00Z"),
    ("2026-11-27T11:00:00.250+01:00", "2026-11-27T11:00:00.250+01:00"),
    ("2026-11-27T10:00:00", "2026-11-27T10:00:00Z"),
    ("2026-11-27 10:00:00.5", "2026-11-27T10:00:00.500Z"),
    (1764237600123, "2025-11-27T10:00:00.123Z"),
    ("1764237600123", "2025-11-27T10:00:00.123Z"),
])
def test_timestamps_in_every_segment_shape_become_rfc3339(bundled: CheckedEngine, timestamp: Any, expected: str) -> None:
    assert bundled.outputs(sponsored("Product Clicked", timestamp=timestamp))[0]["occurredAt"] == expected


def test_missing_required_field_rejects_the_event_with_its_path(bundled: CheckedEngine) -> None:
    event = {"type": "track", "event": "Product Viewed", "messageId": "m-1", "timestamp": T,
             "properties": {"resolvedBidId": "bid-1"}}
    outcome = bundled.process(event)
    assert outcome.emitted == ()
    assert [r.to_dict() for r in outcome.rejected] == [{
        "rule": "product-viewed", "path": "$.opaqueUserId", "reason": "required, but missing or null", "item": None}]


def test_a_purchase_keeps_its_valid_items_and_names_the_bad_ones(bundled: CheckedEngine) -> None:
    event = track("Order Completed", properties={"products": [
        {"product_id": "p-1", "price": 5}, {"product_id": "p-2", "price": -1}, {"product_id": "p-3", "price": 2, "quantity": 0}]})
    outcome = bundled.process(event)
    assert [e.event["items"] for e in outcome.emitted] == [[{"productId": "p-1", "unitPrice": 5}]]
    assert [(r.item, r.path) for r in outcome.rejected] == [(1, "$.items[1].unitPrice"), (2, "$.items[2].quantity")]
    assert all(r.reason.startswith(f"item {r.item} of $.items: ") for r in outcome.rejected)


def test_a_list_keeps_its_valid_impressions_and_names_the_bad_ones(bundled: CheckedEngine) -> None:
    event = track("Product List Viewed", properties={"products": [
        {"resolvedBidId": "b-0"}, {"resolvedBidId": "x" * 200}, {"resolvedBidId": "b-2"}]})
    outcome = bundled.process(event)
    assert [e.event["id"] for e in outcome.emitted] == ["m-1:0", "m-1:2"]
    assert [(r.item, r.path) for r in outcome.rejected] == [(1, "$.resolvedBidId")]
    assert outcome.rejected[0].reason.startswith("item 1 of properties.products: ")


@pytest.mark.parametrize(("properties", "path"), [
    ({"channel": "web"}, "$.channel"),                                  # enum
    ({"resolvedBidId": "b" * 129}, "$.resolvedBidId"),                  # length
    ({"placement": {"path": "/p", "position": 0}}, "$.placement.position"),  # minimum
    ({"entity": {"id": "e", "type": "shop"}}, "$.entity.type"),
])
def test_topsort_constraints_segment_does_not_check_are_enforced(bundled: CheckedEngine, properties: Any, path: str) -> None:
    outcome = bundled.process(sponsored("Product Clicked", properties=properties))
    assert not outcome.emitted
    assert [r.path for r in outcome.rejected] == [path]


def _sorted_keys(events: list[dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    return [sorted(e.items()) for e in events]
