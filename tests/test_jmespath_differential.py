"""Property-based differential tests: compiled expressions against ``jmespath.search``.

Random JSON documents meet realistic rule expressions and randomly generated ones; the
compiled callable must return the same value (type-strict, key order included) or raise the
same exception type with the same message.
"""

from __future__ import annotations

from typing import Any

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.compile.functions import FUNCTIONS, EngineFunctions
from engine.compile.jmespath_compiler import compile_expression

from .jmespath_outcomes import outcome

KEYS = ["properties", "products", "price", "quantity", "name", "sku", "event", "type", "a", "b"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 2.5]),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from(["", "a", "B", "10", "1.5", "-3", "x y", "Product Added"]),
    st.text(max_size=5),
)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    max_leaves=25,
)
product_keys = ["price", "quantity", "name", "sku"]
product = st.fixed_dictionaries({key: scalars for key in product_keys}) | st.dictionaries(
    st.sampled_from(product_keys), scalars
)
events = st.fixed_dictionaries(
    {
        "event": scalars,
        "type": scalars,
        "properties": st.fixed_dictionaries(
            {"products": st.lists(product, max_size=4) | documents},
            optional={"price": scalars, "name": scalars, "quantity": scalars, "a": documents},
        ),
    },
    optional={"a": documents, "b": documents},
)

RULES = [
    "event",
    "properties.price",
    "properties.products[*].price",
    "properties.products[0].sku",
    "properties.products[-1]",
    "properties.products[1:3].name",
    "properties.products[::-1].sku",
    "properties.products[?price > `10`].sku",
    "properties.products[?quantity >= `1` && price < `100`]",
    "properties.products[?name == 'a' || sku != `null`].name",
    "properties.products[?!price]",
    "properties.products[?quantity].sku",
    "properties.products[?price == quantity]",
    "properties.products[?quantity != `false`]",
    "`true` == properties.price",
    "properties.products[?price == `1`]",
    "properties.products[?price == `true`]",
    "properties.products[?contains(['a', 'B'], name)]",
    "properties.price || properties.products[0].price || `0`",
    "properties.price && properties.name",
    "type == 'track' && event == 'Product Added'",
    "properties.price > properties.quantity",
    "properties.price <= `2.5`",
    "a == b",
    "a != b",
    "!a",
    "length(properties.products)",
    "length(properties.name)",
    "to_string(properties.price)",
    "to_string(a)",
    "to_number(properties.price)",
    "to_number(properties.name)",
    "join(', ', properties.products[*].name)",
    "join('-', [event, type])",
    "merge(properties, `{\"currency\": \"USD\"}`)",
    "merge(a, b)",
    "sort_by(properties.products, &price)",
    "sort_by(properties.products, &name)[0].sku",
    "max_by(properties.products, &price).sku",
    "min_by(properties.products, &quantity)",
    "sum(properties.products[*].price)",
    "avg(properties.products[*].price)",
    "max(properties.products[*].name)",
    "sort(properties.products[*].price)",
    "keys(properties)",
    "values(a)",
    "type(a)",
    "not_null(properties.sku, properties.name, `\"none\"`)",
    "abs(properties.price)",
    "floor(properties.price)",
    "map(&price, properties.products)",
    "reverse(a)",
    "starts_with(event, 'Product')",
    "properties.products[].price",
    "a[]",
    "a[][]",
    "a.*",
    "a.*.b",
    "a[*].b[0]",
    "[event, properties.price, properties.products[0].name]",
    "{id: properties.products[0].sku, qty: properties.quantity, kind: type}",
    "properties.products | [0]",
    "properties.products[*].price | max(@)",
    "a.b.price | to_string(@)",
    "@",
    "`[1, {\"x\": null}]`",
    "lower(properties.name)",
    "upper(event)",
    "concat(event, '-', properties.price)",
    "concat(properties.name)",
    "stringify_values(properties)",
    "stringify_values(properties.products[0])",
    "lower(`1`)",
    "unknown_fn(event)",
    "length(a, b)",
    "not_null()",
    "merge()",
]

OPTIONS = jmespath.Options(custom_functions=FUNCTIONS)
COMPILED = {expression: compile_expression(expression, FUNCTIONS) for expression in RULES}


def assert_same(
    expression: str, document: Any, compiled: Any, options: jmespath.Options = OPTIONS
) -> None:
    expected = outcome(lambda: jmespath.search(expression, document, options=options))
    assert outcome(lambda: compiled(document)) == expected, (expression, document)


