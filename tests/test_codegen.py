"""The generated mapping code: the same values and errors as the JMESPath reference, and the
hazards particular to generating code (looked-up paths reused across fields and blocks, values
fitted without touching what other fields read, elements shadowing event keys)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jmespath
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine
from engine.compile.codegen import Scope, Writer
from engine.compile.fields import FieldError, compile_expression_at, fragment

from .conftest import CheckedEngine
from .jmespath_outcomes import outcome
from .test_jmespath_differential import OPTIONS, RULES, documents, events, expressions

FIELD = "f"


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Load-time problems (unknown functions...) are not what these tests look at."""


@lru_cache(maxsize=None)
def generated(text: str, per_element: bool) -> Any:
    """``text`` as generated code: ``f(event)``, or ``f(event, elements)`` giving its value for
    each element bound as ``item`` with its ``index``, as inside ``each``."""
    emit = fragment(text, compile_expression_at(text, (), FIELD, _ignore), FIELD)
    writer = Writer()
    event = Scope("ev")
    if not per_element:
        writer.line(f"return {emit(writer, event)}")
        return writer.function("f", "ev")
    writer.line("_made = []")
    with writer.block("for _i, _e in enumerate(elements):") as body:
        scope = event.element(writer, "item", "_e", "_i", body)
        writer.line(f"_made.append({emit(writer, scope)})")
        scope.close(writer)
    writer.line("return _made")
    return writer.function("f", "ev, elements")


def expected(text: str, evaluate: Any) -> tuple[str, Any]:
    """The reference outcome, with a JMESPath error reported as the field error the engine raises."""
    kind, value = outcome(evaluate)
    if kind == "error" and issubclass(value[0], jmespath.exceptions.JMESPathError):
        return "error", (FieldError, f"{FIELD}: {text!r} failed: {value[1]}")
    return kind, value


def assert_same(text: str, event: dict[str, Any], elements: list[Any]) -> None:
    reference = expected(text, lambda: jmespath.search(text, event, options=OPTIONS))
    assert outcome(lambda: generated(text, False)(event)) == reference, (text, event)
    contexts = [{**event, "item": element, "index": index} for index, element in enumerate(elements)]
    reference = expected(text, lambda: [jmespath.search(text, c, options=OPTIONS) for c in contexts])
    assert outcome(lambda: generated(text, True)(event, elements)) == reference, (text, event, elements)


objects = st.dictionaries(st.sampled_from(["properties", "a", "b", "item", "index", "event"]), documents, max_size=5)
element_lists = st.lists(documents, max_size=3)


@settings(max_examples=200, deadline=None)
@given(events, element_lists)
def test_rule_expressions_generated_match_jmespath(event: dict[str, Any], elements: list[Any]) -> None:
    for text in [*RULES, "item.price", "concat(event, ':', index)", "item || a", "a && item.b", "index"]:
        assert_same(text, event, elements)


@settings(max_examples=600, deadline=None)
@given(expressions, objects, element_lists)
def test_random_expressions_generated_match_jmespath(text: str, event: dict[str, Any], elements: list[Any]) -> None:
    assert_same(text, event, elements)


def test_paths_are_inlined_and_looked_up_once() -> None:
    writer = Writer()
    scope = Scope("ev")
    for text in ("properties.a", "properties.b", "lower(properties.c) || properties.d"):
        fragment(text, compile_expression_at(text, (), FIELD, _ignore), FIELD)(writer, scope)
    source = "\n".join(writer.lines)
    assert source.count("ev.get('properties')") == 1
    assert all(f".get({key!r})" in source for key in "abcd")
    bound = [getattr(value, "__name__", "") for value in writer.namespace.values()]
    assert "evaluate" not in bound, "no expression here needs its compiled closure"


def _engine(tmp_path: Path, fields: str, *, emit: str = "clicks", fan_out: str = "", id_: str = "messageId") -> CheckedEngine:
    """An engine of one rule ``r`` for track ``Tap`` events, with id, occurredAt, opaqueUserId and ``fields``
    (and an organic entity, which an impression or click needs without a bid)."""
    organic = "      entity: {const: {type: vendor, id: v-1}}\n" if emit in ("impressions", "clicks") else ""
    (tmp_path / "r.yaml").write_text(f"""rules:
  - name: r
    when: {{type: track, event: Tap}}
    emit: {emit}
{fan_out}    fields:
      id: "{id_}"
      occurredAt: timestamp
      opaqueUserId: anonymousId
{organic}{fields}""")
    return CheckedEngine(Engine.from_folders(tmp_path))


BASE = {"type": "track", "event": "Tap", "timestamp": "2026-01-01T00:00:00Z", "anonymousId": "a"}


