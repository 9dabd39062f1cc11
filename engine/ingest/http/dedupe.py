"""``serve``'s memory of the messageIds it took: the window that drops Segment's repeated deliveries.

An id counts as seen only once its event is committed to the spool, in the same transaction
(:attr:`engine.delivery.spool.Chunk.seen`), so a request that failed leaves nothing behind and its retry is
taken; the ids live in the spool's database, so the window survives a restart. This class keeps
the in-memory mirror that requests consult.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable


class SeenIds:
    """The messageIds committed lately: at most ``size`` of them, none older than ``seconds``."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size, self.seconds = size, seconds
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __contains__(self, message_id: object) -> bool:
        if not self.enabled or not isinstance(message_id, str):
            return False
        with self._lock:
            seen_at = self._seen.get(message_id)
        return seen_at is not None and seen_at >= time.time() - self.seconds

    def remember(self, seen: Iterable[tuple[str, float]]) -> None:
        """Add ids (with the wall-clock time they were committed), then forget the oldest beyond the window."""
        if not self.enabled:
            return
        horizon = time.time() - self.seconds
        with self._lock:
            for message_id, seen_at in seen:
                self._seen[message_id] = seen_at
                self._seen.move_to_end(message_id)
            while self._seen and (len(self._seen) > self.size or next(iter(self._seen.values())) < horizon):
                self._seen.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
