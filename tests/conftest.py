"""Shared fixtures: the bundled engine, and a reference check that every emitted event is valid.

The reference is python-jsonschema (with its RFC 3339 format checker), independent of the
jsonschema-rs validator the engine itself uses.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from engine import Engine, Outcome
from engine.delivery.spool import Chunk
from engine.mapping import Mapped, encode_events
from engine.outcome import Emitted
from engine.record import Record
from engine.sandbox.server import Faults, Sandbox
from engine.topsort.schema import topsort_schema

ROOT = Path(__file__).resolve().parents[1]
_REFERENCE = {
    kind: jsonschema.Draft202012Validator(
        topsort_schema().kind_schema(kind), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    for kind in ("impressions", "clicks", "purchases", "pageviews")
}
_REQUEST = jsonschema.Draft202012Validator(
    topsort_schema().document, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def spool_emitted(chunk: Chunk, record: Record, emitted: Sequence[Emitted]) -> None:
    """Add to ``chunk`` the events ``record`` emitted, encoded as the map stage encodes them."""
    chunk.add_mapped(record, Mapped(None, "emitted", encode_events(emitted), (), None))


def assert_valid_topsort(kind: str, event: dict[str, Any]) -> None:
    """Fail unless ``event`` is a valid Topsort event of ``kind`` per python-jsonschema."""
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _REFERENCE[kind].iter_errors(event)]
    assert not errors, f"emitted {kind} event is not valid Topsort: {errors}\n{event}"


def assert_valid_request(body: dict[str, Any]) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _REQUEST.iter_errors(body)]
    assert not errors, f"request body is not valid: {errors[:5]}"


class CheckedEngine:
    """The engine, with every emitted output checked against the reference validator."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def process(self, event: Any) -> Outcome:
        outcome = self.engine.process(event)
        for emitted in outcome.emitted:
            assert_valid_topsort(emitted.kind, emitted.event)
        return outcome

    def outputs(self, event: Any, kind: str | None = None) -> list[dict[str, Any]]:
        """The emitted Topsort events (of ``kind`` when given), asserting nothing was rejected."""
        outcome = self.process(event)
        assert not outcome.rejected, outcome.rejected
        return [e.event for e in outcome.emitted if kind is None or e.kind == kind]


@pytest.fixture(scope="module")
def sandbox_server(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox per test module, accepting the module's ``KEY``."""
    with Sandbox(api_key=request.module.KEY) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: Sandbox) -> Sandbox:
    """The module's sandbox, emptied and without faults."""
    sandbox_server.set_faults(Faults(), seed=0)
    sandbox_server.reset()
    return sandbox_server


@pytest.fixture(scope="session")
def bundled() -> CheckedEngine:
    return CheckedEngine(Engine.from_folders())


def run_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> Any:
    """Run ``python -m engine ARGS`` and return the completed process (stdout/stderr as bytes)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "engine", *args], input=stdin, capture_output=True, cwd=cwd or ROOT, timeout=120
    )


def ndjson(data: bytes) -> list[Any]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]
