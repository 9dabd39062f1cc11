"""Compile JMESPath expressions into nested Python closures.

``jmespath.search`` walks the AST on every call, dispatching each node through a visitor.
:func:`compile_expression` walks it once and turns each node into a closure, so evaluating
an expression is a handful of plain function calls. The semantics are those of the
``jmespath`` package (1.1.0) to the letter: same results and types, same truthiness, same
comparison quirks, same exceptions with the same messages. The compliance and differential
tests hold it to that.

Every closure is pure: it captures only immutable compile-time data and copies mutable
literals on each call, so one compiled expression may be used from many threads at once.

One cohesive thing (one compiler over JMESPath's AST, node by node), hence over 350 lines.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from numbers import Number
from types import MethodType
from typing import Any

import jmespath.functions
from jmespath.parser import Parser

_Evaluate = Callable[[Any], Any]
_Node = dict[str, Any]

_CHAIN_NODES = frozenset({"subexpression", "pipe", "index_expression"})
_NOOP_NODES = frozenset({"identity", "current"})
_ORDERING = {"lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge}
_SCALARS = (str, int, float, bool, type(None))
_COMPARABLE_TYPES = frozenset({str, int, float})
_BUILTINS = jmespath.functions.Functions
_NO_SHORTCUT = object()
# The methods through which jmespath's Functions.call_function checks and dispatches a call;
# functions are resolved at compile time only where none of them is overridden.
_DISPATCH_METHODS = (
    "call_function",
    "_validate_arguments",
    "_type_check",
    "_type_check_single",
    "_get_allowed_pytypes",
    "_subtype_check",
)


def compile_expression(expression: str, functions: jmespath.functions.Functions) -> _Evaluate:
    """Parse ``expression`` once and compile it into a callable evaluating it against a document.

    ``compile_expression(e, f)(doc)`` returns (or raises) exactly what
    ``jmespath.search(e, doc, options=jmespath.Options(custom_functions=f))`` does.
    Parse errors are the parser's own (``ParseError``, ``LexerError``, ...), raised here.
    Functions are looked up in ``functions.FUNCTION_TABLE`` at compile time (unless
    ``functions`` overrides jmespath's dispatch, which then runs on every call); an unknown
    function or a wrong argument count still raises only when evaluated, as in jmespath.
    """
    return _Compiler(functions).compile(Parser().parse(expression).parsed)



def resolve_function(
    name: str, count: int, functions: jmespath.functions.Functions
) -> Callable[..., Any] | None:
    """The function ``name`` of ``functions`` as a plain callable of ``count`` evaluated arguments
    (type checks included, same errors as jmespath), or None where jmespath's dispatch must run."""
    return _Compiler(functions).resolve_function(name, count)


class _Expression:
    """The value of ``&expr``. jmespath's functions call ``visit(expression, value)`` on it
    (always with its own ``expression``) and their type checks know it by this class name."""

    __slots__ = ("expression", "_evaluate")

    def __init__(self, expression: _Node, evaluate: _Evaluate) -> None:
        self.expression = expression
        self._evaluate = evaluate

    def visit(self, node: _Node, value: Any) -> Any:
        return self._evaluate(value)


# The types jmespath's type checks know by name (they compare ``type(x).__name__``).
_NAMED_TYPES = {
    kind.__name__: kind for kind in (str, int, float, bool, list, dict, type(None), _Expression)
}


class _Compiler:
    """Turns AST nodes into closures: one ``_<node type>`` method per kind of node."""

    def __init__(self, functions: jmespath.functions.Functions) -> None:
        self._functions = functions
        self._resolve_at_compile_time = all(
            getattr(type(functions), method) is getattr(_BUILTINS, method)
            and method not in vars(functions)
            for method in _DISPATCH_METHODS
        )

    def compile(self, node: _Node) -> _Evaluate:
        kind = node["type"]
        if kind in _CHAIN_NODES:
            return self._chain(node)
        return getattr(self, "_" + kind)(node)

    # -- sequences: a.b, a | b, a[0] -------------------------------------------------------------

    def _chain(self, node: _Node) -> _Evaluate:
        """Subexpressions, pipes and index expressions all feed each step the previous result;
        flatten nested ones, drop ``@`` steps and fuse runs of field lookups."""
        steps: list[_Evaluate] = []
        fields: list[str] = []
        for child in chain_links(node):
            if child["type"] == "field":
                fields.append(child["value"])
                continue
            if fields:
                steps.append(_fields(fields))
                fields = []
            steps.append(self.compile(child))
        if fields:
            steps.append(_fields(fields))
        return _compose(steps)

    def _field(self, node: _Node) -> _Evaluate:
        return _fields([node["value"]])

    def _identity(self, node: _Node) -> _Evaluate:
        return _unchanged

    _current = _identity

    def _literal(self, node: _Node) -> _Evaluate:
        value = node["value"]
        if isinstance(value, _SCALARS):
            return lambda _: value
        return lambda _: _copy(value)

    def _index(self, node: _Node) -> _Evaluate:
        index = node["value"]

        def evaluate(value: Any) -> Any:
            if not isinstance(value, list):
                return None
            try:
                return value[index]
            except IndexError:
                return None

        return evaluate

    def _slice(self, node: _Node) -> _Evaluate:
        bounds = slice(*node["children"])
        return lambda value: value[bounds] if isinstance(value, list) else None

    # -- projections -----------------------------------------------------------------------------

    def _projection(self, node: _Node) -> _Evaluate:
        base, each = self.compile(node["children"][0]), self.compile(node["children"][1])

        def evaluate(value: Any) -> Any:
            items = base(value)
            if not isinstance(items, list):
                return None
            return _collect(each, items)

        return evaluate

    def _value_projection(self, node: _Node) -> _Evaluate:
        base, each = self.compile(node["children"][0]), self.compile(node["children"][1])

        def evaluate(value: Any) -> Any:
            items = base(value)
            try:
                items = items.values()
            except AttributeError:
                return None
            return _collect(each, items)

        return evaluate

    def _filter_projection(self, node: _Node) -> _Evaluate:
        base, each, condition = (self.compile(child) for child in node["children"])

        def evaluate(value: Any) -> Any:
            items = base(value)
            if not isinstance(items, list):
                return None
            collected = []
            for item in items:
                matched = condition(item)
                if matched is True or not is_false(matched):
                    result = each(item)
                    if result is not None:
                        collected.append(result)
            return collected

        return evaluate

    def _flatten(self, node: _Node) -> _Evaluate:
        base = self.compile(node["children"][0])

        def evaluate(value: Any) -> Any:
            items = base(value)
            if not isinstance(items, list):
                return None
            merged: list[Any] = []
            for item in items:
                if isinstance(item, list):
                    merged.extend(item)
                else:
                    merged.append(item)
            return merged

        return evaluate

    # -- multi-selects ---------------------------------------------------------------------------

    def _multi_select_list(self, node: _Node) -> _Evaluate:
        parts = tuple(self.compile(child) for child in node["children"])
        return lambda value: None if value is None else [part(value) for part in parts]

    def _multi_select_dict(self, node: _Node) -> _Evaluate:
        parts = tuple((child["value"], self.compile(child)) for child in node["children"])
        return lambda value: None if value is None else {key: part(value) for key, part in parts}

    def _key_val_pair(self, node: _Node) -> _Evaluate:
        return self.compile(node["children"][0])

    # -- logic and comparisons -------------------------------------------------------------------

    def _or_expression(self, node: _Node) -> _Evaluate:
        left, right = (self.compile(child) for child in node["children"])

        def evaluate(value: Any) -> Any:
            result = left(value)
            return right(value) if is_false(result) else result

        return evaluate

    def _and_expression(self, node: _Node) -> _Evaluate:
        left, right = (self.compile(child) for child in node["children"])

        def evaluate(value: Any) -> Any:
            result = left(value)
            return result if is_false(result) else right(value)

        return evaluate

    def _not_expression(self, node: _Node) -> _Evaluate:
        operand = self.compile(node["children"][0])

        def evaluate(value: Any) -> bool:
            result = operand(value)
            if _is_number(result) and result == 0:
                return False
            return not result

        return evaluate

    def _comparator(self, node: _Node) -> _Evaluate:
        left_node, right_node = node["children"]
        left, right = self.compile(left_node), self.compile(right_node)
        kind = node["value"]
        if kind in ("eq", "ne"):
            negate = kind == "ne"
            if right_node["type"] == "literal" and _compares_plainly(right_node["value"]):
                constant = right_node["value"]
                if negate:
                    return lambda value: not left(value) == constant
                return lambda value: left(value) == constant
            if negate:
                return lambda value: not _equals(left(value), right(value))
            return lambda value: _equals(left(value), right(value))
        ordering = _ORDERING[kind]
        if right_node["type"] == "literal" and _is_comparable(right_node["value"]):
            bound = right_node["value"]

            def evaluate_against_literal(value: Any) -> bool | None:
                first = left(value)
                if type(first) in _COMPARABLE_TYPES or _is_comparable(first):
                    return ordering(first, bound)
                return None

            return evaluate_against_literal

        def evaluate(value: Any) -> bool | None:
            first, second = left(value), right(value)
            if not (_is_comparable(first) and _is_comparable(second)):
                return None
            return ordering(first, second)

        return evaluate

    # -- functions -------------------------------------------------------------------------------

    def _expref(self, node: _Node) -> _Evaluate:
        expression = node["children"][0]
        evaluate = self.compile(expression)
        return lambda _: _Expression(expression, evaluate)

    def _function_expression(self, node: _Node) -> _Evaluate:
        name = node["value"]
        args = tuple(self.compile(child) for child in node["children"])
        functions = self._functions
        call = self.resolve_function(name, len(args))
        if call is None:
            # jmespath's own dispatch raises the unknown-function or arity error (only when
            # evaluated, after the arguments), or runs an overridden dispatch.
            return lambda value: functions.call_function(name, [arg(value) for arg in args])
        if len(args) == 1:
            (arg,) = args
            return lambda value: call(arg(value))
        return lambda value: call(*[arg(value) for arg in args])

    def resolve_function(self, name: str, count: int) -> Callable[..., Any] | None:
        """The function ``name`` called with ``count`` evaluated arguments, type checks included,
        or None where it cannot be resolved at compile time (unknown, wrong arity, overridden
        dispatch); the call raises exactly what jmespath's dispatch would raise."""
        functions = self._functions
        spec = functions.FUNCTION_TABLE.get(name) if self._resolve_at_compile_time else None
        if spec is None or not _arity_matches(spec["signature"], count):
            return None
        function = MethodType(spec["function"], functions)
        checks = tuple(
            (position, _type_check(functions, name, parameter["types"]))
            for position, parameter in enumerate(spec["signature"])
            if parameter["types"]
        )
        if not checks:
            shortcut = _SHORTCUTS.get(name)
            if count == 1 and shortcut is not None and spec["function"] is getattr(_BUILTINS, "_func_" + name):
                return _with_shortcut(shortcut, function)
            return function
        if count == 1:
            check = checks[0][1]

            def call_one(value: Any) -> Any:
                check(value)
                return function(value)

            return call_one

        def call(*resolved: Any) -> Any:
            for position, check in checks:
                check(resolved[position])
            return function(*resolved)

        return call


# -- helpers ------------------------------------------------------------------------------------


def _unchanged(value: Any) -> Any:
    return value


def chain_links(node: _Node) -> list[_Node]:
    """The steps of a (possibly nested) chain of ``.``, ``|`` and ``[]``, in order, without no-op ``@`` steps."""
    links: list[_Node] = []
    for child in node["children"]:
        if child["type"] in _CHAIN_NODES:
            links.extend(chain_links(child))
        elif child["type"] not in _NOOP_NODES:
            links.append(child)
    return links


def _compose(steps: list[_Evaluate]) -> _Evaluate:
    if not steps:
        return _unchanged
    if len(steps) == 1:
        return steps[0]
    if len(steps) == 2:
        first, second = steps
        return lambda value: second(first(value))
    sequence = tuple(steps)

    def evaluate(value: Any) -> Any:
        for step in sequence:
            value = step(value)
        return value

    return evaluate


def _collect(each: _Evaluate, items: Iterable[Any]) -> list[Any]:
    """A projection's results: ``each`` of the items, nulls left out."""
    if each is _unchanged:
        return [item for item in items if item is not None]
    collected = []
    for item in items:
        result = each(item)
        if result is not None:
            collected.append(result)
    return collected


def _fields(names: list[str]) -> _Evaluate:
    """``a.b.c`` as one closure: ``.get`` down the chain, null as soon as a value has no ``.get``
    (jmespath's field rule; once null, every further lookup stays null)."""
    if len(names) == 1:
        (name,) = names

        def evaluate_one(value: Any) -> Any:
            try:
                return value.get(name)
            except AttributeError:
                return None

        return evaluate_one
    if len(names) == 2:
        first, second = names

        def evaluate_two(value: Any) -> Any:
            try:
                return value.get(first).get(second)
            except AttributeError:
                return None

        return evaluate_two
    path = tuple(names)

    def evaluate(value: Any) -> Any:
        try:
            for name in path:
                value = value.get(name)
        except AttributeError:
            return None
        return value

    return evaluate


def _with_shortcut(shortcut: _Evaluate, function: _Evaluate) -> _Evaluate:
    def call(value: Any) -> Any:
        result = shortcut(value)
        return function(value) if result is _NO_SHORTCUT else result

    return call


def _to_string_shortcut(value: Any) -> Any:
    """``to_string`` of a string, an int or a finite float (``json.dumps`` gives their repr)."""
    kind = type(value)
    if kind is str:
        return value
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)
    return _NO_SHORTCUT


