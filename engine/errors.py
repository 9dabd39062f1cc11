"""One exception hierarchy for the whole tool: catch :class:`EngineError` to catch them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
