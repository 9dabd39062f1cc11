"""Where the bundled rules and schemas are: inside the wheel, or beside the package in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def bundled(name: str) -> Path:
    """The bundled folder ``rules`` or ``schemas``."""
    for candidate in (_PACKAGE / "_bundled" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled folder {name!r} not found beside {_PACKAGE}")


BUNDLED_RULES = bundled("rules")
SCHEMAS = bundled("schemas")
TOPSORT_SCHEMA = SCHEMAS / "topsort-events-v2.schema.json"
RULES_SCHEMA = SCHEMAS / "rules.schema.json"
