"""Differential: the engine's jsonschema-rs validators against python-jsonschema (2020-12, with its
RFC 3339 format checker) on the project's Topsort schema.

Valid outputs are built from the schema's shapes; invalid ones by one mutation each (wrong type,
out of range, bad enum, bad date-time, extra key, missing required key, an impression or click
with neither resolvedBidId nor entity, more than 50 per array).
Both must give the same verdict, and where both report exactly one error, at the same place.
The few date-times the two libraries judge differently are pinned in their own test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.outcome import KINDS
from engine.topsort.schema import topsort_schema

SCHEMA = topsort_schema()
_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER
REFERENCE = {kind: jsonschema.Draft202012Validator(SCHEMA.kind_schema(kind), format_checker=_CHECKER) for kind in KINDS}
REFERENCE_REQUEST = jsonschema.Draft202012Validator(SCHEMA.document, format_checker=_CHECKER)
FAST = {kind: SCHEMA.validator(kind) for kind in KINDS}

EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- valid outputs, from the schema's shapes ---------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
nonempty = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
ids = nonempty | st.sampled_from(["a" * 128, "é" * 128, "😀" * 128, "m-1:0"])
positive_ints = st.integers(1, 2**40) | st.sampled_from([1, 1.0, 2**63 - 1])
prices = st.floats(min_value=0, max_value=9e18, exclude_min=True) | st.integers(1, 10**9)  # bounded: engine.limits


@st.composite
def date_times(draw: Any) -> str:
    """RFC 3339 date-times: any date, fractions, Z (either case) or an offset."""
    moment = draw(st.datetimes())
    fraction = draw(st.sampled_from(["", ".0", ".123", ".123456789"]))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+05:30", "-11:59", "+23:59"]))
    separator = draw(st.sampled_from("Tt"))
    date = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
    return f"{date}{separator}{moment:%H:%M:%S}{fraction}{zone}"


entities = st.fixed_dictionaries({"id": nonempty, "type": st.sampled_from(["product", "vendor"])})
placements = st.fixed_dictionaries({"path": nonempty}, optional={
    "position": positive_ints, "page": positive_ints, "pageSize": positive_ints, "productId": _text,
    "categoryIds": st.lists(_text, min_size=1, max_size=3), "searchQuery": _text,
})
objects = st.fixed_dictionaries({"type": st.sampled_from(["listing", "banner"])}, optional={
    "assetId": _text, "clickType": st.sampled_from(["product", "like", "add-to-cart"]),
})
PAGE_TYPES = ["home", "category", "PDP", "search", "cart", "other"]


@st.composite
def pages(draw: Any) -> dict[str, Any]:
    page = {"type": draw(st.sampled_from(PAGE_TYPES)), "pageId": draw(nonempty)}
    if draw(st.booleans()):
        lists_allowed = page["type"] == "cart"
        page["value"] = draw(st.lists(_text, max_size=3) | _text if lists_allowed else _text)
    return page


def _common() -> dict[str, Any]:
    return {"id": ids, "occurredAt": date_times(), "opaqueUserId": ids}


def _common_optional() -> dict[str, Any]:
    return {"deviceType": st.sampled_from(["desktop", "mobile"]),
            "channel": st.sampled_from(["onsite", "offsite", "instore"])}


@st.composite
def interactions(draw: Any, click: bool) -> dict[str, Any]:
    optional = {
        **_common_optional(), "resolvedBidId": st.text(min_size=1, max_size=128), "entity": entities,
        "additionalAttribution": entities, "placement": placements, "page": pages(), "object": objects,
        "externalVendorId": _text, "externalCampaignId": _text,
        "dsp_metadata": st.dictionaries(_text, _text, max_size=3),
    }
    if click:
        optional["clickType"] = st.sampled_from(["product", "like", "add-to-cart"])
    event = draw(st.fixed_dictionaries(_common(), optional=optional))
    if "additionalAttribution" in event and "resolvedBidId" not in event:
        event["resolvedBidId"] = draw(st.text(min_size=1, max_size=128))
    if "resolvedBidId" not in event and "entity" not in event:  # sponsored or organic
        event["entity"] = draw(entities)
    return event


purchase_items = st.fixed_dictionaries({"productId": nonempty, "unitPrice": prices},
                                       optional={"quantity": positive_ints, "vendorId": _text})
purchases = st.fixed_dictionaries({**_common(), "items": st.lists(purchase_items, min_size=1, max_size=4)},
                                  optional=_common_optional())
pageviews = st.fixed_dictionaries({**_common(), "page": pages()}, optional=_common_optional())
VALID: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "impressions": interactions(click=False), "clicks": interactions(click=True),
    "purchases": purchases, "pageviews": pageviews,
}

# -- invalid outputs: one mutation each ---------------------------------------------------------------

Path = tuple[Any, ...]
CLOSED_OBJECTS = {(), ("entity",), ("additionalAttribution",), ("placement",), ("page",), ("object",)}
REQUIRED = {("id",), ("occurredAt",), ("opaqueUserId",), ("items",), ("entity", "id"), ("entity", "type"),
            ("additionalAttribution", "id"), ("additionalAttribution", "type"), ("placement", "path"),
            ("page", "type"), ("page", "pageId"), ("object", "type"), ("items", "productId"), ("items", "unitPrice")}
"""Schema paths (array indexes left out) of required keys; a pageview's page is required too."""
ENUMS = {"deviceType": "tablet", "channel": "web", "type": "shop", "clickType": "buy"}
RANGES = {"id": "", "opaqueUserId": "a" * 129, "resolvedBidId": "", "position": 0, "page": -1, "pageSize": 0,
          "unitPrice": 0, "quantity": 0, "categoryIds": [], "items": [], "pageId": "", "path": ""}
