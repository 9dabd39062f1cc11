"""Compile a rule's ``fields`` into one function from a Segment event to a Topsort event.

A field is a JMESPath expression, a *spec* (a mapping with spec keys, below), or a nested
mapping of fields. Spec keys, applied in this order:

``if``       the field is present only when this expression is truthy
``each``     make an array: everything below is applied to each element of this expression,
             which is bound as ``item`` (or the name in ``item:``), its position as ``index``
``from`` | ``const`` | ``first`` | ``merge`` | ``fields``
             where the value comes from (exactly one; ``each`` alone takes the element itself)
``lookup``   replace the value by its entry in this table (no entry: null)
``as``       coerce to string, number, integer, boolean or datetime
``default``  used when the value is null

Every value is then fitted to its place in the Topsort schema (see :mod:`engine.topsort.conform`);
null values and, at the top level, empty strings are left out.

One cohesive thing (the field spec language, compiled), hence over 350 lines.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import orjson
from jmespath.exceptions import JMESPathError

from ..errors import FieldError
from . import codegen
from .codegen import Emit, Scope, Writer
from ..topsort.coercion import COERCIONS
from ..topsort.conform import conformer, native_type
from .jmespath_compiler import is_false
from .expressions import ExpressionSyntaxError, compile_expression, function_problems, referenced_names
from ..outcome import KINDS
from ..topsort.schema import SchemaNode, needs, topsort_schema


Evaluate = Callable[[Any], Any]
Report = Callable[..., None]
Path_ = tuple[str | int, ...]
"""Where a field is in its rule's YAML document (as :mod:`engine.rules.yaml_source` keys positions)."""

SOURCES = ("from", "const", "first", "merge", "fields")
SPEC_KEYS = frozenset((*SOURCES, "each", "item", "if", "lookup", "default", "as"))
DEFAULT_ITEM = "item"
LOOKUP_KEYS = (str, int, float, bool)
"""The types a ``lookup`` table's keys may match (anything else is a miss)."""


class Output(NamedTuple):
    """One output of a rule for one event, before validation; ``item`` is its fan-out index."""

    item: int | None
    event: dict[str, Any] | None = None
    error: FieldError | None = None


class Leaf:
    """One top-level output field, kept for ``explain``: its path, its spec and its code."""

    def __init__(self, path: str, spec: Any, emit: Emit) -> None:
        self.path = path
        self.spec = spec
        self.emit = emit

    @cached_property
    def evaluate(self) -> Evaluate:
        """The field's value in a context (the event, or an element context of a fan-out)."""
        writer = Writer()
        writer.line(f"return {self.emit(writer, Scope('ctx'))}")
        return writer.function("leaf", "ctx")


