"""`coverage` against counts computed from the corpus and `map --format outcomes`; `test --coverage`
lists what the inline tests leave untested."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.corpus import write_ndjson

from .conftest import ndjson, run_cli

EVENTS = 2000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "events.ndjson"
    write_ndjson(path, EVENTS, seed=3)
    with path.open("ab") as out:  # a broken line and an event nobody names
        out.write(b"{not json\n" + orjson.dumps({"type": "track", "event": "Product Added to Wishlist"}) + b"\n")
    return path


def test_coverage_counts_equal_those_computed_from_outcomes(corpus: Path) -> None:
    mapped = run_cli("map", str(corpus), "--format", "outcomes")
    assert mapped.returncode == 0, mapped.stderr.decode()
    outcomes = ndjson(mapped.stdout)
    lines = corpus.read_bytes().splitlines()
    assert len(outcomes) == len(lines) == EVENTS + 2

    arrivals: dict[tuple[str, Any], Counter[str]] = defaultdict(Counter)
    rules: dict[str, Counter[str]] = defaultdict(Counter)
    for line, outcome in zip(lines, outcomes):
        try:
            event = orjson.loads(line)
            key = (event["type"], event.get("event") if event["type"] == "track" else None)
        except orjson.JSONDecodeError:
            key = ("(not valid JSON)", None)
        took = {e["rule"] for e in outcome["emitted"]} | {r["rule"] for r in outcome["rejected"] if r["rule"]}
        arrivals[key]["count"] += 1
        arrivals[key]["none"] += not took
        for rule in took:
            arrivals[key][f"rule {rule}"] += 1
            rules[rule]["matched"] += 1
        for emitted in outcome["emitted"]:
            rules[emitted["rule"]]["emitted"] += 1
            event = emitted["event"]
            for name in event:
                rules[emitted["rule"]][f"filled {name}"] += 1
            rules[emitted["rule"]]["filled placement.position"] += "position" in event.get("placement", {})
            for item in event.get("items", []):
                rules[emitted["rule"]]["items"] += 1
                rules[emitted["rule"]]["filled items[].vendorId"] += "vendorId" in item
        for rejection in outcome["rejected"]:
            if rejection["rule"]:
                rules[rejection["rule"]]["rejected"] += 1

    result = run_cli("coverage", str(corpus), "--format", "json")
    assert result.returncode == 0, result.stderr.decode()
    report = orjson.loads(result.stdout)
    assert report["events"] == EVENTS + 2
    found = {(a["type"], a["event"]): a for a in report["arrivals"]}
    assert set(found) == set(arrivals)
    for key, counts in arrivals.items():
        assert found[key]["count"] == counts["count"] and found[key]["none"] == counts["none"], key
        assert found[key]["rules"] == {k[5:]: v for k, v in counts.items() if k.startswith("rule ")}, key
    volumes = [a["count"] for a in report["arrivals"]]
    assert volumes == sorted(volumes, reverse=True)
    assert found[("track", "Product Added to Wishlist")] == {
        "type": "track", "event": "Product Added to Wishlist", "count": 1, "rules": {}, "none": 1}

    for name, rule in report["rules"].items():
        counts = rules[name]
        assert (rule["matched"], rule["emitted"], rule["rejected"]) == (
            counts["matched"], counts["emitted"], counts["rejected"]), name
        for path, fill in rule["fields"].items():
            if "." not in path:
                assert (fill["filled"], fill["of"]) == (counts[f"filled {path}"], counts["emitted"]), (name, path)
    viewed = report["rules"]["product-viewed"]["fields"]
    assert viewed["placement.position"]["filled"] == rules["product-viewed"]["filled placement.position"] > 0
    assert viewed["externalVendorId"] == {"filled": 0, "of": rules["product-viewed"]["emitted"], "rate": 0.0}
    vendor = report["rules"]["order-completed"]["fields"]["items[].vendorId"]
    assert (vendor["filled"], vendor["of"]) == (rules["order-completed"]["filled items[].vendorId"],
                                                rules["order-completed"]["items"])
    assert report["rules"]["product-added"]["enabled"] is False and report["rules"]["product-added"]["matched"] == 0

    markdown = run_cli("coverage", str(corpus), "--format", "markdown").stdout.decode()
    assert "| track | Product Added to Wishlist | 1 | **none** |" in markdown
    text = run_cli("coverage", str(corpus)).stdout.decode()
    assert "Product Added to Wishlist" in text and "none" in text


RULES = """
rules:
  - name: tap
    when: {type: track, event: Tap}
    emit: clicks
    fields:
      id: messageId
      occurredAt: {from: timestamp, as: datetime}
      opaqueUserId: {first: [anonymousId, userId]}
      deviceType: {from: context.device.type, lookup: {ios: mobile}, default: desktop}
      resolvedBidId: properties.bid
      channel: properties.channel
    tests:
      - event: {type: track, event: Tap, messageId: m1, timestamp: "2026-01-01T00:00:00Z", anonymousId: a,
                context: {device: {type: ios}}, properties: {bid: b1}}
        expect: [{id: m1, occurredAt: "2026-01-01T00:00:00Z", opaqueUserId: a, deviceType: mobile, resolvedBidId: b1}]
  - name: swipe
    when: {type: track, event: Swipe}
    emit: clicks
    fields: {id: messageId, occurredAt: timestamp, opaqueUserId: userId, resolvedBidId: properties.bid}