BAD_DATE_TIMES = ["yesterday", "2026-11-27 10:00:00Z", "2026-11-27T10:00:00", "2026-13-01T00:00:00Z",
                  "2026-02-30T00:00:00Z", "2026-11-27T24:00:00Z", "2026-11-27T10:00:00+1:00", "1764237600000",
                  "2026-11-27T10:00Z", "2026-11-27T10:00:00.Z", "", "2026-11-27T10:00:00+24:00"]


def _paths(value: Any, path: Path = ()) -> list[Path]:
    """Every place in a document, the root excepted."""
    found: list[Path] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*path, key))
        found.extend(_paths(child, (*path, key)))
    return found


def _get(document: Any, path: Path) -> Any:
    for key in path:
        document = document[key]
    return document


def _schema_path(path: Path) -> Path:
    return tuple(key for key in path if not isinstance(key, int))


def _wrong_type(draw: Any, event: dict[str, Any], kind: str) -> bool:
    places = [p for p in _paths(event) if _schema_path(p)[-1:] != ("value",) and not (
        _schema_path(p)[:1] == ("dsp_metadata",) and len(_schema_path(p)) == 1 and not _get(event, p))]
    path = draw(st.sampled_from(places))
    current = _get(event, path)
    others = [v for v in (None, True, "7", 1.5, {"k": "v"}, ["x"]) if type(v) is not type(current)]
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        others = [v for v in others if not isinstance(v, float)] + ["1"]
    _get(event, path[:-1])[path[-1]] = draw(st.sampled_from(others))
    return True


def _out_of_range(draw: Any, event: dict[str, Any], kind: str) -> bool:
    places = [p for p in _paths(event) if isinstance(p[-1], str) and p[-1] in RANGES]
    path = draw(st.sampled_from(places))
    _get(event, path[:-1])[path[-1]] = copy.copy(RANGES[path[-1]])
    return True


def _bad_enum(draw: Any, event: dict[str, Any], kind: str) -> bool:
    places = [p for p in _paths(event) if isinstance(p[-1], str) and p[-1] in ENUMS and isinstance(_get(event, p), str)]
    if not places:
        return False
    path = draw(st.sampled_from(places))
    _get(event, path[:-1])[path[-1]] = ENUMS[path[-1]]
    return True


def _bad_date_time(draw: Any, event: dict[str, Any], kind: str) -> bool:
    event["occurredAt"] = draw(st.sampled_from(BAD_DATE_TIMES))
    return True


def _extra_key(draw: Any, event: dict[str, Any], kind: str) -> bool:
    places = [p for p in [(), *_paths(event)] if _schema_path(p) in CLOSED_OBJECTS and isinstance(_get(event, p), dict)]
    places += [p for p in _paths(event) if p[:1] == ("items",) and len(p) == 2]
    path = draw(st.sampled_from(places))
    _get(event, path)[draw(st.sampled_from(["name", "extra", "resolvedBidID", "clicktype"]))] = "x"
    return True


def _missing_key(draw: Any, event: dict[str, Any], kind: str) -> bool:
    required = REQUIRED | ({("page",)} if kind == "pageviews" else set())
    places = [p for p in _paths(event) if isinstance(p[-1], str) and _schema_path(p) in required]
    path = draw(st.sampled_from(places))
    del _get(event, path[:-1])[path[-1]]
    return True


def _unattributed(draw: Any, event: dict[str, Any], kind: str) -> bool:
    """An impression or click neither sponsored (resolvedBidId) nor organic (entity)."""
    if kind not in ("impressions", "clicks"):
        return False
    for key in ("resolvedBidId", "entity", "additionalAttribution"):
        event.pop(key, None)
    return True


MUTATIONS: list[Callable[[Any, dict[str, Any], str], bool]] = [
    _wrong_type, _out_of_range, _bad_enum, _bad_date_time, _extra_key, _missing_key, _unattributed,
]


@st.composite
def invalid(draw: Any, kind: str) -> dict[str, Any]:
    event = copy.deepcopy(draw(VALID[kind]))
    mutate = draw(st.sampled_from(MUTATIONS))
    assume(mutate(draw, event, kind))
    return event


# -- the libraries' verdicts ---------------------------------------------------------------------------



