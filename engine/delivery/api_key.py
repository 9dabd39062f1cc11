"""The Topsort API key: read in one place, checked before use, never shown."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import ApiKeyError

ENV_VAR = "TOPSORT_API_KEY"
_SENDABLE = re.compile(r"[\x21-\x7e]+")
"""What an HTTP header value carries as a bearer token: printable ASCII, no spaces."""


def read_api_key(key_file: Path | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key in ``key_file`` (alone on its line), else in ``TOPSORT_API_KEY``; None when neither is set.

    Surrounding whitespace (a trailing newline) is trimmed. A key with anything an HTTP header
    cannot carry inside it — a second line, a space, a control or non-ASCII character — raises
    :class:`ApiKeyError` in one sentence that names where the key came from, not the key.
    """
    if key_file is not None:
        where = str(key_file)
        try:
            key = key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read the API key from {where}: {exc.__class__.__name__}") from None
    else:
        where, key = ENV_VAR, environ.get(ENV_VAR, "").strip()
    if not key:
        return None
    if not _SENDABLE.fullmatch(key):
        kind = "more than one line" if "\n" in key or "\r" in key else "spaces, control or non-ASCII characters"
        raise ApiKeyError(
            f"the API key in {where} has {kind}; it must be the key alone (printable ASCII) on one line"
        )
    return key


_BEARER = re.compile(r"(?i)\bbearer\s+[^\s'\"]+")
_SHORTEST_SCRUBBED = 8
"""Keys shorter than this (test keys) are only scrubbed after ``Bearer``, not wherever their letters occur."""


def scrub(text: str, key: str) -> str:
    """``text`` without the key: for errors that may quote the ``Authorization`` header."""
    if len(key) >= _SHORTEST_SCRUBBED:
        text = text.replace(key, "<API key>")
    return _BEARER.sub("Bearer <API key>", text)
