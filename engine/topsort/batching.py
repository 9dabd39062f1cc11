"""Pack Topsort events into request bodies: at most 50 per array, kinds mixed in one request."""

from __future__ import annotations

from typing import Generic, TypeVar

from ..outcome import KINDS, Kind

T = TypeVar("T")

MAX_PER_ARRAY = 50
"""Topsort accepts at most 50 events in each array of one request."""


class Batcher(Generic[T]):
    """Collects items by kind and hands out a batch as soon as one array is full.

    Items are usually Topsort event dicts (then a batch *is* a request body), but any
    payload works, e.g. spool rows that carry an event.
    """

    def __init__(self, limit: int = MAX_PER_ARRAY) -> None:
        if not 1 <= limit <= MAX_PER_ARRAY:
            raise ValueError(f"limit must be between 1 and {MAX_PER_ARRAY}, not {limit}")
        self._limit = limit
        self._pending: dict[Kind, list[T]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, kind: Kind, item: T) -> dict[Kind, list[T]] | None:
        """Add one item; return the batch when this item filled its kind's array."""
        items = self._pending.setdefault(kind, [])
        items.append(item)
        self._count += 1
        return self.flush() if len(items) >= self._limit else None

    def flush(self) -> dict[Kind, list[T]] | None:
        """Return everything pending as one batch (kinds in Topsort's order), or None."""
        if not self._count:
            return None
        batch = {kind: self._pending[kind] for kind in KINDS if self._pending.get(kind)}
        self._pending = {}
        self._count = 0
        return batch


def encoded_body(batch: dict[Kind, list[bytes]]) -> bytes:
    """The JSON of a request body whose events are already encoded (as ``orjson.dumps`` writes it
    with each event an ``orjson.Fragment``), kinds in Topsort's order."""
    parts = [b'"%s":[%s]' % (kind.encode(), b",".join(batch[kind])) for kind in KINDS if batch.get(kind)]
    return b"{" + b",".join(parts) + b"}"
