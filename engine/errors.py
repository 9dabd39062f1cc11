"""Every exception the package defines, in one hierarchy: catch :class:`EngineError` to catch them all.

::

    EngineError
    ├── RulesInvalid            the rule set has errors (each one a :class:`Problem`); nothing loaded
    ├── RulesFolderError        a rules folder is neither on disk nor in git
    ├── YamlSyntaxError         a rule file is not YAML (internal: reported as a Problem)
    ├── FieldError              a field's expression failed on one event (becomes its Rejection)
    ├── InputError              an input named on the command line is not there
    │   ├── SourceError         a source could not be read to its end (no ``on_fault`` given)
    │   └── SourceRefused       a limit stopped reading the rest of a source
    ├── ApiKeyError             the Topsort API key cannot be read or sent
    ├── SpoolError              the spool file cannot be used
    ├── DeliveryError           delivery cannot go on; events stay in the spool
    │   ├── AuthenticationError Topsort refused the API key (401/403)
    │   ├── EndpointError       the endpoint does not serve Topsort's events API (404/405)
    │   └── UnreachableError    the endpoint never answered
    ├── DeliveryStopped         the dispatcher is stopping (internal: ends a batch's retries)
    ├── DeadLetterTopicError    dead letters could not be written to their Kafka topic
    ├── KafkaSetupError         the Kafka settings cannot be used
    ├── ServerStartError        an HTTP server could not listen or start
    ├── ServeError              ``serve`` cannot take events now (answered 503)
    │   ├── SpoolFull           too many events wait for delivery
    │   └── ContentError        a request's events could not be stored for what they hold (500)
    └── RequestRefused          an HTTP request answered with an error status, code and reason

A :class:`Problem` is one thing wrong in a rule file (not an exception); what is wrong with one
event is a :class:`~engine.outcome.Rejection`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


class EngineError(Exception):
    """Base class of every error this package raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong (or suspicious) in a rule file, located as precisely as known."""

    file: str
    line: int | None
    column: int | None
    rule: str | None
    field: str | None
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [f"{where}: {self.severity}:"]
        if self.rule:
            parts.append(f"rule '{self.rule}'")
        if self.field:
            parts.append(f"field '{self.field}'")
        head = " ".join(parts)
        return f"{head}: {self.message}" if (self.rule or self.field) else f"{head} {self.message}"


class RulesInvalid(EngineError):
    """The rule set has errors; nothing was loaded. ``problems`` lists each one."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        super().__init__(f"{len(errors)} error(s) in rules:\n" + "\n".join(str(p) for p in errors))


class RulesFolderError(EngineError):
    """A rules folder named on the command line is neither on disk nor in git."""


class YamlSyntaxError(EngineError):
    """The file is not valid YAML; carries the position PyYAML reported (a
    :class:`~engine.rules.yaml_source.Position`, or None)."""

    def __init__(self, message: str, position: Any) -> None:
        super().__init__(message)
        self.position = position


class FieldError(EngineError):
    """A field's expression failed on this event (e.g. a function given the wrong type)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class InputError(EngineError):
    """An input named on the command line is not there."""


class SourceError(InputError):
    """A source could not be read to its end (raised when no ``on_fault`` handler is given)."""


class SourceRefused(InputError):
    """A limit stopped reading the rest of a source."""


class ApiKeyError(EngineError):
    """The API key cannot be read or cannot be sent; the message never shows the key."""


class SpoolError(EngineError):
    """The spool file cannot be used (in use by another run, or not a spool)."""


class DeliveryError(EngineError):
    """Delivery cannot go on; undelivered events stay in the spool for the next run."""


class AuthenticationError(DeliveryError):
    """Topsort refused the API key (401/403)."""


class EndpointError(DeliveryError):
    """The endpoint does not serve Topsort's events API (404/405)."""


class UnreachableError(DeliveryError):
    """The endpoint never answered (see :attr:`RetryPolicy.unanswered_limit`)."""


class DeliveryStopped(EngineError):
    """Delivery is stopping: leave the rest of the batch in the spool."""


class DeadLetterTopicError(EngineError):
    """Dead letters could not be written to their topic; they are kept and written again later."""


class KafkaSetupError(EngineError):
    """The Kafka settings cannot be used."""


class ServerStartError(EngineError):
    """The HTTP server could not listen, or did not start."""


class ServeError(EngineError):
    """The receiver cannot take events: its spool could not be opened or written, or delivery stopped."""


class SpoolFull(ServeError):
    """Too many events wait for delivery (or are being received) to take more now."""


class ContentError(ServeError):
    """The spool could not store a request's events because of what they hold (not the machine)."""


class RequestRefused(EngineError):
    """A request answered with an error: its status, a short code and a reason the sender can act on."""

    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.headers = status, error, reason, headers or {}