def _known_difference(document: Any) -> bool:
    """Date-times the two libraries judge differently (see test_known_date_time_differences)."""
    if isinstance(document, dict):
        return any(_known_difference(v) for v in document.values())
    if isinstance(document, list):
        return any(_known_difference(v) for v in document)
    return isinstance(document, str) and document.endswith("\n")


def _agree(reference: Any, fast: Any, document: Any) -> bool:
    """Assert both verdicts match (and the error place, when each reports one error); return validity."""
    expected = sorted((list(e.absolute_path) for e in reference.iter_errors(document)), key=repr)
    found = sorted((list(e.instance_path) for e in fast.iter_errors(document)), key=repr)
    assert fast.is_valid(document) == (not expected), (expected, found, document)
    assert bool(found) == bool(expected), (expected, found, document)
    if len(expected) == 1 and len(found) == 1 and not _has_empty_key(document):
        assert found == expected, document
    return not expected


def _has_empty_key(document: Any) -> bool:
    """jsonschema-rs leaves an empty key out of an error's path (see test_known_path_difference)."""
    if isinstance(document, dict):
        return "" in document or any(_has_empty_key(v) for v in document.values())
    if isinstance(document, list):
        return any(_has_empty_key(v) for v in document)
    return False


@pytest.mark.parametrize("kind", KINDS)
def test_same_verdict_on_valid_outputs(kind: str) -> None:
    @EXAMPLES
    @given(VALID[kind])
    def check(event: dict[str, Any]) -> None:
        assume(not _known_difference(event))
        assert _agree(REFERENCE[kind], FAST[kind], event), "the generator made an invalid output"

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_same_verdict_and_place_on_invalid_outputs(kind: str) -> None:
    @EXAMPLES
    @given(invalid(kind))
    def check(event: dict[str, Any]) -> None:
        assume(not _known_difference(event))
        assert not _agree(REFERENCE[kind], FAST[kind], event), "the mutation left the output valid"

    check()


@st.composite
def request_bodies(draw: Any) -> dict[str, Any]:
    """Request bodies: valid ones, ones with an invalid event, and ones over 50 per array or empty."""
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True))
    body = {kind: draw(st.lists(VALID[kind], min_size=1, max_size=3)) for kind in kinds}
    breakage = draw(st.sampled_from(["none", "event", "over 50", "empty array", "unknown kind", "empty body"]))
    kind = kinds[0]
    if breakage == "event":
        body[kind][0] = draw(invalid(kind))
    elif breakage == "over 50":
        body[kind] = body[kind] * (51 // len(body[kind]) + 1)
    elif breakage == "empty array":
        body = {kind: []}
    elif breakage == "unknown kind":
        body["views"] = body[kind]
    elif breakage == "empty body":
        body = {}
    return body


@EXAMPLES
@given(request_bodies())
def test_same_verdict_on_request_bodies(body: dict[str, Any]) -> None:
    assume(not _known_difference(body))
    _agree(REFERENCE_REQUEST, SCHEMA.request_validator, body)


@pytest.mark.parametrize(("date_time", "reference", "fast"), [
    # jsonschema-rs's date-time format accepts these, rfc3339-validator does not; the schema's
    # pattern on occurredAt refuses them, so both validators agree
    ("2026-11-27T23:59:60Z", False, False),   # a leap second on a day without one
    ("2016-12-31T23:59:60Z", False, False),   # a real leap second
    ("0000-01-01T00:00:00Z", False, False),   # year zero
    ("2026-11-27T10:00:00Z\n", True, False),  # rfc3339-validator's `$` lets a final newline through
])
def test_known_date_time_differences(date_time: str, reference: bool, fast: bool) -> None:
    """Pinned so that a library upgrade that changes them is noticed."""
    event = {"id": "m-1", "occurredAt": date_time, "opaqueUserId": "u-1", "page": {"type": "home", "pageId": "h"}}
    assert REFERENCE["pageviews"].is_valid(event) is reference
    assert FAST["pageviews"].is_valid(event) is fast


def test_known_path_difference() -> None:
    """Pinned so that a library upgrade that changes it is noticed: jsonschema-rs gives the path
    of a bad value under an empty key without that key. The engine never makes such an output
    (``stringify_values`` drops nulls; unknown keys of closed objects are dropped)."""
    event = {"id": "m-1", "occurredAt": "2026-01-01T00:00:00Z", "opaqueUserId": "u-1", "resolvedBidId": "b-1",
             "dsp_metadata": {"": None}}
    assert [list(e.absolute_path) for e in REFERENCE["impressions"].iter_errors(event)] == [["dsp_metadata", ""]]
    assert [list(e.instance_path) for e in FAST["impressions"].iter_errors(event)] == [["dsp_metadata"]]


def test_the_reference_checks_date_times() -> None:
    """Without rfc3339-validator python-jsonschema would pass any date-time, and this test would be void."""
    event = {"id": "m-1", "occurredAt": "yesterday", "opaqueUserId": "u-1", "page": {"type": "home", "pageId": "h"}}
    assert not REFERENCE["pageviews"].is_valid(event)