"""
SECOND_TEST = """
      - event: {type: track, event: Tap, messageId: m2, timestamp: "2026-01-01T00:00:00Z", userId: u,
                context: {device: {type: web}}, properties: {bid: b, channel: onsite}}
        expect: [{id: m2, occurredAt: "2026-01-01T00:00:00Z", opaqueUserId: u, deviceType: desktop, resolvedBidId: b,
                  channel: onsite}]
"""


def test_test_coverage_lists_untested_branches_fields_and_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    result = run_cli("test", "--coverage", str(rules))
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "tap (" in out and "1 test(s); fields 5/6; branches 3/7" in out
    assert "untested fields: channel" in out
    untested = {line.split("untested branch: ")[1] for line in out.splitlines() if "untested branch: " in line}
    assert untested == {"opaqueUserId: first[1] userId", "opaqueUserId: first: none", "deviceType: lookup miss",
                        "deviceType: default used"}
    assert out.rstrip().endswith("Rules without tests: swipe")

    rules.write_text(RULES.replace("  - name: swipe", SECOND_TEST.lstrip("\n") + "  - name: swipe"))
    result = run_cli("test", "--coverage", "--rules", str(rules))
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "2 test(s); fields 6/6; branches 6/7" in out
    assert [line for line in out.splitlines() if "untested" in line] == ["  untested branch: opaqueUserId: first: none"]


def test_test_without_coverage_prints_no_coverage() -> None:
    result = run_cli("test")
    assert result.returncode == 0 and result.stdout == b""


def test_memory_stays_bounded_whatever_the_names_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import Engine
    from engine.reports import coverage, diff, field_paths
    from engine.record import Record

    monkeypatch.setattr(coverage, "MAX_ARRIVALS", 5)
    monkeypatch.setattr(field_paths, "MAX_FIELDS", 20)
    engine = Engine.from_folders()
    events = [{"type": "track", "event": name, "messageId": f"m-{number}", "timestamp": "2026-01-01T00:00:00Z",
               "anonymousId": "a", "properties": {"resolvedBidId": "b", "dspMetadata": {f"key-{number}": 1}}}
              for number, name in enumerate(["Product Viewed"] * 50 + [f"Made Up {n}" for n in range(50)])]
    records = [Record("-", number, b"", event=event) for number, event in enumerate(events)]
    report = coverage.coverage_of(records, engine).report()
    assert len(report["arrivals"]) == 5 + 1
    assert report["arrivals"][1] == {"type": "(other)", "event": None, "count": 46, "rules": {}, "none": 46}
    fields = report["rules"]["product-viewed"]["fields"]
    assert field_paths.OTHER_FIELDS in fields and len(fields) <= 20 + len(engine.rule("product-viewed").leaves)
    assert sum(f["filled"] for p, f in fields.items() if p.startswith("dsp_metadata.") or p == field_paths.OTHER_FIELDS) \
        == fields["dsp_metadata"]["filled"] == 50

    renamed = [Record("-", r.line, b"", event={**r.event, "properties": {
        **r.event["properties"], "dspMetadata": {f"other-{r.line}": 2}}}) for r in records]
    found = diff.RuleSetDiff(examples=1)
    for old, new in zip(records, renamed):
        found.add(engine.process(old.event), engine.process(new.event))
    assert len(found.report()["fields"]) == 20 + 1
    assert found.report()["fields"][field_paths.OTHER_FIELDS]["gained"] > 0


def test_test_coverage_evaluates_fields_as_the_generated_code_does() -> None:
    """The separate evaluation behind `test --coverage` against the engine's own generated code:
    over the corpus as tests of every bundled rule, each field got a value exactly as often."""
    import dataclasses

    from benchmarks.corpus import generate
    from engine import Engine
    from engine.compile.fields import FieldError
    from engine.rules.inline_coverage import rule_test_coverage

    events = list(generate(1500, seed=11))
    for rule in Engine.from_folders().rules.rules:
        expected: Counter[str] = Counter()
        for event in events:
            if rule.mismatch(event) is not None:
                continue
            try:
                contexts = rule.contexts(event)
            except FieldError:
                continue
            for _, context in contexts:
                for leaf in rule.leaves:
                    try:
                        value = leaf.evaluate(context)
                    except FieldError:
                        continue
                    expected[leaf.path] += value is not None and value != ""
        tested = dataclasses.replace(rule, tests=[{"event": event} for event in events])
        found = rule_test_coverage([tested])[0]
        assert {leaf.path: found.fields[leaf.path] for leaf in rule.leaves} == {
            leaf.path: expected[leaf.path] for leaf in rule.leaves}, rule.name
        assert sum(expected.values()) > 0 or not rule.enabled