def test_fitting_a_value_leaves_what_other_fields_read_unchanged(tmp_path: Path) -> None:
    engine = _engine(tmp_path, """      channel: {from: messageId, lookup: {"123": onsite}}\n""")
    # id is fitted to the string "123"; channel still reads the number 123, which the table lacks
    assert engine.outputs({**BASE, "messageId": 123}) == [
        {"id": "123", "occurredAt": "2026-01-01T00:00:00Z", "opaqueUserId": "a", "entity": {"type": "vendor", "id": "v-1"}}]
    assert engine.outputs({**BASE, "messageId": "123"})[0]["channel"] == "onsite"


def test_a_path_first_read_under_a_condition_is_read_again_after_it(tmp_path: Path) -> None:
    engine = _engine(tmp_path, """      placement: {if: properties.show, fields: {path: context.page.path}}
      page: {fields: {type: {const: other}, pageId: context.page.path}}
""")
    event = {**BASE, "messageId": "m", "context": {"page": {"path": "/p"}}}
    page = {"type": "other", "pageId": "/p"}
    assert engine.outputs({**event, "properties": {"show": False}})[0]["page"] == page
    shown = engine.outputs({**event, "properties": {"show": 0}})[0]  # 0 is true in JMESPath
    assert (shown["placement"], shown["page"]) == ({"path": "/p"}, page)


def test_elements_shadow_event_keys_in_paths_and_in_other_expressions(tmp_path: Path) -> None:
    engine = _engine(tmp_path, """      resolvedBidId: product.bid
      externalVendorId: "[product.vendor][0]"
      channel: {const: onsite}
""", emit="impressions", fan_out="    each: properties.products\n    item: product\n",
                     id_="join('-', [messageId, to_string(index)])")
    event = {**BASE, "messageId": "m", "index": 99, "product": {"bid": "event-level", "vendor": "event-level"},
             "properties": {"products": [{"bid": "b0", "vendor": "v0"}, {"bid": "b1"}]}}
    assert [(o["id"], o["resolvedBidId"], o.get("externalVendorId")) for o in engine.outputs(event)] == [
        ("m-0", "b0", "v0"), ("m-1", "b1", None)]


def test_nested_each_inside_a_fan_out_sees_both_elements(tmp_path: Path) -> None:
    engine = _engine(tmp_path, """      items:
        each: order.lines
        item: line
        fields:
          productId: "join(':', [order.id, line.sku, to_string(index)])"
          unitPrice: line.price
          quantity: line.qty
""", emit="purchases", fan_out="    each: properties.orders\n    item: order\n", id_="concat(messageId, '/', order.id)")
    event = {**BASE, "messageId": "m",
             "properties": {"orders": [{"id": "o1", "lines": [{"sku": "a", "price": 1, "qty": "2"}, {"sku": "b", "price": 2}]},
                                       {"id": "o2", "lines": [{"sku": "c", "price": 3, "qty": 1}]}]}}
    assert [(o["id"], o["items"]) for o in engine.outputs(event)] == [
        ("m/o1", [{"productId": "o1:a:0", "unitPrice": 1, "quantity": 2}, {"productId": "o1:b:1", "unitPrice": 2}]),
        ("m/o2", [{"productId": "o2:c:0", "unitPrice": 3, "quantity": 1}]),
    ]


def test_a_failing_inlined_call_rejects_with_the_expression_and_reason(tmp_path: Path) -> None:
    engine = _engine(tmp_path, "      deviceType: lower(context.device.type)\n")
    rejected = engine.process({**BASE, "messageId": "m", "context": {"device": {"type": 7}}}).rejected
    assert [(r.rule, r.path) for r in rejected] == [("r", "$.deviceType")]
    assert rejected[0].reason.startswith("'lower(context.device.type)' failed: In function lower(), invalid type")


def test_any_key_or_name_is_safe_in_generated_code() -> None:
    key = "a'b\"c\nd\\e"
    text = 'properties."a\'b\\"c\\nd\\\\e" || concat(\'it\\\'s\', `"\\n"`)'
    event = {"properties": {key: "found"}}
    assert jmespath.search(text, event, options=OPTIONS) == "found"
    assert generated(text, False)(event) == "found"
    assert generated(text, False)({"properties": {}}) == jmespath.search(text, {}, options=OPTIONS) == "it's\n"


def test_a_long_first_list_compiles_flat(tmp_path: Path) -> None:
    many = ", ".join(f"properties.k{n}" for n in range(150))  # nested if/else would pass Python's 100 levels
    engine = _engine(tmp_path, f"      resolvedBidId: {{first: [{many}]}}\n")
    event = {**BASE, "messageId": "m", "properties": {"k149": "last", "k3": ""}}
    assert engine.outputs(event)[0]["resolvedBidId"] == "last"
    assert engine.outputs({**event, "properties": {"k3": "third", "k7": "seventh"}})[0]["resolvedBidId"] == "third"