def is_spec(value: Any) -> bool:
    return isinstance(value, dict) and not SPEC_KEYS.isdisjoint(value)


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, and empty strings, arrays and objects are false."""
    return not is_false(value)


def compile_expression_at(text: str, ypath: Path_, field: str, report: Report) -> Evaluate:
    """Compile one expression of a rule file; report syntax and function errors where they are.

    The function raises :class:`FieldError` (naming ``field``) where the expression fails.
    """
    try:
        compiled = compile_expression(text)
    except ExpressionSyntaxError as exc:
        position = getattr(exc, "lex_position", None)
        shown = repr(text) if len(text) <= 120 else f"{text[:100]!r}… ({len(text):,} characters)"
        report(ypath, f"invalid JMESPath {shown}: {_syntax_reason(exc)}", field=field, offset=position)
        return _nothing
    for problem in function_problems(text):
        report(ypath, f"in {text!r}: {problem}", field=field)
    failure = _failure(field, text)

    def evaluate(context: Any) -> Any:
        try:
            return compiled(context)
        except JMESPathError as exc:
            raise failure(exc) from None

    return evaluate


def expression_at(text: str, ypath: Path_, field: str, report: Report) -> Emit:
    """Like :func:`compile_expression_at`, as a fragment of generated code."""
    return fragment(text, compile_expression_at(text, ypath, field, report), field)


def fragment(text: str, evaluate: Evaluate, field: str) -> Emit:
    """The generated code of expression ``text``, compiled to ``evaluate`` for ``field``."""
    return codegen.expression(text, evaluate, _failure(field, text))


def _failure(field: str, text: str) -> Callable[[JMESPathError], FieldError]:
    return lambda exc: FieldError(field, f"{text!r} failed: {exc}")


@dataclass(frozen=True)
class Target:
    """What a generated rule function does with what it maps (see :func:`mapping_function`).

    ``failed`` runs on an event-level FieldError ``_exc`` and must leave; ``item_failed`` on an
    element's (``_index``); ``made(index)`` on a built event ``_out``. ``namespace`` holds the
    names these lines use.
    """

    name: str
    parameters: str
    namespace: dict[str, Any]
    failed: tuple[str, ...]
    item_failed: tuple[str, ...]
    made: Callable[[str], tuple[str, ...]]


def mapping_function(
    target: Target, leaves: list[Leaf], shared: frozenset[str], each: Emit | None, item: str,
    empty: Callable[[Any], FieldError],
) -> Callable[..., Any]:
    """Generate the function mapping an event by a rule's fields, for ``target``.

    With ``each`` (a rule-level fan-out), one output per element: the fields in ``shared`` do not
    depend on the element and are computed once per event; ``empty(value)`` is the error when
    ``each`` gives no non-empty list.
    """
    writer = Writer({**target.namespace, "_FieldError": FieldError})
    event = Scope("ev")
    if each is None:
        with writer.block("try:", always_completes=True):
            _put_fields(writer, event, leaves, {})
        _on_error(writer, target.failed)
        _lines(writer, target.made("None"))
        return writer.function(target.name, target.parameters)
    with writer.block("try:", always_completes=True):
        elements = each(writer, event)
        with writer.block(f"if not isinstance({elements}, list) or not {elements}:"):
            writer.line(f"raise {writer.bind(empty)}({elements})")
        once = {leaf.path: leaf.emit(writer, event) for leaf in leaves if leaf.path in shared}
    _on_error(writer, target.failed)
    with writer.block(f"for _index, _element in enumerate({elements}):") as body:
        scope = event.element(writer, item, "_element", "_index", body)
        with writer.block("try:", always_completes=True):
            _put_fields(writer, scope, leaves, once)
        _on_error(writer, (*target.item_failed, "continue"))
        _lines(writer, target.made("_index"))
        scope.close(writer)
    return writer.function(target.name, target.parameters)


def build_function(leaves: list[Leaf]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The generated function building one Topsort event in a context (raises FieldError)."""
    writer = Writer()
    _put_fields(writer, Scope("ctx"), leaves, {})
    writer.line("return _out")
    return writer.function("build", "ctx")


def _put_fields(writer: Writer, scope: Scope, leaves: list[Leaf], computed: dict[str, str]) -> None:
    """``_out = {...}``: each field that is neither null nor an empty string, in order."""
    writer.line("_out = {}")
    for leaf in leaves:
        value = computed.get(leaf.path) or leaf.emit(writer, scope)
        writer.line(f"if {value} is not None and {value} != '': _out[{leaf.path!r}] = {value}")


def _on_error(writer: Writer, lines: tuple[str, ...]) -> None:
    with writer.block("except _FieldError as _exc:"):
        _lines(writer, lines)


def _lines(writer: Writer, lines: tuple[str, ...]) -> None:
    for line in lines:
        writer.line(line)


