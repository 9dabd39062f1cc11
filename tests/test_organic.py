"""Sponsored, organic and offsite interactions: every impression and click the bundled rules emit
carries resolvedBidId or entity, and every event or list item with neither is rejected, saying so.

The expectations are worked out here from the Segment event alone (see :func:`_expected`), then
held against what the engine makes of a few thousand generated events, of random ones, and of the
README's examples; what the rules emit is delivered into the sandbox, which enforces the same
contract from ``schemas/``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.corpus import generate
from engine import Batcher, Engine, Outcome, check_rules
from engine.paths import BUNDLED_RULES
from engine.rules.inline_tests import run_rule_tests
from engine.sandbox.server import Sandbox

from .conftest import ROOT, CheckedEngine

NEEDS = "needs resolvedBidId (sponsored) or entity (organic)"
SINGLE = {"Product Viewed": False, "Product Clicked": False, "Banner Impression": True, "Banner Click": True}
"""The presets of one impression or click, and whether each is a banner (which takes a named entity only)."""
LIST = "Product List Viewed"
KEY = "sk_test_organic"

ENGINE = CheckedEngine(Engine.from_folders())


def _truthy(value: Any) -> bool:
    """JMESPath's truth: not null, false, or an empty string, array or object (0 is true)."""
    return value is not None and value is not False and (not isinstance(value, (str, list, dict)) or bool(value))


def _expected(holder: dict[str, Any], banner: bool, item: bool) -> tuple[str, dict[str, Any] | None]:
    """The kind of interaction a Segment event (or list item) ``holder`` makes, and its entity.

    Kinds: ``sponsored`` (a bid), ``named`` (organic, the entity it names), ``product`` (organic,
    the entity of its product id) and ``neither``. With a bid a single event sends the entity it
    names, as Segment does, and a list item none.
    """
    named = holder.get("entity")
    named = None if named in (None, "") else {k: str(v) for k, v in named.items() if k in ("id", "type")}
    if _truthy(holder.get("resolvedBidId")):
        return "sponsored", None if item else named
    if named is not None:
        return "named", named
    if not banner and _truthy(holder.get("product_id")):
        return "product", {"type": "product", "id": str(holder["product_id"])}
    return "neither", None


def _judge(holder: dict[str, Any], banner: bool, item: bool, emitted: list[dict[str, Any]],
           rejected: list[Any]) -> str:
    """Assert what the engine made of one event or item; return its kind of interaction."""
    kind, entity = _expected(holder, banner, item)
    refusals = [r for r in rejected if NEEDS in r.reason]
    if kind == "neither":
        assert not emitted, (holder, emitted)
        assert [(r.path, r.reason.endswith(NEEDS)) for r in refusals] == [("$", True)], (holder, rejected)
        return kind
    assert not refusals, (holder, rejected)
    for event in emitted:
        assert event.get("entity") == entity, (holder, event)
        assert ("resolvedBidId" in event) == (kind == "sponsored"), (holder, event)
    return kind


def _check(event: dict[str, Any], outcome: Outcome) -> Counter[str]:
    """Assert the outcome of one generated event; count the kinds of interaction it held."""
    seen: Counter[str] = Counter()
    for made in outcome.emitted:
        if made.kind in ("impressions", "clicks"):
            assert "resolvedBidId" in made.event or "entity" in made.event, made
    properties = event.get("properties") if isinstance(event.get("properties"), dict) else {}
    name = event.get("event")
    emitted = [made.event for made in outcome.emitted]
    if name in SINGLE:
        seen[_judge(properties, SINGLE[name], False, emitted, list(outcome.rejected))] += 1
    elif name == LIST and isinstance(properties.get("products"), list):
        products = properties["products"]
        for index, product in enumerate(products):
            product = product if isinstance(product, dict) else {}
            mine = [e for e in emitted if e["id"] == f"{event['messageId']}:{index}"]
            kind = _judge(product, False, True, mine, [r for r in outcome.rejected if r.item == index])
            seen[f"item {kind}"] += 1
        if len({_truthy(p.get("resolvedBidId")) for p in products if isinstance(p, dict)}) == 2:
            seen["mixed list"] += 1
    if name in SINGLE and properties.get("channel") == "offsite":
        seen["offsite"] += 1
    return seen


CORPUS = list(generate(3000, seed=10))


def test_every_generated_impression_and_click_is_sponsored_or_organic_or_rejected_saying_so() -> None:
    seen: Counter[str] = Counter()
    for event in CORPUS:
        seen += _check(event, ENGINE.process(event))
    # the corpus holds every case, enough times for the assertions above to mean something
    for kind in ("sponsored", "named", "product", "neither", "offsite", "mixed list",
                 "item sponsored", "item named", "item product", "item neither"):
        assert seen[kind] >= 10, (kind, seen)


