"""The rule format: each kind of field spec, fan-out, predicates and inline tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import Engine

from .conftest import CheckedEngine, run_cli

BASE = {"type": "track", "event": "Tap", "messageId": "m-1", "timestamp": "2026-01-01T00:00:00Z", "anonymousId": "a"}


def engine_with(tmp_path: Path, fields: str, *, extra: str = "", emit: str = "clicks", when: str = "") -> CheckedEngine:
    text = f"""rules:
  - name: r
    when: {{type: track, event: Tap{when}}}
    emit: {emit}
{extra}    fields:
      id: messageId
      occurredAt: timestamp
      opaqueUserId: anonymousId
      entity: {{const: {{type: vendor, id: v-1}}}}
{fields}"""
    (tmp_path / "r.yaml").write_text(text)
    return CheckedEngine(Engine.from_folders(tmp_path))


def one(engine: CheckedEngine, **fields: Any) -> dict[str, Any]:
    """The one output of ``engine`` for a Tap event, without the fields every output has."""
    outputs = engine.outputs({**BASE, **fields})
    assert len(outputs) == 1
    assert outputs[0]["entity"] == {"type": "vendor", "id": "v-1"}
    return {k: v for k, v in outputs[0].items() if k not in ("id", "occurredAt", "opaqueUserId", "entity")}


def test_expression_const_and_omitted_nulls(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "      channel: {const: offsite}\n      resolvedBidId: properties.bid\n")
    assert one(engine, properties={"bid": "b-1"}) == {"channel": "offsite", "resolvedBidId": "b-1"}
    assert one(engine) == {"channel": "offsite"}


def test_an_unquoted_yaml_date_is_the_text_written(tmp_path: Path) -> None:
    """YAML reads 2026-11-27 as a date; JSON has none, so a rule's const keeps the text as written."""
    engine = engine_with(tmp_path, "      resolvedBidId: {const: 2026-11-27}\n"
                                   "      externalCampaignId: {const: 2026-11-27T10:00:00Z}\n")
    assert one(engine) == {"resolvedBidId": "2026-11-27", "externalCampaignId": "2026-11-27T10:00:00Z"}


def test_first_skips_nulls_and_empty_strings(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "      resolvedBidId: {first: [properties.a, properties.b, {const: fallback}]}\n")
    assert one(engine, properties={"a": "", "b": "B"}) == {"resolvedBidId": "B"}
    assert one(engine, properties={"a": "A", "b": "B"}) == {"resolvedBidId": "A"}
    assert one(engine) == {"resolvedBidId": "fallback"}


def test_merge_later_parts_win_and_nulls_are_ignored(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "      placement:\n        merge:\n          - {fields: {path: context.page.path, position: position}}\n"
                                   "          - properties.placement\n")
    assert one(engine, position=2, context={"page": {"path": "/a"}}, properties={"placement": {"path": "/b"}}) == {
        "placement": {"path": "/b", "position": 2}}
    assert one(engine, context={"page": {"path": "/a"}}) == {"placement": {"path": "/a"}}
    assert one(engine) == {}


def test_merge_with_a_non_object_is_rejected_with_the_reason(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "      placement:\n        merge: [{fields: {path: context.page.path}}, properties.placement]\n")
    outcome = engine.process({**BASE, "context": {"page": {"path": "/a"}}, "properties": {"placement": "home"}})
    assert [(r.path, r.reason) for r in outcome.rejected] == [("$.placement", '"home" is not of type "object"')]


def test_lookup_default_and_as(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path,
        "      deviceType: {from: context.device.type, lookup: {phone: mobile, pc: desktop}, default: desktop}\n"
        "      externalVendorId: {from: properties.vendor, as: string}\n"
        "      placement: {fields: {path: {const: /p}, position: {from: properties.pos, as: integer}}}\n",
    )
    assert one(engine, context={"device": {"type": "phone"}}, properties={"vendor": 12, "pos": "3"}) == {
        "deviceType": "mobile", "externalVendorId": "12", "placement": {"path": "/p", "position": 3}}
    assert one(engine, context={"device": {"type": "toaster"}}) == {"deviceType": "desktop", "placement": {"path": "/p"}}


