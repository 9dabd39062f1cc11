"""The fields of a Topsort event by dotted path (``placement.position``, ``items[].productId``),
as ``diff`` and ``coverage`` report them."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from ..outcome import Rejection

_INDEX = re.compile(r"\[\d+\]")


def field_values(event: dict[str, Any]) -> dict[str, Any]:
    """Every leaf of ``event`` by path: nested objects are followed (``placement.position``);
    under an array of objects the path says ``[]`` and the value is the list of the elements'
    values, ``None`` where an element lacks it (``items[].vendorId``). Other arrays are leaves."""
    found: dict[str, Any] = {}
    _walk(event, "", found)
    return found


MAX_FIELDS = 1_000
"""Distinct field paths counted; free-form objects (``dsp_metadata``) take their keys from the
events, so paths beyond this many are counted together as :data:`OTHER_FIELDS`."""
OTHER_FIELDS = "(other fields)"


def count_fields(event: dict[str, Any], filled: Counter[str], lengths: Counter[str]) -> None:
    """Add one to ``filled`` for every field ``event`` has, objects included (``placement`` and
    ``placement.position``; ``items[].vendorId`` once per element that has it), and the length of
    each array of objects to ``lengths`` (``items[]``): the counts behind fill rates."""
    _count(event, "", filled, lengths)


def bounded(path: str, known: dict[str, Any]) -> str:
    """``path``, or :data:`OTHER_FIELDS` when ``known`` is full and does not hold it yet."""
    return path if path in known or len(known) < MAX_FIELDS else OTHER_FIELDS


def _general_path(path: str) -> str:
    """A JSON path of a rejection with its indices generalised: ``$.items[2].unitPrice`` -> ``$.items[].unitPrice``."""
    return _INDEX.sub("[]", path)


def rejection_key(rejection: Rejection) -> tuple[str | None, str, str]:
    """(rule, path, reason) of a rejection without what is particular to one fan-out item: the
    index in its path and the ``item N of …:`` prefix of its reason, so like rejections count together."""
    reason = rejection.reason
    if rejection.item is not None and reason.startswith("item ") and ": " in reason:
        reason = reason.split(": ", 1)[1]
    return rejection.rule, _general_path(rejection.path), reason


def _walk(value: dict[str, Any], prefix: str, found: dict[str, Any]) -> None:
    for key, child in value.items():
        path = prefix + key
        if child.__class__ is dict:
            _walk(child, path + ".", found)
        elif _objects(child):
            elements = [field_values(element) for element in child]
            names = dict.fromkeys(name for element in elements for name in element)
            for name in names:
                found[f"{path}[].{name}"] = [element.get(name) for element in elements]
        else:
            found[path] = child


def _count(value: dict[str, Any], prefix: str, filled: Counter[str], lengths: Counter[str]) -> None:
    for key, child in value.items():
        path = prefix + key
        filled[bounded(path, filled)] += 1
        if child.__class__ is dict:
            _count(child, path + ".", filled, lengths)
        elif _objects(child):
            lengths[bounded(path + "[]", lengths)] += len(child)
            for element in child:
                _count(element, path + "[].", filled, lengths)


def _objects(value: Any) -> bool:
    return value.__class__ is list and bool(value) and all(element.__class__ is dict for element in value)
