"""Segment's Tracking API semantics, applied to ``/v1/*`` calls before the rules see them.

What Segment's own API does to a message before any destination gets it:

* a batch's top-level ``context`` and ``integrations`` are merged into each message (the
  message's own keys win);
* ``receivedAt`` is the time of arrival;
* ``timestamp`` is corrected for the client's clock skew, ``receivedAt - (sentAt - timestamp)``,
  the client's own ``timestamp`` kept as ``originalTimestamp`` (no ``sentAt``: it stays as sent; no
  ``timestamp``: ``receivedAt``);
* a message without a ``messageId`` gets one derived from its content, so a retried body gets
  the same ids and is deduplicated.

The write key (``writeKey`` in a body) is removed from every message: it never reaches an
event, a dead letter or the spool.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

_BATCH_DEFAULTS = ("context", "integrations")
_NOT_CONTENT = ("sentAt", "_metadata", "receivedAt")
"""Keys a client changes from one attempt to the next: left out of a generated messageId."""


def write_key_in(data: Any) -> str | None:
    """The ``writeKey`` a body carries (browser libraries put it there), if any."""
    key = data.get("writeKey") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


def batch_messages(data: dict[str, Any], received: datetime) -> list[Any]:
    """The messages of a ``/v1/batch`` body, each as Segment's API would pass it on."""
    defaults = {k: data[k] for k in _BATCH_DEFAULTS if isinstance(data.get(k), dict)}
    sent_at = data.get("sentAt")
    return [_message(m, defaults, sent_at, received) if isinstance(m, dict) else m for m in data["batch"]]


def single_message(data: dict[str, Any], call_type: str, received: datetime) -> dict[str, Any]:
    """The message of a ``/v1/{track,page,...}`` body; ``type`` taken from the path when missing."""
    if data.get("type") is None:
        data["type"] = call_type
    return _message(data, {}, None, received)


def _message(message: dict[str, Any], defaults: dict[str, Any], sent_at: Any, received: datetime) -> dict[str, Any]:
    message.pop("writeKey", None)
    for key, value in defaults.items():
        own = message.get(key)
        message[key] = {**value, **own} if isinstance(own, dict) else (value if own is None else own)
    if not isinstance(message.get("messageId"), str) or not message["messageId"]:
        message["messageId"] = _content_id(message)
    sent_at = message.pop("sentAt", sent_at)
    message["receivedAt"] = _iso(received)
    client_time = message.get("timestamp")
    client, sent = _instant(client_time), _instant(sent_at)
    if client is None:
        message["timestamp"] = message["receivedAt"]
        return message
    message.setdefault("originalTimestamp", client_time)
    if sent is not None:
        try:
            message["timestamp"] = _iso(received - (sent - client))
        except OverflowError:
            pass  # a correction outside the calendar: the client's time stays
    return message


def _content_id(message: dict[str, Any]) -> str:
    content = {k: v for k, v in message.items() if k not in _NOT_CONTENT}
    try:
        encoded = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # cannot be spooled either: it is rejected, a fresh id does no harm
        encoded = uuid.uuid4().bytes
    return "serve-" + hashlib.sha256(encoded).hexdigest()[:32]


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
