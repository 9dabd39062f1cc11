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

Every value is then fitted to its place in the Topsort schema (see :mod:`engine.conform`);
null values and, at the top level, empty strings are left out.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from jmespath.exceptions import JMESPathError

from .coercion import COERCIONS
from .conform import conformer, native_type
from .expressions import ExpressionSyntaxError, compile_expression, function_problems, referenced_names
from .outcome import KINDS
from .topsort_schema import SchemaNode, topsort_schema
from .yaml_source import Path_

Evaluate = Callable[[Any], Any]
Build = Callable[..., dict[str, Any]]
Prepare = Callable[[Any], dict[str, Any]]
Report = Callable[..., None]

SOURCES = ("from", "const", "first", "merge", "fields")
SPEC_KEYS = frozenset((*SOURCES, "each", "item", "if", "lookup", "default", "as"))
DEFAULT_ITEM = "item"


class FieldError(Exception):
    """A field's expression failed on this event (e.g. a function given the wrong type)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Leaf:
    """One top-level output field, kept for ``explain``: its path, its spec and its function."""

    path: str
    spec: Any
    evaluate: Evaluate


def is_spec(value: Any) -> bool:
    return isinstance(value, dict) and not SPEC_KEYS.isdisjoint(value)


def truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, and empty strings, arrays and objects are false."""
    if value is None or value is False:
        return False
    return not isinstance(value, (str, list, dict)) or bool(value)


def compile_expression_at(
    text: str, ypath: Path_, field: str, report: Report, node: SchemaNode | None = None
) -> Evaluate:
    """Compile one expression of a rule file; report syntax and function errors where they are.

    With ``node``, the value is fitted to that place of the Topsort schema in the same call.
    """
    try:
        compiled = compile_expression(text)
    except ExpressionSyntaxError as exc:
        position = getattr(exc, "lex_position", None)
        report(ypath, f"invalid JMESPath {text!r}: {_syntax_reason(exc)}", field=field, offset=position)
        return _nothing
    for problem in function_problems(text):
        report(ypath, f"in {text!r}: {problem}", field=field)
    fit = conformer(node)

    def evaluate(context: Any) -> Any:
        try:
            return compiled(context)
        except JMESPathError as exc:
            raise FieldError(field, f"{text!r} failed: {exc}") from None

    if fit is None:
        return evaluate
    native = native_type(node)

    def evaluate_and_fit(context: Any) -> Any:
        try:
            value = compiled(context)
        except JMESPathError as exc:
            raise FieldError(field, f"{text!r} failed: {exc}") from None
        return value if value is None or value.__class__ is native else fit(value)

    return evaluate_and_fit


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
    ) -> tuple[Build, Prepare, list[Leaf]]:
        """The functions building a whole Topsort event, and its top-level leaves.

        In a fan-out, fields whose expressions name none of ``per_item`` (the element, ``index``,
        ``@``) are the same for every element: ``prepare(event)`` computes them once per event
        and ``build(context, prepared)`` reuses them for each element.
        """
        leaves = []
        for key, spec in fields.items():
            fn = self._child(key, spec, ypath, (), node)
            if fn is not None:
                leaves.append(Leaf(key, spec, fn))
        shared = {leaf.path for leaf in leaves if per_item and per_item.isdisjoint(_names(leaf.spec))}
        plan = tuple((leaf.path, leaf.evaluate, leaf.path in shared) for leaf in leaves)

        def prepare(event: Any) -> dict[str, Any]:
            return {key: evaluate(event) for key, evaluate, once in plan if once}

        def build(context: Any, prepared: dict[str, Any] | None = None) -> dict[str, Any]:
            out = {}
            for key, evaluate, once in plan:
                value = prepared[key] if once and prepared is not None else evaluate(context)
                if value is not None and value != "":
                    out[key] = value
            return out

        return build, prepare, leaves

    def _child(
        self, key: str, spec: Any, ypath: Path_, opath: tuple[str, ...], node: SchemaNode, *, fit: bool = True
    ) -> Evaluate | None:
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
        self, spec: Any, ypath: Path_, opath: tuple[str, ...], node: SchemaNode, *, fit: bool = True
    ) -> Evaluate:
        """The function computing one field's value (None when absent)."""
        if isinstance(spec, str):
            return compile_expression_at(spec, ypath, _dotted(opath), self.report, node if fit else None)
        if isinstance(spec, dict) and not is_spec(spec):
            return self._object(spec, ypath, opath, node, fit=fit)
        if not isinstance(spec, dict):
            self.report(ypath, f"a field is an expression, a spec or a mapping of fields, not {spec!r}",
                        field=_dotted(opath))
            return _nothing
        evaluate = self._spec(spec, ypath, opath, node)
        fitting = conformer(node) if fit else None
        if fitting is None:
            return evaluate
        native = native_type(node)

        def evaluate_and_fit(context: Any) -> Any:
            value = evaluate(context)
            return value if value is None or value.__class__ is native else fitting(value)

        return evaluate_and_fit

    def _object(
        self, fields: dict[str, Any], ypath: Path_, opath: tuple[str, ...], node: SchemaNode, *, fit: bool = True
    ) -> Evaluate:
        if "object" not in node.types and node.types:
            self.report(ypath, f"Topsort {self.kind} {_dotted(opath)} is not an object", field=_dotted(opath))
        entries = []
        for key, spec in fields.items():
            fn = self._child(key, spec, ypath, opath, node, fit=fit)
            if fn is not None:
                entries.append((key, fn))

        def build(context: Any) -> dict[str, Any] | None:
            out = {}
            for key, evaluate in entries:
                value = evaluate(context)
                if value is not None:
                    out[key] = value
            return out or None

        return build

    def _spec(self, spec: dict[str, Any], ypath: Path_, opath: tuple[str, ...], node: SchemaNode) -> Evaluate:
        sources = [key for key in SOURCES if key in spec]
        name = _dotted(opath)
        if len(sources) > 1 or (not sources and "each" not in spec):
            found = f" (found {', '.join(sources)})" if sources else ""
            self.report(ypath, f"a spec needs exactly one of {', '.join(SOURCES)}{found}", field=name)
            return _nothing
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
        if each is not None:
            produce = _each(compile_expression_at(each, (*ypath, "each"), name, self.report), item, produce)
        if "if" in spec:
            produce = _guarded(compile_expression_at(spec["if"], (*ypath, "if"), name, self.report), produce)
        return produce

    def _source(
        self, spec: dict[str, Any], source: str | None, ypath: Path_, opath: tuple[str, ...], node: SchemaNode,
        item: str,
    ) -> Evaluate:
        name = _dotted(opath)
        if source is None:
            return lambda context: context.get(item)
        at = (*ypath, source)
        if source == "from":
            return compile_expression_at(spec["from"], at, name, self.report)
        if source == "const":
            return _constant(spec["const"])
        if source == "fields":
            return self._object(spec["fields"], at, opath, node, fit=False)
        parts = [self.field(part, (*at, i), opath, node, fit=False) for i, part in enumerate(spec[source])]
        return _first(parts) if source == "first" else _merge(parts)


