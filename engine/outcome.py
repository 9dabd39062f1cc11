"""What became of one input event: emitted Topsort events, rejections, or neither (skipped); and
the dead-letter record that keeps an event with rejections (its shape: :mod:`engine.delivery.dead_letters`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

from .limits import encodable
from .record import Record

Kind = Literal["impressions", "clicks", "purchases", "pageviews"]
KINDS: tuple[Kind, ...] = ("impressions", "clicks", "purchases", "pageviews")
"""The Topsort event kinds, named as the arrays of a ``POST /v2/events`` body."""


class Emitted(NamedTuple):
    """One Topsort event a rule made, valid against the Topsort schema for its kind.

    Treat ``event`` as read-only: the items of one fan-out may share nested values.
    """

    kind: Kind
    rule: str
    event: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rule": self.rule, "event": self.event}


class Rejection(NamedTuple):
    """Why an output (or one item of a fan-out), or one Topsort event at delivery, was not emitted.

    ``path`` is a JSON path into the Topsort event that failed (``$`` for the whole input),
    ``item`` the fan-out index when only one item of a list was rejected. A delivery failure also
    names the event's ``kind`` and ``id``, and Topsort's ``err_code`` when it gave one. This is the
    one shape of a rejection, in outcomes and in every dead letter.
    """

    rule: str | None
    path: str
    reason: str
    item: int | None = None
    kind: Kind | None = None
    id: str | None = None
    err_code: str | None = None

    def summary_key(self) -> tuple[str, str]:
        """How a summary counts it: its rule (``(input)`` for an input's own problem) and "path reason",
        without the event's origin and line, so that like rejections count together."""
        parts = self.reason.split(": ")
        # an input's own problem reads "origin:line: what: detail"; a rule's "…: why"
        reason = parts[-1] if self.rule is not None else parts[min(1, len(parts) - 1)]
        return self.rule or "(input)", f"{self.path} {reason}"

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"rule": self.rule, "path": self.path, "reason": self.reason, "item": self.item}
        if self.kind is not None:  # refused at delivery
            found.update(kind=self.kind, id=self.id, errCode=self.err_code)
        return found


def failure_rejection(rule: str | None, exc: BaseException) -> Rejection:
    """The rejection of an event whose mapping raised ``exc`` (a value beyond what the
    libraries take: nested too deep, a number too large), in one short sentence."""
    if isinstance(exc, RecursionError) or "recursion" in str(exc).lower():
        why = "nested too deeply to map"
    elif isinstance(exc, MemoryError):
        why = "too large to map in memory"
    else:
        detail = str(exc)
        why = f"cannot be mapped: {type(exc).__name__}" + (f": {detail[:200]}" if detail else "")
    return Rejection(rule, "$", why)


class Outcome(NamedTuple):
    """The one outcome of one input event. It is *skipped* when no rule wanted it."""

    message_id: str | None
    emitted: tuple[Emitted, ...] = ()
    rejected: tuple[Rejection, ...] = ()

    @property
    def skipped(self) -> bool:
        return not self.emitted and not self.rejected

    @property
    def verdict(self) -> str:
        """``emitted``, ``partly rejected`` (a fan-out kept some items), ``rejected`` or ``skipped``."""
        if self.rejected:
            return "partly rejected" if self.emitted else "rejected"
        return "emitted" if self.emitted else "skipped"

    def to_dict(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "emitted": [e.to_dict() for e in self.emitted],
            "rejected": [r.to_dict() for r in self.rejected],
            "skipped": self.skipped,
        }


Stage = Literal["decode", "map", "deliver"]


def now() -> str:
    """The time of a dead letter (``at``): UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter(
    *,
    stage: Stage,
    rejected: Sequence[dict[str, Any]],
    event: Any = None,
    raw: bytes | None = None,
    origin: str | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """Build one dead-letter record (see the module docstring for its shape)."""
    record: dict[str, Any] = {
        "at": now(),
        "stage": stage,
        "origin": origin,
        "line": line,
        "messageId": event.get("messageId") if isinstance(event, dict) else None,
        "rejected": list(rejected),
    }
    if raw is not None and (event is None or not encodable([event])):  # one level down, as in the record
        record["raw"] = raw.decode("utf-8", "replace")  # what orjson cannot write again is kept as read
    else:
        record["event"] = event
    return record


def rejected_input(record: Record, outcome: Outcome) -> dict[str, Any]:
    """The dead-letter record of an input line whose outcome holds rejections (decode or map)."""
    return dead_letter(
        stage="decode" if record.error else "map",
        rejected=[r.to_dict() for r in outcome.rejected],
        event=record.event,
        raw=record.raw,
        origin=record.origin,
        line=record.line,
    )