class FieldCompiler:
    """Compiles the fields of one rule, reporting problems through ``report``.

    ``report(ypath, message, field=..., key=False, offset=None)`` receives the YAML path of
    the problem; the caller turns it into file:line:column.
    """

    def __init__(self, kind: str, report: Report) -> None:
        self.kind = kind
        self.report = report
        self.fanout_arrays: list[tuple[str, ...]] = []

    def top(
        self, fields: dict[str, Any], ypath: Path_, node: SchemaNode, per_item: frozenset[str] = frozenset()
    ) -> tuple[list[Leaf], frozenset[str]]:
        """The top-level fields of a Topsort event, and those among them that are *shared*.

        In a fan-out, fields whose expressions name none of ``per_item`` (the element, ``index``,
        ``@``) are the same for every element: they are computed once per event.
        """
        leaves = []
        for key, spec in fields.items():
            emit = self._child(key, spec, ypath, (), node)
            if emit is not None:
                leaves.append(Leaf(key, spec, emit))
        if node.alternatives and not any(set(choice.fields) <= fields.keys() for choice in node.alternatives):
            none = "neither" if len(node.alternatives) == 2 else "none of them"
            self.report(ypath, f"every Topsort {self.kind} event {needs(node.alternatives)}, and this rule maps "
                               f"{none}: each event it takes would be rejected", key=True)
        shared = frozenset(leaf.path for leaf in leaves if per_item and per_item.isdisjoint(_names(leaf.spec)))
        return leaves, shared

    def _child(
        self, key: str, spec: Any, ypath: Path_, opath: tuple[str, ...], node: SchemaNode, *, fit: bool = True
    ) -> Emit | None:
        child = node.child(key)
        if child is None:
            self.report((*ypath, key), self._unknown(key, opath, node), field=_dotted((*opath, key)), key=True)
            return None
        return self.field(spec, (*ypath, key), (*opath, key), child, fit=fit)

    def _unknown(self, key: str, opath: tuple[str, ...], node: SchemaNode) -> str:
        where = f"Topsort {self.kind}" + (f" {_dotted(opath)}" if opath else "")
        message = f"{where} has no field {key!r}"
        elsewhere = [kind for kind in KINDS if not opath and key in topsort_schema().node(kind).properties]
        if elsewhere:
            return f"{message}: it is a field of Topsort {' and '.join(elsewhere)} only"
        close = difflib.get_close_matches(key, list(node.properties), n=1)
        if not close:
            close = [name for name in node.properties if name.lower() == key.lower()]
        if close:
            message += f" (did you mean {close[0]!r}?)"
        return message + f"; allowed: {', '.join(sorted(node.properties))}"

    def field(
        self, spec: Any, ypath: Path_, opath: tuple[str, ...], node: SchemaNode, *, fit: bool = True,
        partial: bool = False,
    ) -> Emit:
        """The code computing one field's value (None when absent); ``partial``: it is one part of
        the value at its place (a part of a ``merge``)."""
        if isinstance(spec, str):
            emit = expression_at(spec, ypath, _dotted(opath), self.report)
        elif isinstance(spec, dict) and not is_spec(spec):
            return self._object(spec, ypath, opath, node, fit=fit)
        elif not isinstance(spec, dict):
            self.report(ypath, f"a field is an expression, a spec or a mapping of fields, not {spec!r}",
                        field=_dotted(opath))
            return _null
        else:
            emit = self._spec(spec, ypath, opath, node, partial)
        return _fitted(emit, node) if fit else emit

    def _object(
        self, fields: dict[str, Any], ypath: Path_, opath: tuple[str, ...], node: SchemaNode, *, fit: bool = True
    ) -> Emit:
        if "object" not in node.types and node.types:
            self.report(ypath, f"Topsort {self.kind} {_dotted(opath)} is not an object", field=_dotted(opath))
        entries = []
        for key, spec in fields.items():
            emit = self._child(key, spec, ypath, opath, node, fit=fit)
            if emit is not None:
                entries.append((key, emit))

        def build(writer: Writer, scope: Scope) -> str:
            made = writer.local("{}")
            for key, emit in entries:
                value = emit(writer, scope)
                writer.line(f"if {value} is not None: {made}[{key!r}] = {value}")
            result = writer.local(f"{made} or None")
            return result

        return build

    def _spec(
        self, spec: dict[str, Any], ypath: Path_, opath: tuple[str, ...], node: SchemaNode, partial: bool = False
    ) -> Emit:
        sources = [key for key in SOURCES if key in spec]
        name = _dotted(opath)
        if len(sources) > 1 or (not sources and "each" not in spec):
            found = f" (found {', '.join(sources)})" if sources else ""
            self.report(ypath, f"a spec needs exactly one of {', '.join(SOURCES)}{found}", field=name)
            return _null
        each = spec.get("each")
        element = node
        if each is not None:
            if node.types and "array" not in node.types:
                self.report((*ypath, "each"), f"'each' makes an array, but Topsort {self.kind} {name} is not one",
                            field=name)
            element = node.items or SchemaNode()
            if not any(part.endswith("[]") for part in opath):
                self.fanout_arrays.append(opath)
            opath = (*opath[:-1], opath[-1] + "[]") if opath else opath
        item = spec.get("item", DEFAULT_ITEM)
        produce = self._source(spec, sources[0] if sources else None, ypath, opath, element, item)
        produce = _finish(produce, spec)
        self._refuse_constants(spec, ypath, name, element, partial)
        if each is not None:
            produce = _each(expression_at(each, (*ypath, "each"), name, self.report), item, produce)
        if "if" in spec:
            produce = _guarded(expression_at(spec["if"], (*ypath, "if"), name, self.report), produce)
        return produce

    def _source(
        self, spec: dict[str, Any], source: str | None, ypath: Path_, opath: tuple[str, ...], node: SchemaNode,
        item: str,
    ) -> Emit:
        name = _dotted(opath)
        if source is None:
            return lambda writer, scope: scope.name(writer, item)
        at = (*ypath, source)
        if source == "from":
            return expression_at(spec["from"], at, name, self.report)
        if source == "const":
            return _constant(spec["const"])
        if source == "fields":
            return self._object(spec["fields"], at, opath, node, fit=False)
        parts = [self.field(part, (*at, i), opath, node, fit=False, partial=source == "merge")
                 for i, part in enumerate(spec[source])]
        return _first(parts) if source == "first" else _merge(parts)

    def _refuse_constants(
        self, spec: dict[str, Any], ypath: Path_, name: str, node: SchemaNode, partial: bool
    ) -> None:
        """Report a ``const``, ``lookup`` value or ``default`` that the Topsort schema refuses at
        this place, once fitted like any value there: every event it reaches would be rejected."""
        cast = COERCIONS.get(spec.get("as", ""))
        found: list[tuple[str, Path_, Any, bool]] = []  # (what, where, value, whether 'as' applies)
        if "const" in spec:
            found.append(("const {}", (*ypath, "const"), spec["const"], True))
        for key, value in (spec.get("lookup") or {}).items():
            found.append((f"lookup value {{}} (for {_json(key)})", (*ypath, "lookup", str(key)), value, True))
        if "default" in spec:
            found.append(("default {}", (*ypath, "default"), spec["default"], False))
        fit = conformer(node)
        for what, at, value, coerced in found:
            if coerced and cast is not None:
                value = cast(value)
            if fit is not None and value is not None:
                value = fit(value)
            why = topsort_schema().refusal(node, value, partial=partial) if value is not None else None
            if why is not None:
                self.report(at, f"{what.format(_json(value))} would be rejected on every event it reaches: {why}",
                            field=name)


