"""When to retry a request to Topsort, and how long to wait before the next attempt."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 429})
"""Answers worth retrying besides every 5xx."""

_EPOCH_THRESHOLD = 1_000_000_000
"""An ``X-RateLimit-Reset`` above this is a Unix time, below it a number of seconds."""


def is_transient(status: int) -> bool:
    """Whether an HTTP status means "try again later" (408, 429, 5xx)."""
    return status in RETRY_STATUSES or 500 <= status <= 599


def server_delay(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait (``Retry-After`` or ``X-RateLimit-Reset``), if any.

    ``Retry-After`` may be a number of seconds or an HTTP date; ``X-RateLimit-Reset`` a number
    of seconds or a Unix time. The longer of the two wins; a date in the past means "now".
    """
    now = time.time() if now is None else now
    delays = [
        delay
        for delay in (
            _parse_retry_after(headers.get("retry-after"), now),
            _parse_reset(headers.get("x-ratelimit-reset"), now),
        )
        if delay is not None
    ]
    return max(delays) if delays else None


def _parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _parse_reset(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return max(0.0, number - now if number > _EPOCH_THRESHOLD else number)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a total time budget per request.

    Attempt ``n`` (0-based) waits a random time in ``[0, min(cap, base * 2**n)]`` unless the
    server named a delay, which is then honoured as given. Once the next wait would end past
    ``max_elapsed`` seconds after the first attempt, the request is given up.

    ``unanswered_limit``, when set: if the endpoint has not answered a single request that many
    seconds after the first one was sent (or when a request would be given up before then),
    delivery stops instead of giving events up: the address is wrong or down, not the events.
    """

    base: float = 0.2
    cap: float = 20.0
    max_elapsed: float = 120.0
    unanswered_limit: float | None = None
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """How long to wait before retry number ``attempt + 1``."""
        if hint is not None:
            return hint
        return self.rng.uniform(0.0, min(self.cap, self.base * 2.0**attempt))