# Unchecked one-argument built-ins with a fast path for common values: it gives the function's
# own result, or _NO_SHORTCUT to let the function run. Used only where not overridden.
_SHORTCUTS: dict[str, _Evaluate] = {"to_string": _to_string_shortcut}


def _copy(value: Any) -> Any:
    """A fresh copy of a JSON literal, so callers may mutate what an expression returns."""
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return value


def is_false(value: Any) -> bool:
    """JMESPath falsiness: ``""``, ``[]``, ``{}``, null and false (never a number)."""
    kind = type(value)
    if kind is str or kind is list or kind is dict or kind is bool or value is None:
        return not value
    if kind is int or kind is float:
        return False
    return value == "" or value == [] or value == {}


def _is_number(value: Any) -> bool:
    """A number that is not a bool (Python counts ``True`` as the int 1)."""
    kind = type(value)
    if kind is int or kind is float:
        return True
    return kind is not bool and isinstance(value, Number)


def _is_comparable(value: Any) -> bool:
    return isinstance(value, str) or _is_number(value)


def _equals(left: Any, right: Any) -> bool:
    """``==`` except that the numbers 0 and 1 never equal a boolean."""
    if type(left) is bool:
        if _is_number(right) and right in (0, 1):
            return False
    elif type(right) is bool and _is_number(left) and left in (0, 1):
        return False
    return left == right