def _finish(produce: Evaluate, spec: dict[str, Any]) -> Evaluate:
    """Apply ``lookup``, ``as`` and ``default``, in that order."""
    steps: list[Evaluate] = []
    if "lookup" in spec:
        table = spec["lookup"]
        steps.append(lambda value: table.get(value) if isinstance(value, (str, int, float, bool)) else None)
    if "as" in spec:
        steps.append(COERCIONS[spec["as"]])
    if "default" in spec:
        default = spec["default"]
        steps.append(lambda value: default if value is None else value)
    if not steps:
        return produce

    def finished(context: Any) -> Any:
        value = produce(context)
        for step in steps:
            value = step(value)
        return value

    return finished


def _each(sequence: Evaluate, item: str, produce: Evaluate) -> Evaluate:
    def each(context: Any) -> list[Any] | None:
        elements = sequence(context)
        if not isinstance(elements, list):
            return None
        out = []
        for element_context in element_contexts(context, item, elements):
            value = produce(element_context)
            if value is not None:
                out.append(value)
        return out

    return each


def element_contexts(event: dict[str, Any], item: str, elements: list[Any]) -> Iterator[dict[str, Any]]:
    """The event with each element bound as ``item`` and its position as ``index``, in turn.

    One dict is updated in place for every element (copying the event once, not per element):
    use each context before taking the next.
    """
    context = {**event, item: None, "index": 0}
    for index, element in enumerate(elements):
        context[item] = element
        context["index"] = index
        yield context


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


def _guarded(condition: Evaluate, produce: Evaluate) -> Evaluate:
    return lambda context: produce(context) if truthy(condition(context)) else None


def _first(parts: list[Evaluate]) -> Evaluate:
    def first(context: Any) -> Any:
        for part in parts:
            value = part(context)
            if value is not None and value != "":
                return value
        return None

    return first


def _merge(parts: list[Evaluate]) -> Evaluate:
    def merge(context: Any) -> Any:
        result = None
        for part in parts:
            value = part(context)
            if value is None:
                continue
            result = {**result, **value} if isinstance(result, dict) and isinstance(value, dict) else value
        return result

    return merge


def _constant(value: Any) -> Evaluate:
    if isinstance(value, (dict, list)):
        return lambda context: copy.deepcopy(value)
    return lambda context: value


def _nothing(context: Any) -> None:
    return None


def _dotted(opath: tuple[str, ...]) -> str:
    return ".".join(opath)


def _syntax_reason(exc: Exception) -> str:
    token = getattr(exc, "token_value", None)
    message = getattr(exc, "msg", str(exc))
    if type(exc).__name__ == "IncompleteExpressionError":
        return "the expression ends too early"
    return f"{message} at {token!r}" if token not in (None, "") else message
