"""Name rule folders on the command line: a folder or file, or ``REF:PATH`` read from git.

``main:rules`` is the ``rules`` folder as commit ``main`` has it (git's own revision syntax:
``PATH`` from the repository's root, ``REF:./PATH`` from the current folder), so CI can compare a
branch's rules with main's without a checkout. It is copied into a temporary folder that lives
as long as the command.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import tempfile
from contextlib import ExitStack
from pathlib import Path

from ..errors import RulesFolderError


def resolve_rules_folder(name: str, cleanup: ExitStack) -> Path:
    """The folder (or file) ``name`` names: itself when it exists, else ``REF:PATH`` read from the
    git repository of the current folder into a temporary folder removed by ``cleanup``."""
    path = Path(name)
    if path.exists() or ":" not in name:
        if not path.exists():
            raise RulesFolderError(f"{name}: no such rules folder or file")
        return path
    ref, inside = name.split(":", 1)
    kind = _git("cat-file", "-t", name, what=name).decode().strip()
    if kind not in ("tree", "blob"):
        raise RulesFolderError(f"{name}: git names a {kind}, not a rules folder or file")
    temporary = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="segment-topsort-git-")))
    # a readable location for messages: <tmp>/<ref>/<path>, e.g. .../main/rules/interactions.yaml
    target = temporary / _safe(ref) / _safe(inside.strip("/") or "root")
    if kind == "blob":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_git("cat-file", "blob", name, what=name))
        return target
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_git("archive", "--format=tar", name, what=name))) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(target, filter="data")
        else:  # Python < 3.11.4: plain files and folders only, none outside the target
            archive.extractall(target, members=[m for m in archive.getmembers() if _plain(m)])
    return target


def _plain(member: tarfile.TarInfo) -> bool:
    parts = Path(member.name).parts
    return (member.isfile() or member.isdir()) and not Path(member.name).is_absolute() and ".." not in parts


def _git(*args: str, what: str) -> bytes:
    try:
        done = subprocess.run(["git", *args], capture_output=True, timeout=120)
    except FileNotFoundError:
        raise RulesFolderError(f"{what}: not a folder here, and git (to read it as REF:PATH) is not installed") from None
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise RulesFolderError(f"{what}: not a folder here, and git cannot read it as REF:PATH "
                               f"({reason[-1] if reason else f'git exit {done.returncode}'})")
    return done.stdout


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._/-]+", "_", part).replace("..", "_")