def _fitted(emit: Emit, node: SchemaNode) -> Emit:
    """``emit``, its value fitted to ``node`` of the Topsort schema (see :mod:`engine.topsort.conform`)."""
    fit = conformer(node)
    if fit is None:
        return emit
    native = native_type(node)

    def fitted(writer: Writer, scope: Scope) -> str:
        value = emit(writer, scope)
        needed = f"{value} is not None" + (f" and {value}.__class__ is not {writer.bind(native)}" if native else "")
        result = writer.local(f"{writer.bind(fit)}({value}) if {needed} else {value}")
        return result

    return fitted


def _finish(produce: Emit, spec: dict[str, Any]) -> Emit:
    """Apply ``lookup``, ``as`` and ``default``, in that order."""
    if not {"lookup", "as", "default"} & spec.keys():
        return produce

    def finished(writer: Writer, scope: Scope) -> str:
        value = produce(writer, scope)
        if "lookup" in spec:
            value = writer.local(f"{writer.bind(spec['lookup'])}.get({value}) "
                                 f"if isinstance({value}, {writer.bind(LOOKUP_KEYS)}) else None")
        if "as" in spec:
            value = writer.local(f"{writer.bind(COERCIONS[spec['as']])}({value})")
        if "default" in spec:
            value = writer.local(f"{writer.bind(spec['default'])} if {value} is None else {value}")
        return value

    return finished


