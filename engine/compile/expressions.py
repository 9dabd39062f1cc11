"""Compile a rule's JMESPath expression once; evaluate it many times."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from . import jmespath_compiler
from .functions import FUNCTIONS
from ..limits import MAX_EXPRESSION_CHARS, MAX_EXPRESSION_DEPTH, encodable

Expression = Callable[[Any], Any]
ExpressionSyntaxError = (jmespath.exceptions.ParseError, jmespath.exceptions.LexerError)
__all__ = ["Expression", "ExpressionSyntaxError", "ExpressionRefused", "JMESPathError", "compile_expression",
           "parse", "resolve_call"]


class ExpressionRefused(jmespath.exceptions.ParseError):
    """An expression beyond :data:`MAX_EXPRESSION_CHARS` or :data:`MAX_EXPRESSION_DEPTH`, refused
    before parsing it could exhaust Python's recursion limit, or holding a literal JSON cannot carry."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(position, "", "limit", message)


def parse(expression: str) -> dict[str, Any]:
    """The syntax tree of ``expression``, refused (:class:`ExpressionRefused`) when it is too
    long or nests too deeply: brackets are counted before parsing, operators after."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionRefused(0, f"longer than {MAX_EXPRESSION_CHARS:,} characters")
    _check_nesting(expression)
    try:
        tree = jmespath.compile(expression).parsed
    except RecursionError:
        raise ExpressionRefused(0, f"nested more than {MAX_EXPRESSION_DEPTH} levels deep") from None
    depth, stack = 0, [(tree, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        if node.get("type") == "literal" and not encodable(node.get("value")):
            raise ExpressionRefused(0, "a literal holds text JSON cannot carry (a lone surrogate)")
        stack.extend((child, level + 1) for child in node.get("children", ()) if isinstance(child, dict))
    if depth > MAX_EXPRESSION_DEPTH:
        raise ExpressionRefused(0, f"nested more than {MAX_EXPRESSION_DEPTH} levels deep (operators"
                                      " such as || and | count too); split it into fields")
    return tree


def _check_nesting(expression: str) -> None:
    """Refuse brackets nested deeper than the limit (quoted text and literals left aside)."""
    depth, quote, escaped = 0, "", False
    for position, char in enumerate(expression):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "'\"`":
            quote = char
        elif char in "([{":
            depth += 1
            if depth > MAX_EXPRESSION_DEPTH:
                raise ExpressionRefused(position, f"brackets nested more than {MAX_EXPRESSION_DEPTH} deep")
        elif char in ")]}":
            depth -= 1


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> Expression:
    """A callable evaluating ``text`` against a document (with the custom functions).

    The expression is compiled to Python closures (:mod:`engine.compile.jmespath_compiler`), which
    give exactly what ``jmespath.search`` gives, several times faster. Raises
    ``jmespath.exceptions.ParseError`` (or ``LexerError``) for bad syntax; the callable raises
    a ``JMESPathError`` for run-time errors such as a wrong argument type. An expression beyond
    the limits (:func:`parse`) raises :class:`ExpressionRefused`, a ``ParseError``.
    """
    parse(text)  # the limits first; jmespath keeps the parse in its cache
    return jmespath_compiler.compile_expression(text, FUNCTIONS)


@lru_cache(maxsize=256)
def resolve_call(name: str, count: int) -> Callable[..., Any] | None:
    """Function ``name`` (built-in or custom) taking ``count`` evaluated arguments, type-checked as
    JMESPath does; None when JMESPath must dispatch it at run time (unknown, wrong arity)."""
    return jmespath_compiler.resolve_function(name, count, FUNCTIONS)


def function_problems(text: str) -> list[str]:
    """Calls to unknown functions, or with the wrong number of arguments, in a valid expression.

    JMESPath itself reports these only when the expression is evaluated; rules check them at load.
    """
    problems: list[str] = []
    _check_calls(parse(text), problems)
    return problems


def _check_calls(node: dict[str, Any], problems: list[str]) -> None:
    if node.get("type") == "function_expression":
        name, given = node["value"], len(node["children"])
        entry = FUNCTIONS.FUNCTION_TABLE.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(FUNCTIONS.FUNCTION_TABLE), n=1)
            problems.append(f"unknown function {name}()" + (f" (did you mean {close[0]}()?)" if close else ""))
        else:
            signature = entry["signature"]
            variadic = bool(signature) and signature[-1].get("variadic", False)
            if given < len(signature) or (given > len(signature) and not variadic):
                expected = f"at least {len(signature)}" if variadic else str(len(signature))
                problems.append(f"{name}() takes {expected} argument(s), {given} given")
    for child in node.get("children", []):
        if isinstance(child, dict):
            _check_calls(child, problems)


def referenced_names(text: str) -> set[str]:
    """Every identifier a valid expression reads (at any depth), plus ``@`` if it uses the current node.

    An over-approximation of what the expression depends on, used to evaluate fields that do
    not depend on a fan-out element once per event instead of once per element.
    """
    names: set[str] = set()
    stack = [parse(text)]
    while stack:
        node = stack.pop()
        if node.get("type") == "field":
            names.add(node["value"])
        elif node.get("type") == "current":
            names.add("@")
        stack.extend(child for child in node.get("children", []) if isinstance(child, dict))
    return names
