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

Expression = Callable[[Any], Any]
ExpressionSyntaxError = (jmespath.exceptions.ParseError, jmespath.exceptions.LexerError)
__all__ = ["Expression", "ExpressionSyntaxError", "JMESPathError", "compile_expression", "resolve_call"]


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> Expression:
    """A callable evaluating ``text`` against a document (with the custom functions).

    The expression is compiled to Python closures (:mod:`engine.jmespath_compiler`), which
    give exactly what ``jmespath.search`` gives, several times faster. Raises
    ``jmespath.exceptions.ParseError`` (or ``LexerError``) for bad syntax; the callable raises
    a ``JMESPathError`` for run-time errors such as a wrong argument type.
    """
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
    _check_calls(jmespath.compile(text).parsed, problems)
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
    stack = [jmespath.compile(text).parsed]
    while stack:
        node = stack.pop()
        if node.get("type") == "field":
            names.add(node["value"])
        elif node.get("type") == "current":
            names.add("@")
        stack.extend(child for child in node.get("children", []) if isinstance(child, dict))
    return names
