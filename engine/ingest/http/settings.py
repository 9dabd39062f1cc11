"""What ``serve`` is configured with, and Segment's Tracking API limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...delivery.pipeline import DeliveryTarget
from ...delivery.retry import RetryPolicy

MAX_EVENT_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_REQUEST_EVENTS = 2500
"""Segment's Tracking API limits, applied to every request (sizes counted after decompression)."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``serve`` needs. The secrets are left out of ``repr``."""

    endpoint: str
    api_key: str = field(repr=False)
    spool: Path
    dead_letters: Path
    rule_dirs: tuple[Path, ...] = ()
    shared_secret: str | None = field(default=None, repr=False)
    """Segment webhook secret; when set, ``/webhook`` requires a matching ``X-Signature``."""
    write_keys: frozenset[str] = field(default=frozenset(), repr=False)
    """Write keys accepted on ``/v1/*``; empty accepts any."""
    cors_origins: frozenset[str] = frozenset()
    """Browser origins allowed to post to ``/v1/*`` (``*``: any); empty: no cross-origin browser calls."""
    max_spooled: int = 50_000
    """Requests are answered 503 while this many Topsort events wait for delivery or are being received."""
    retry_after: int = 5
    dedupe_size: int = 100_000
    dedupe_seconds: float = 24 * 3600.0
    drain_timeout: float = 10.0
    read_timeout: float = 30.0
    """Seconds a client has to send a request's headers (else the connection is closed) and its body (else 408)."""
    watch_rules: float = 0.0
    """Seconds between two looks at the rule files, reloading them when they changed; 0: only on SIGHUP."""
    max_in_flight: int = 8
    max_latency: float = 1.0
    timeout: float = 10.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def target(self) -> DeliveryTarget:
        """Where and how the spool is delivered."""
        return DeliveryTarget(self.endpoint, self.api_key, self.max_in_flight, self.max_latency, self.timeout,
                              self.policy)
