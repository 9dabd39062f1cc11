"""The practical floor: the bundled rules written by hand as plain dict code.

One function per preset, orjson for decoding and encoding, jsonschema-rs for validation. It
applies the same value fitting as the engine (the coercions of :mod:`engine.topsort.coercion`), so it makes
the engine's outputs (see ``tests/test_benchmarks.py``) and the benchmark compares equal work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema_rs
import orjson

from engine.topsort.coercion import to_datetime, to_integer, to_number, to_string
from engine.compile.functions import to_text
from engine.outcome import KINDS
from engine.paths import TOPSORT_SCHEMA

Mapped = tuple[str, str, dict[str, Any]]
"""(kind, rule name, Topsort event)."""

_DEFINITION = {"impressions": "impression", "clicks": "click", "purchases": "purchase", "pageviews": "pageview"}
_DEVICES = {"ios": "mobile", "android": "mobile", "macos": "desktop", "windows": "desktop", "mobile": "mobile",
            "desktop": "desktop"}
_EMPTY: dict[str, Any] = {}


class _Failed(Exception):
    """A value a rule expression could not work with (JMESPath would raise): the output is rejected."""


class HandWritten:
    """The bundled default rules as hand-written Python; :meth:`process` maps one decoded event."""

    def __init__(self) -> None:
        document = orjson.loads(TOPSORT_SCHEMA.read_bytes())
        self._validators = {
            kind: jsonschema_rs.validator_for(
                {"$schema": document["$schema"], "$defs": document["$defs"], "$ref": f"#/$defs/{_DEFINITION[kind]}"},
                validate_formats=True,
            )
            for kind in KINDS
        }
        self._tracks: dict[str, Callable[[dict[str, Any]], list[Mapped]]] = {
            "Product Viewed": lambda event: self._interaction(event, "impressions", "product-viewed"),
            "Banner Impression": lambda event: self._interaction(event, "impressions", "banner-impression", banner=True),
            "Product Clicked": lambda event: self._interaction(event, "clicks", "product-clicked"),
            "Banner Click": lambda event: self._interaction(event, "clicks", "banner-click", banner=True),
            "Product List Viewed": self._product_list,
            "Order Completed": self._purchase,
        }

    def process_line(self, line: bytes) -> list[bytes]:
        """One NDJSON line in, the JSON of each Topsort event it makes out."""
        return [orjson.dumps(event) for _, _, event in self.process(orjson.loads(line))]

    def process(self, event: Any) -> list[Mapped]:
        """The valid Topsort events made of ``event``, as the bundled rules make them."""
        if not isinstance(event, dict):
            return []
        kind = event.get("type")
        if kind == "track":
            name = event.get("event")
            handler = self._tracks.get(name) if isinstance(name, str) else None
            return handler(event) if handler else []
        if kind == "page" or kind == "screen":
            return self._pageview(event)
        return []

    # -- presets ---------------------------------------------------------------------------------

    def _interaction(self, event: dict[str, Any], kind: str, rule: str, banner: bool = False) -> list[Mapped]:
        props = _obj(event.get("properties"))
        context = _obj(event.get("context"))
        context_page = _obj(context.get("page"))
        try:
            out = _user_fields(event)
            _put(out, "resolvedBidId", to_string(props.get("resolvedBidId")))
            _put(out, "additionalAttribution", _entity(props.get("additionalAttribution")))
            _put(out, "externalVendorId", to_string(props.get("externalVendorId")))
            _put(out, "externalCampaignId", to_string(props.get("externalCampaignId")))
            organic = None if banner or _truthy(props.get("resolvedBidId")) else _product_entity(props)
            _put(out, "entity", _entity(_first(props.get("entity"), organic)))
            _put(out, "object", _fit_object(props.get("object"), _OBJECT))
            _put(out, "channel", to_string(props.get("channel")))
            _put(out, "dsp_metadata", _dsp_metadata(props.get("dspMetadata")))
            _put(out, "placement", _placement(event, props, context_page))
            _put(out, "page", _page(props, context_page, only_with_type=True))
            _put(out, "deviceType", _device_type(context))
        except _Failed:
            return []
        return [(kind, rule, out)] if self._validators[kind].is_valid(out) else []

    def _product_list(self, event: dict[str, Any]) -> list[Mapped]:
        props = _obj(event.get("properties"))
        products = props.get("products")
        if not isinstance(products, list) or not products:
            return []
        shared = _user_fields(event)
        shared.pop("id", None)
        try:
            _put(shared, "deviceType", _device_type(_obj(event.get("context"))))
            prefix = _concat(event.get("messageId"), ":")  # the id of each item is prefix + index
        except _Failed:
            return []
        _put(shared, "channel", to_string(props.get("channel")))
        validator = self._validators["impressions"]
        mapped: list[Mapped] = []
        for index, product in enumerate(products):
            product = _obj(product)
            out = {**shared}
            if prefix is not None:
                out["id"] = prefix + str(index)
            _put(out, "resolvedBidId", to_string(product.get("resolvedBidId")))
            _put(out, "additionalAttribution", _entity(product.get("additionalAttribution")))
            if not _truthy(product.get("resolvedBidId")):
                _put(out, "entity", _entity(_first(product.get("entity"), _product_entity(product))))
            if validator.is_valid(out):
                mapped.append(("impressions", "product-list-viewed", out))
        return mapped

    def _purchase(self, event: dict[str, Any]) -> list[Mapped]:
        props = _obj(event.get("properties"))
        out = _user_fields(event)
        try:
            _put(out, "deviceType", _device_type(_obj(event.get("context"))))
        except _Failed:
            return []
        _put(out, "channel", to_string(props.get("channel")))
        products = props.get("products")
        if isinstance(products, list):
            items = [item for product in products if (item := _purchase_item(_obj(product))) is not None]
            _put(out, "items", items)
        valid = self._without_bad_items(out)
        return [("purchases", "order-completed", valid)] if valid is not None else []

    def _pageview(self, event: dict[str, Any]) -> list[Mapped]:
        props = _obj(event.get("properties"))
        context = _obj(event.get("context"))
        out = _user_fields(event)
        try:
            _put(out, "deviceType", _device_type(context))
        except _Failed:
            return []
        _put(out, "channel", to_string(props.get("channel")))
        _put(out, "page", _page(props, _obj(context.get("page")), only_with_type=False))
        return [("pageviews", "page-viewed", out)] if self._validators["pageviews"].is_valid(out) else []

    def _without_bad_items(self, out: dict[str, Any]) -> dict[str, Any] | None:
        """A purchase without its failing items, as the engine keeps it; None when rejected."""
        validator = self._validators["purchases"]
        if validator.is_valid(out):
            return out
        bad = set()
        for error in validator.iter_errors(out):
            path = list(error.instance_path)
            if len(path) < 2 or path[0] != "items" or not isinstance(path[1], int):
                return None
            bad.add(path[1])
        items = [item for index, item in enumerate(out["items"]) if index not in bad]
        if not items:
            return None
        out = {**out, "items": items}
        return out if validator.is_valid(out) else None


# -- fields ----------------------------------------------------------------------------------------

_ENTITY = {"id": to_string, "type": to_string}
_OBJECT = {"type": to_string, "assetId": to_string, "clickType": to_string}
_PLACEMENT_SCALARS = {"path": to_string, "position": to_integer, "page": to_integer, "pageSize": to_integer,
                      "productId": to_string, "searchQuery": to_string}


def _user_fields(event: dict[str, Any]) -> dict[str, Any]:
    """id, occurredAt and opaqueUserId, as the presets of single events map them."""
    out: dict[str, Any] = {}
    _put(out, "id", to_string(event.get("messageId")))
    _put(out, "occurredAt", to_string(to_datetime(event.get("timestamp"))))
    _put(out, "opaqueUserId", to_string(_first(event.get("anonymousId"), event.get("userId"))))
    return out


def _device_type(context: dict[str, Any]) -> str | None:
    value = _obj(context.get("device")).get("type")
    if value is not None and not isinstance(value, str):
        raise _Failed("lower() takes a string")
    return _DEVICES.get(value.lower()) if value is not None else None


def _placement(event: dict[str, Any], props: dict[str, Any], context_page: dict[str, Any]) -> Any:
    path = context_page.get("path")
    given = props.get("placement")
    if not (_truthy(path) or _truthy(given)):
        return None
    own = {}
    _put_some(own, "path", to_string(path))
    _put_some(own, "position", to_integer(_first(event.get("position"), props.get("position"))))
    merged = _merge(own or None, given)
    if not isinstance(merged, dict):
        return merged
    out = {}
    for key, value in merged.items():
        if value is None:
            continue
        if key == "categoryIds":
            value = _strings(value)
        elif key in _PLACEMENT_SCALARS:
            value = _PLACEMENT_SCALARS[key](value)
        else:
            continue
        _put_some(out, key, value)
    return out or None


def _page(props: dict[str, Any], context_page: dict[str, Any], only_with_type: bool) -> Any:
    given = props.get("page")
    own = None
    title = context_page.get("title")
    if title is not None and (not only_with_type or _truthy(_obj(given).get("type"))):
        own = {"value": _page_value(title)}
    merged = _merge(own, given)
    if not isinstance(merged, dict):
        return merged
    out = {}
    for key, value in merged.items():
        if value is None:
            continue
        if key in ("type", "pageId"):
            value = to_string(value)
        elif key == "value":
            value = _page_value(value)
        else:
            continue
        _put_some(out, key, value)
    return out or None


def _page_value(value: Any) -> Any:
    return _strings(value) if isinstance(value, list) else to_string(value)


def _dsp_metadata(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Failed("stringify_values() takes an object")
    return {key: to_text(item) for key, item in value.items() if item is not None} or None


def _purchase_item(product: dict[str, Any]) -> dict[str, Any] | None:
    item: dict[str, Any] = {}
    _put_some(item, "productId", to_string(product.get("product_id")))
    _put_some(item, "unitPrice", to_number(product.get("price")))
    _put_some(item, "quantity", to_integer(product.get("quantity")))
    _put_some(item, "vendorId", to_string(_first(product.get("vendorId"), product.get("brand"))))
    return item or None


def _product_entity(holder: dict[str, Any]) -> dict[str, Any] | None:
    """The organic entity of a product id, when there is one."""
    product_id = holder.get("product_id")
    return {"type": "product", "id": product_id} if _truthy(product_id) else None


def _entity(value: Any) -> Any:
    return _fit_object(value, _ENTITY)


def _fit_object(value: Any, fields: dict[str, Callable[[Any], Any]]) -> Any:
    """Keep the known keys, coerced; drop the rest and nulls (None when nothing is left)."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if item is not None and key in fields:
            _put_some(out, key, fields[key](item))
    return out or None


def _strings(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    return [to_string(item) for item in value if item is not None]


def _merge(first: Any, second: Any) -> Any:
    if second is None:
        return first
    if isinstance(first, dict) and isinstance(second, dict):
        return {**first, **second}
    return second


def _concat(*parts: Any) -> str | None:
    for part in parts:
        if part is not None and (isinstance(part, bool) or not isinstance(part, (str, int, float))):
            raise _Failed("concat() takes strings and numbers")
    if any(part is None for part in parts):
        return None
    return "".join(to_text(part) for part in parts)


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None and value != "":
            return value
    return None


def _truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    return not isinstance(value, (str, list, dict)) or bool(value)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else _EMPTY


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """A top-level field: nulls and empty strings are left out."""
    if value is not None and value != "":
        out[key] = value


def _put_some(out: dict[str, Any], key: str, value: Any) -> None:
    """A nested field: nulls are left out."""
    if value is not None:
        out[key] = value