@settings(max_examples=300, deadline=None)
@given(events)
def test_rule_expressions_on_events(document: Any) -> None:
    for expression, compiled in COMPILED.items():
        assert_same(expression, document, compiled)


@settings(max_examples=150, deadline=None)
@given(documents)
def test_rule_expressions_on_any_document(document: Any) -> None:
    for expression, compiled in COMPILED.items():
        assert_same(expression, document, compiled)


# -- random expressions from a small grammar ----------------------------------------------------

identifiers = st.sampled_from(KEYS)
literals = st.sampled_from(
    ["`0`", "`1`", "`2.5`", "`-1`", "`true`", "`false`", "`null`", "'a'", "''", "`[1, 2]`",
     '`{"a": 1}`']
)  # fmt: skip
unary_functions = st.sampled_from(
    ["length", "to_string", "to_number", "type", "keys", "values", "abs", "sort", "max", "sum",
     "to_array", "reverse", "lower", "upper", "stringify_values", "not_null"]
)  # fmt: skip
binary_functions = st.sampled_from(["merge", "concat", "contains", "join", "not_null"])
by_functions = st.sampled_from(["sort_by", "max_by", "min_by"])
comparators = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
connectives = st.sampled_from(["||", "&&", "|"])
slices = st.sampled_from(["1:", ":2", "::-1", "0:3:2", "::0"])
projections = st.sampled_from(["[*]", "[]", ".*"])


def _compound(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """One grammar rule applied to smaller expressions (parenthesised, so any nesting parses)."""
    operand = inner | literals
    rules = [
        ("({}).{}", inner, identifiers),
        ("({})[{}]", inner, st.integers(-3, 3)),
        ("({})[{}]", inner, slices),
        ("({}){}.{}", inner, projections, identifiers),
        ("({})[?{} {} {}]", inner, inner, comparators, operand),
        ("({})[?{}]", inner, inner),
        ("({}) {} ({})", inner, comparators, operand),
        ("({}) {} ({})", inner, connectives, inner),
        ("!({})", inner),
        ("{}({})", unary_functions, inner),
        ("{}({}, {})", binary_functions, inner, inner),
        ("{}({}, &{})", by_functions, inner, identifiers),
        ("map(&{}, {})", identifiers, inner),
        ("[{}, {}]", inner, operand),
        ("{{{}: {}, k: @}}", identifiers, inner),
    ]
    return st.one_of(
        st.tuples(*parts).map(lambda values, template=template: template.format(*values))
        for template, *parts in rules
    )


expressions = st.recursive(identifiers | literals | st.just("@"), _compound, max_leaves=8)


@settings(max_examples=1000, deadline=None)
@given(expressions, documents)
def test_generated_expressions(expression: str, document: Any) -> None:
    compiled = compile_expression(expression, FUNCTIONS)
    assert_same(expression, document, compiled)


# -- syntax errors, purity, custom dispatch ----------------------------------------------------


@pytest.mark.parametrize(
    "expression", ["properties.[", "a[?b ==]", "foo(", "a[1:2:3:4]", '"unclosed', "~", ""]
)
def test_syntax_errors_are_the_parsers_raised_at_compile_time(expression: str) -> None:
    with pytest.raises(jmespath.exceptions.JMESPathError) as reference:
        jmespath.compile(expression)
    with pytest.raises(type(reference.value)) as raised:
        compile_expression(expression, FUNCTIONS)
    assert str(raised.value) == str(reference.value)
    for attribute in ("lex_position", "token_value", "msg"):
        assert getattr(raised.value, attribute, None) == getattr(reference.value, attribute, None)


def test_literals_are_fresh_on_every_call() -> None:
    compiled = compile_expression('[`{"a": [1]}`, `[[2]]`]', FUNCTIONS)
    first = compiled({})
    first[0]["a"].append(3)
    first[1][0].append(4)
    assert compiled({}) == [{"a": [1]}, [[2]]]


class _RenamingDispatch(EngineFunctions):
    """Overrides ``call_function``, so compile-time resolution must step aside."""

    def call_function(self, function_name: str, resolved_args: list[Any]) -> Any:
        if function_name == "shout":
            function_name = "upper"
        return super().call_function(function_name, resolved_args)


@settings(max_examples=50, deadline=None)
@given(events)
def test_overridden_dispatch_is_honoured(document: Any) -> None:
    functions = _RenamingDispatch()
    options = jmespath.Options(custom_functions=functions)
    for expression in ["shout(event)", "shout(lower(type))", "length(a)", "nope(@)"]:
        assert_same(expression, document, compile_expression(expression, functions), options)