def test_as_datetime(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("""rules:
  - name: r
    when: {type: track, event: Tap}
    emit: clicks
    fields: {id: messageId, opaqueUserId: anonymousId, occurredAt: {from: properties.at, as: datetime},
             resolvedBidId: {const: b-1}}
""")
    engine = CheckedEngine(Engine.from_folders(tmp_path))
    assert engine.outputs({**BASE, "properties": {"at": 1767225600}})[0]["occurredAt"] == "2026-01-01T00:00:00Z"
    outcome = engine.process({**BASE, "properties": {"at": "soon"}})
    assert [(r.path, r.reason) for r in outcome.rejected] == [("$.occurredAt", '"soon" is not a "date-time"')]
    for odd in ("2026-11-27T23:59:60Z", "0000-01-01T00:00:00Z"):  # leap second, year zero
        assert [r.path for r in engine.process({**BASE, "properties": {"at": odd}}).rejected] == ["$.occurredAt"]


def test_if_makes_a_field_conditional(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "      channel: {if: \"properties.offsite == `true`\", const: offsite}\n")
    assert one(engine, properties={"offsite": True}) == {"channel": "offsite"}
    assert one(engine, properties={"offsite": False}) == {}


def test_when_if_predicate_routes_only_wanted_events(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "", when=", if: properties.bid")
    assert engine.process({**BASE, "properties": {"bid": "b"}}).emitted
    assert engine.process({**BASE, "properties": {}}).skipped


def test_custom_functions(tmp_path: Path) -> None:
    engine = engine_with(
        tmp_path,
        "      externalVendorId: upper(properties.v)\n"
        "      externalCampaignId: \"concat(properties.c, '-', `7`)\"\n"
        "      dsp_metadata: stringify_values(properties.d)\n"
        "      channel: lower(properties.ch)\n",
    )
    assert one(engine, properties={"v": "ab", "c": "camp", "d": {"n": 1.0, "b": True, "z": None}, "ch": "ONSITE"}) == {
        "externalVendorId": "AB", "externalCampaignId": "camp-7", "dsp_metadata": {"n": "1", "b": "true"},
        "channel": "onsite"}
    assert one(engine) == {}  # every function passes null through


def test_an_expression_failing_at_run_time_rejects_with_the_field_and_reason(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "      channel: lower(properties.ch)\n")
    outcome = engine.process({**BASE, "properties": {"ch": 5}})
    assert [(r.rule, r.path) for r in outcome.rejected] == [("r", "$.channel")]
    assert "lower(properties.ch)" in outcome.rejected[0].reason and "invalid type" in outcome.rejected[0].reason


def test_rule_fan_out_binds_item_and_index(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("""rules:
  - name: fan
    when: {type: track, event: Tap}
    emit: impressions
    each: properties.things
    item: thing
    fields:
      id: "concat(messageId, '#', index)"
      occurredAt: timestamp
      opaqueUserId: anonymousId
      resolvedBidId: thing.bid
      externalVendorId: properties.vendor
""")
    engine = CheckedEngine(Engine.from_folders(tmp_path))
    outputs = engine.outputs({**BASE, "properties": {"vendor": "v", "things": [{"bid": "x"}, {"bid": "y"}]}})
    assert [(o["id"], o["resolvedBidId"], o["externalVendorId"]) for o in outputs] == [("m-1#0", "x", "v"), ("m-1#1", "y", "v")]
    outcome = engine.process({**BASE, "properties": {"things": {"bid": "x"}}})
    assert [(r.path, r.reason) for r in outcome.rejected] == [
        ("$", "'properties.things' should be a non-empty list, got dict")]


def test_field_fan_out_builds_an_array(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("""rules:
  - name: order
    when: {type: track, event: Tap}
    emit: purchases
    fields:
      id: messageId
      occurredAt: timestamp
      opaqueUserId: anonymousId
      items:
        each: properties.lines
        item: line
        fields:
          productId: {from: "concat(line.sku, '/', index)"}
          unitPrice: line.price
""")
    engine = CheckedEngine(Engine.from_folders(tmp_path))
    outputs = engine.outputs({**BASE, "properties": {"lines": [{"sku": "a", "price": 1}, {"sku": "b", "price": "2.5"}]}})
    assert outputs[0]["items"] == [{"productId": "a/0", "unitPrice": 1}, {"productId": "b/1", "unitPrice": 2.5}]


def test_non_dict_and_odd_events_are_handled(bundled: CheckedEngine) -> None:
    assert bundled.process(["not", "an", "event"]).rejected[0].reason.startswith("a Segment event is a JSON object")
    assert bundled.process({"type": "identify", "userId": "u"}).skipped
    assert bundled.process({"type": "track", "event": ["Product Viewed"]}).skipped
    assert bundled.process({"type": 5}).skipped


# --- inline rule tests -------------------------------------------------------------------------

def test_bundled_inline_tests_pass_and_each_rule_has_a_rejection_test() -> None:
    result = run_cli("test")
    assert result.returncode == 0, result.stderr.decode()
    engine = Engine.from_folders()
    for rule in engine.rules.rules:
        assert len(rule.tests) >= 2, rule.name
        assert any("reject" in test for test in rule.tests), rule.name
    assert result.stderr.decode().strip().splitlines()[-1] == f"{sum(len(r.tests) for r in engine.rules.rules)} passed, 0 failed"


def test_a_failing_inline_test_shows_a_diff(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("""rules:
  - name: r
    when: {type: track, event: Tap}
    emit: clicks
    fields: {id: messageId, occurredAt: timestamp, opaqueUserId: anonymousId, resolvedBidId: {const: b-1}}
    tests:
      - name: wrong expectation
        event: {type: track, event: Tap, messageId: m, timestamp: "2026-01-01T00:00:00Z", anonymousId: a}
        expect: [{id: m, occurredAt: "2026-01-01T00:00:00Z", opaqueUserId: b, resolvedBidId: b-1}]
      - name: wrong rejection
        event: {type: track, event: Tap, messageId: m, timestamp: "2026-01-01T00:00:00Z"}
        reject: [{path: $.id}]
""")
    result = run_cli("test", str(tmp_path))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert '-    "opaqueUserId": "b"' in err and '+    "opaqueUserId": "a"' in err
    assert 'expected, not found: {"path":"$.id"}' in err
    assert 'found, not expected: {"rule":"r","path":"$.opaqueUserId"' in err
    assert err.strip().splitlines()[-1] == "0 passed, 2 failed"


def test_a_failing_when_if_skips_the_event_and_explain_says_why(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "", when=", if: lower(properties.kind)")
    event = {**BASE, "properties": {"kind": 7}}
    assert engine.process(event).skipped
    why = engine.engine.rule("r").mismatch(event)
    assert why.startswith("'if' failed, so the rule does not take the event:") and "lower(properties.kind)" in why
