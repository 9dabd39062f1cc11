"""Generate the Python source of a rule's mapping, compile it once, call it for every event.

The field specs of a rule (see :mod:`engine.compile.fields`) each turn into a few lines of straight
Python instead of a tree of closures: plain JMESPath paths (``a.b.c``, the large majority)
become ``dict.get`` chains whose common prefixes are looked up once, function calls whose
arguments are paths or literals call the function directly, ``||``, ``&&`` and ``!`` are
inlined, and anything else calls the expression's compiled closure. The generated code does
what the closures would do, value for value; the tests hold it to the JMESPath reference and to
Segment's behaviour.

A fragment of code is an :data:`Emit`: given a :class:`Writer` and the :class:`Scope` it is
evaluated in, it writes statements and returns the name of the local holding its value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jmespath.exceptions import JMESPathError

from .expressions import ExpressionSyntaxError, parse, resolve_call
from .jmespath_compiler import chain_links, is_false

Emit = Callable[["Writer", "Scope"], str]
_INDENT = "    "


class Writer:
    """The source of one generated function: lines, fresh local names, bound constants, and the
    paths already looked up in the block being written (so each is looked up once)."""

    def __init__(self, namespace: dict[str, Any] | None = None) -> None:
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {"_get": _get, **(namespace or {})}
        self._depth = 1
        self._count = 0
        self._known: list[dict[tuple[str, str], str]] = [{}]

    def local(self, initial: str | None = None) -> str:
        """A fresh local variable name; with ``initial``, a line assigning it that code first."""
        self._count += 1
        name = f"_v{self._count}"
        if initial is not None:
            self.line(f"{name} = {initial}")
        return name

    def bind(self, value: Any) -> str:
        """The name under which the generated code sees ``value`` (a constant or a function)."""
        name = f"_k{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def line(self, text: str) -> None:
        self.lines.append(_INDENT * self._depth + text)

    @contextmanager
    def block(self, header: str, *, always_completes: bool = False) -> Iterator[int]:
        """Lines written inside are indented under ``header``; paths looked up inside stay inside,
        unless the block ``always_completes`` when the code after it runs (a ``try:`` whose
        handler leaves).

        Yields the position of the block's first line (see :meth:`insert`).
        """
        self.line(header)
        self._depth += 1
        if not always_completes:
            self._known.append(dict(self._known[-1]))
        try:
            yield len(self.lines)
        finally:
            if not always_completes:
                self._known.pop()
            self._depth -= 1

    def insert(self, position: int, depth: int, text: str) -> None:
        """Insert a line at ``position`` (a block's first line, known only once the block is written)."""
        self.lines.insert(position, _INDENT * depth + text)

    @property
    def depth(self) -> int:
        return self._depth

    def lookup(self, value: str, key: str) -> str:
        """A local holding ``value.get(key)`` by JMESPath's field rule (null unless an object)."""
        return self._remember(value, key, f"{value}.get({key!r}) if {value}.__class__ is dict else _get({value}, {key!r})")

    def root_lookup(self, context: str, key: str) -> str:
        """A local holding ``context.get(key)``, where ``context`` is known to be a dict."""
        return self._remember(context, key, f"{context}.get({key!r})")

    def _remember(self, value: str, key: str, code: str) -> str:
        known = self._known[-1].get((value, key))
        if known is None:
            known = self.local()
            self.line(f"{known} = {code}")
            self._known[-1][(value, key)] = known
        return known

    def function(self, name: str, parameters: str) -> Callable[..., Any]:
        """Compile the lines written so far as the body of ``def name(parameters)``."""
        source = f"def {name}({parameters}):\n" + "\n".join(self.lines) + "\n"
        code = compile(source, f"<rule mapping {name}>", "exec")
        exec(code, self.namespace)
        function = self.namespace[name]
        function.__source__ = source
        return function


class Scope:
    """Where names resolve: the event, or inside ``each`` one element (``item``) and its ``index``.

    ``context()`` gives a local holding the whole context as a dict (the event, or the
    event plus the element and index), for expressions that are not plain paths; inside an
    element it is built only when some expression asks for it.
    """

    def __init__(self, context: str, parent: Scope | None = None, bound: dict[str, str] | None = None) -> None:
        self._context = context
        self._parent = parent
        self._bound = bound or {}
        self._wanted = False
        self._position = 0
        self._depth = 0

    def element(self, writer: Writer, item: str, element: str, index: str, position: int) -> Scope:
        """The scope of one element of an ``each`` loop whose body starts at ``position``."""
        scope = Scope(writer.local(), self, {item: element, "index": index})
        scope._position, scope._depth = position, writer.depth
        return scope

    def name(self, writer: Writer, name: str) -> str:
        """A local holding the value of the identifier ``name`` here."""
        if name in self._bound:
            return self._bound[name]
        if self._parent is not None:
            return self._parent.name(writer, name)
        return writer.root_lookup(self._context, name)

    def context(self) -> str:
        """A local holding the whole context as a dict (see the class docstring)."""
        if self._parent is not None:
            self._wanted = True
        return self._context

    def close(self, writer: Writer) -> None:
        """At the end of the element's block: build the context dict at its start if it was used."""
        if not self._wanted or self._parent is None:
            return
        pairs = ", ".join(f"{name!r}: {local}" for name, local in self._bound.items())
        parent = self._parent.context()
        writer.insert(self._position, self._depth, f"{self._context} = {{**{parent}, {pairs}}}")


def expression(text: str, evaluate: Callable[[Any], Any], failure: Callable[[JMESPathError], Exception]) -> Emit:
    """The fragment computing JMESPath ``text``: inlined where it is made of paths, literals and
    function calls; otherwise a call of ``evaluate``, its compiled closure. Where the inlined
    code raises a JMESPath error, it raises ``failure(error)`` instead, as ``evaluate`` does."""
    try:
        node = parse(text)
    except ExpressionSyntaxError:
        node = None
    if node is None or not _inlinable(node):

        def call(writer: Writer, scope: Scope) -> str:
            return writer.local(f"{writer.bind(evaluate)}({scope.context()})")

        return call

    def inline(writer: Writer, scope: Scope) -> str:
        if not _raises(node):
            return _inline(node, writer, scope)
        with writer.block("try:", always_completes=True):
            value = _inline(node, writer, scope)
        with writer.block(f"except {writer.bind(JMESPathError)} as _exc:"):
            writer.line(f"raise {writer.bind(failure)}(_exc) from None")
        return value

    return inline


def _inlinable(node: dict[str, Any]) -> bool:
    kind = node["type"]
    if kind == "field":
        return True
    if kind in ("subexpression", "pipe"):
        links = chain_links(node)
        return bool(links) and all(link["type"] == "field" for link in links)
    if kind == "literal":
        return isinstance(node["value"], (str, int, float, bool, type(None)))
    if kind == "function_expression":
        return resolve_call(node["value"], len(node["children"])) is not None and all(
            map(_inlinable, node["children"])
        )
    if kind in ("or_expression", "and_expression", "not_expression"):
        return all(map(_inlinable, node["children"]))
    return False


def _raises(node: dict[str, Any]) -> bool:
    return node["type"] == "function_expression" or any(map(_raises, node.get("children", ())))


def _inline(node: dict[str, Any], writer: Writer, scope: Scope) -> str:
    kind = node["type"]
    if kind == "field":
        return scope.name(writer, node["value"])
    if kind in ("subexpression", "pipe"):
        first, *rest = chain_links(node)
        value = scope.name(writer, first["value"])
        for link in rest:
            value = writer.lookup(value, link["value"])
        return value
    if kind == "literal":
        return writer.bind(node["value"])
    if kind in ("or_expression", "and_expression"):
        return _logic(node, writer, scope)
    if kind == "not_expression":  # JMESPath's !x: x is false (0 is not)
        return writer.local(f"{writer.bind(is_false)}({_inline(node['children'][0], writer, scope)})")
    call = resolve_call(node["value"], len(node["children"]))
    arguments = [_inline(child, writer, scope) for child in node["children"]]
    return writer.local(f"{writer.bind(call)}({', '.join(arguments)})")


def _logic(node: dict[str, Any], writer: Writer, scope: Scope) -> str:
    """``a || b`` (``b`` unless ``a`` is true) and ``a && b`` (``a`` unless ``a`` is true), where
    the right side is evaluated only when it is the result."""
    left, right = node["children"]
    value = _inline(left, writer, scope)
    result = writer.local()
    holds = f"{value} or not {writer.bind(is_false)}({value})"
    with writer.block(f"if {holds}:" if node["type"] == "or_expression" else f"if not ({holds}):"):
        writer.line(f"{result} = {value}")
    with writer.block("else:"):
        writer.line(f"{result} = {_inline(right, writer, scope)}")
    return result


def _get(value: Any, key: str) -> Any:
    """JMESPath's field rule for a value that is not a plain dict: null, unless it has ``.get``."""
    if value.__class__ in _WITHOUT_GET:
        return None
    try:
        return value.get(key)
    except AttributeError:
        return None


_WITHOUT_GET = frozenset((type(None), str, int, float, bool, list))