def _each(sequence: Emit, item: str, produce: Emit) -> Emit:
    def each(writer: Writer, scope: Scope) -> str:
        elements = sequence(writer, scope)
        made = writer.local("None")
        with writer.block(f"if isinstance({elements}, list):"):
            writer.line(f"{made} = []")
            element, index = writer.local(), writer.local()
            with writer.block(f"for {index}, {element} in enumerate({elements}):") as body:
                inner = scope.element(writer, item, element, index, body)
                value = produce(writer, inner)
                writer.line(f"if {value} is not None: {made}.append({value})")
                inner.close(writer)
        return made

    return each


def _names(spec: Any) -> set[str]:
    """Every name the expressions of a field spec read (``@`` included), over-approximated."""
    if isinstance(spec, str):
        try:
            return referenced_names(spec)
        except ExpressionSyntaxError:
            return set()
    if isinstance(spec, list):
        return set().union(*map(_names, spec)) if spec else set()
    if isinstance(spec, dict):
        keys = spec.keys() - {"const", "lookup", "default", "as", "item"} if is_spec(spec) else spec.keys()
        names = set().union(*(_names(spec[key]) for key in keys)) if keys else set()
        return names | ({spec["item"]} if is_spec(spec) and "item" in spec else set())
    return set()


def _guarded(condition: Emit, produce: Emit) -> Emit:
    def guarded(writer: Writer, scope: Scope) -> str:
        holds = condition(writer, scope)
        result = writer.local("None")
        with writer.block(f"if {holds} or {writer.bind(truthy)}({holds}):"):
            writer.line(f"{result} = {produce(writer, scope)}")
        return result

    return guarded


def _first(parts: list[Emit]) -> Emit:
    def first(writer: Writer, scope: Scope) -> str:
        result = writer.local("None")
        for position, part in enumerate(parts):
            # a value taken is never null, so "still null" means "not found yet" (and the code stays flat)
            with writer.block(f"if {result} is None:") if position else nullcontext():
                value = part(writer, scope)
                writer.line(f"if {value} is not None and {value} != '': {result} = {value}")
        return result

    return first


def _merge(parts: list[Emit]) -> Emit:
    def merge(writer: Writer, scope: Scope) -> str:
        result = writer.local("None")
        for part in parts:
            value = part(writer, scope)
            with writer.block(f"if {value} is not None:"):
                writer.line(f"{result} = {{**{result}, **{value}}} "
                            f"if isinstance({result}, dict) and isinstance({value}, dict) else {value}")
        return result

    return merge


def _constant(value: Any) -> Emit:
    def constant(writer: Writer, scope: Scope) -> str:
        if isinstance(value, (dict, list)):
            return writer.local(f"{writer.bind(copy.deepcopy)}({writer.bind(value)})")
        return writer.local(writer.bind(value))

    return constant


def _nothing(context: Any) -> None:
    return None


def _null(writer: Writer, scope: Scope) -> str:
    return "None"


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _dotted(opath: tuple[str, ...]) -> str:
    return ".".join(opath)


def _syntax_reason(exc: Exception) -> str:
    token = getattr(exc, "token_value", None)
    message = getattr(exc, "msg", str(exc))
    if type(exc).__name__ == "IncompleteExpressionError":
        return "the expression ends too early"
    return f"{message} at {token!r}" if token not in (None, "") else message