def _compares_plainly(constant: Any) -> bool:
    """Whether ``_equals(x, constant)`` is simply ``x == constant`` for every ``x``."""
    return not isinstance(constant, bool) and not (_is_number(constant) and constant in (0, 1))


def _arity_matches(signature: tuple[dict[str, Any], ...], count: int) -> bool:
    if signature and signature[-1].get("variadic"):
        return count >= len(signature)
    return count == len(signature)


def _type_check(
    functions: jmespath.functions.Functions, name: str, types: list[str]
) -> Callable[[Any], None]:
    """A checker for one argument: accepts on a fast path what jmespath surely accepts and hands
    anything else to jmespath's own check, which raises its exact error (or accepts)."""
    allowed, subtypes = functions._get_allowed_pytypes(types)
    accepted = _types_named(allowed)
    element_groups = tuple(_types_named(group) for group in subtypes)

    def elements_accepted(items: list[Any]) -> bool:
        if not items:
            return True
        first = type(items[0])
        for group in element_groups:
            if first in group:
                for item in items:
                    if type(item) not in group:
                        return False
                return True
        return False

    def check(value: Any) -> None:
        if type(value) in accepted and (
            not element_groups or (type(value) is list and elements_accepted(value))
        ):
            return
        functions._type_check_single(value, types, name)

    return check


def _types_named(names: Iterable[str]) -> frozenset[type]:
    return frozenset(_NAMED_TYPES[name] for name in names if name in _NAMED_TYPES)