segment_ids = st.sampled_from(["p-1", "SKU-9", 42, 0, "", None])
bids = st.sampled_from(["bid-1", 7, "", None])
named_entities = st.sampled_from([None, "", {"type": "vendor", "id": "v-1"}, {"type": "product", "id": 5}])


def _holder(draw: Any) -> dict[str, Any]:
    """Properties of a single event, or a list item: each key may be missing."""
    fields = {"product_id": segment_ids, "resolvedBidId": bids, "entity": named_entities}
    return draw(st.fixed_dictionaries({}, optional=fields))


@st.composite
def interactions(draw: Any) -> dict[str, Any]:
    name = draw(st.sampled_from([*SINGLE, LIST]))
    if name == LIST:
        properties: dict[str, Any] = {"products": [_holder(draw) for _ in range(draw(st.integers(1, 6)))]}
    else:
        properties = _holder(draw)
        if draw(st.booleans()):
            properties.update(channel="offsite", dspMetadata={"gclid": "Cj0KCQ", "campaign": 3})
    return {"type": "track", "event": name, "messageId": "m-1", "timestamp": "2026-11-27T10:00:00Z",
            "anonymousId": "anon-1", "properties": properties}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(interactions())
def test_any_mix_of_bid_product_id_and_entity(event: dict[str, Any]) -> None:
    outcome = ENGINE.process(event)
    _check(event, outcome)
    assert outcome.emitted or outcome.rejected  # each event or item is one or the other


def test_what_the_rules_emit_the_sandbox_accepts() -> None:
    """The sandbox validates against schemas/ too: it refuses an interaction with neither field
    (tests/test_sandbox.py), and accepts every one the rules emit."""
    batcher: Batcher[dict[str, Any]] = Batcher()
    emitted = [made for event in CORPUS for made in ENGINE.engine.process(event).emitted]
    bodies = [body for made in emitted if (body := batcher.add(made.kind, made.event))] + [batcher.flush()]
    with Sandbox(api_key=KEY) as sandbox, httpx.Client(base_url=sandbox.url, timeout=10) as client:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        answers = [client.post("/v2/events", content=orjson.dumps(body), headers=headers) for body in bodies if body]
        assert [a.status_code for a in answers if a.status_code != 204] == [], answers[0].text
        organic = [e for e in sandbox.store.events("impressions") if "resolvedBidId" not in e]
        assert organic and all("entity" in e for e in organic)
        assert sum(len(sandbox.store.events(kind)) for kind in ("impressions", "clicks")) == sum(
            made.kind in ("impressions", "clicks") for made in emitted)


# --- the README's examples -------------------------------------------------------------------------

README = (ROOT / "README.md").read_text()


def _block(after: str, language: str, nth: int = 0) -> str:
    """The ``nth`` code block in ``language`` after the text ``after`` in the README."""
    start = README.index(after)
    return re.findall(rf"```{language}\n(.*?)```", README[start:], re.S)[nth]


def test_the_readme_offsite_click_maps_as_documented() -> None:
    after = "**Offsite** interactions"
    event, click = orjson.loads(_block(after, "json")), orjson.loads(_block(after, "json", 1))
    outcome = ENGINE.process(event)
    assert [(made.kind, made.event) for made in outcome.emitted] == [("clicks", click)]


@pytest.mark.parametrize(("after", "rule", "tests"), [
    ("## Writing rules", "product-viewed", 2),
    ("Create `my-rules/wishlist.yaml`", "wishlist-like", 3),
])
def test_the_readme_rules_check_and_their_tests_pass(tmp_path: Path, after: str, rule: str, tests: int) -> None:
    (tmp_path / "mine.yaml").write_text(_block(after, "yaml"))
    rules, problems = check_rules([BUNDLED_RULES, tmp_path])
    assert [p for p in problems if p.severity == "error"] == []
    results = [result for result in run_rule_tests(rules) if result.rule.name == rule]
    assert len(results) == tests and all(result.passed for result in results), [r.failure for r in results]


@pytest.mark.parametrize("preset", [*SINGLE, LIST])
def test_a_bundled_interaction_rule_without_either_field_does_not_load(tmp_path: Path, preset: str) -> None:
    """Every bundled impressions/clicks rule maps both fields; a copy without them is refused at load."""
    engine = Engine.from_folders()
    rule = next(r for r in engine.rules.rules if r.events == {preset})
    fields = {k: v for k, v in rule.spec["fields"].items() if k not in ("resolvedBidId", "entity")}
    text = orjson.dumps({"rules": [{**{k: rule.spec[k] for k in ("name", "when", "emit")}, "fields": fields,
                                    **({"each": rule.spec["each"], "item": rule.item} if rule.each else {})}]})
    (tmp_path / "copy.yaml").write_bytes(text)  # JSON is YAML
    _, problems = check_rules([tmp_path])
    assert [(p.rule, NEEDS in p.message, p.line) for p in problems] == [(rule.name, True, 1)]
