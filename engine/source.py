"""Read Segment events the way Segment hands them out, streaming, one record per event.

A source is a file, ``-`` (stdin), a folder (read recursively, e.g. a downloaded Segment
archive ``segment-logs/<source-id>/<day>/…gz``) or a glob. Each file may be gzipped (told by its
first bytes, not its name) and holds either NDJSON — one event, or one ``{"batch": [...]}`` body,
per line; streamed in constant memory — or one JSON document: an array of events, a batch body
or a single event (read whole, as Segment's webhook and batch bodies are small).
"""

from __future__ import annotations

import glob
import gzip
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson

from .errors import EngineError

STDIN = "-"
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD = 256
"""Bytes at the start of a source kept in its checkpoint, to recognise it on the next run."""
_DOCUMENT_LIMIT = 64 * 1024 * 1024
"""The largest JSON document read whole; a larger source is NDJSON."""


class Record(NamedTuple):
    """One input event: the decoded event, or why it could not be decoded.

    ``line`` is the line of an NDJSON source, or the event's position in a JSON document.
    """

    origin: str
    line: int
    raw: bytes
    event: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far a source was read: the offset just past the last line taken, and its number.

    For a JSON document ``line`` counts the events taken. ``head`` is the source's first bytes
    (up to a few hundred), to tell the same source, perhaps grown since, from another one put
    in its place. Offsets of gzipped sources count decompressed bytes.
    """

    offset: int
    line: int
    head: bytes = b""


class InputError(EngineError):
    """An input named on the command line is not there."""


def expand_sources(names: Iterable[str | Path]) -> list[str]:
    """Files to read, in order: folders become their files (recursively, sorted, hidden ones
    left out), globs their matches; ``-`` stays. Raises :class:`InputError` for a missing one."""
    found: list[str] = []
    for name in map(str, names):
        if Path(name).is_dir():
            found.extend(_folder_files(Path(name)))
        elif name == STDIN or Path(name).exists():
            found.append(name)
        elif glob.has_magic(name) and (matches := sorted(glob.glob(name, recursive=True))):
            found.extend(expand_sources(matches))
        else:
            raise InputError(f"{name}: no such file or folder" + (", and no match" if glob.has_magic(name) else ""))
    return found


def read_records(sources: Iterable[str | Path]) -> Iterator[Record]:
    """Every record of every source (see :func:`expand_sources`), in order."""
    for name in expand_sources(sources):
        for record, _ in read_source(name):
            yield record


def read_source(name: str, start: Checkpoint | None = None) -> Iterator[tuple[Record, Checkpoint | None]]:
    """The records of one file (or stdin) with the checkpoint reached after each.

    With ``start`` (a checkpoint of an earlier read of the same file), reading resumes after it,
    unless the file's first bytes show it is another file. Stdin has no checkpoints; records of
    one batch line share their line's checkpoint, given with the last of them.
    """
    if name == STDIN:
        stream = sys.stdin.buffer
        first = stream.readline()
        yield from _read(name, stream, first, b"", None)
        return
    with _open(name) as stream:
        head = stream.read(_HEAD)
        stream.seek(0)
        first = stream.readline()
        same = start is not None and head.startswith(start.head) and start.offset <= _size(name, stream)
        yield from _read(name, stream, first, head, start if same else None)


def decode_line(origin: str, line: int, raw: bytes) -> Record:
    """The record of one (stripped, non-blank) input line."""
    try:
        return Record(origin, line, raw, event=orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        return Record(origin, line, raw, error=f"{origin}:{line}: not valid JSON: {exc}")


def uncompressed_size(name: str) -> int | None:
    """The bytes a plain file holds (for progress), or None for stdin and gzipped files."""
    if name == STDIN:
        return None
    with open(name, "rb") as stream:
        return None if stream.read(2) == _GZIP_MAGIC else Path(name).stat().st_size


def _size(name: str, stream: BinaryIO) -> float:
    """The size a plain file has now; a gzipped one is taken as unbounded."""
    return float("inf") if isinstance(stream, gzip.GzipFile) else Path(name).stat().st_size


def _folder_files(folder: Path) -> list[str]:
    return [
        str(path) for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


def _open(name: str) -> BinaryIO:
    stream = open(name, "rb")
    if stream.read(2) == _GZIP_MAGIC:
        stream.seek(0)
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    stream.seek(0)
    return stream


def _read(
    origin: str, stream: BinaryIO, first: bytes, head: bytes, start: Checkpoint | None
) -> Iterator[tuple[Record, Checkpoint | None]]:
    """A JSON document when the source parses as one, else NDJSON, line by line.

    Only a source that opens an array, or whose first line is not a whole JSON value (a
    pretty-printed object), is tried as a document; one that fails to parse then (a broken
    first line of NDJSON) is read line by line after all. A document is read whole, up to
    ``_DOCUMENT_LIMIT``; anything larger is NDJSON, and streams.
    """
    text = first.strip()
    lines: Iterable[bytes] = _chain([first], stream)
    if text.startswith(b"[") or (text.startswith(b"{") and not _parses(text)):
        rest = stream.read(_DOCUMENT_LIMIT)
        data = first + rest
        if len(rest) < _DOCUMENT_LIMIT:
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if text.startswith(b"["):
                    error = f"{origin}: not a valid JSON document: {exc}"
                    yield Record(origin, 1, data[:2048], error=error), _checkpoint(origin, len(data), 1, head)
                    return
            else:
                yield from _document(origin, document, len(data), head, start)
                return
        lines = _lines_after(data, stream)
    yield from _ndjson(origin, stream, lines, head, start)


def _parses(text: bytes) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _ndjson(
    origin: str, stream: BinaryIO, lines: Iterable[bytes], head: bytes, start: Checkpoint | None
) -> Iterator[tuple[Record, Checkpoint | None]]:
    offset = line = 0
    if start is not None and start.offset > 0:
        stream.seek(start.offset)
        offset, line, lines = start.offset, start.line, stream
    for raw in lines:
        line += 1
        offset += len(raw)
        checkpoint = _checkpoint(origin, offset, line, head[:offset])
        raw = raw.strip()
        if not raw:
            continue
        record = decode_line(origin, line, raw)
        batch = _batch(record.event)
        if batch is None:
            yield record, checkpoint
            continue
        for position, event in enumerate(batch, start=1):
            yield Record(origin, line, orjson.dumps(event), event=event), checkpoint if position == len(batch) else None


def _document(
    origin: str, document: Any, size: int, head: bytes, start: Checkpoint | None
) -> Iterator[tuple[Record, Checkpoint | None]]:
    events = _batch(document)
    if events is None:
        events = document if isinstance(document, list) else [document]
    taken = start.line if start is not None else 0
    for number, event in enumerate(events, start=1):
        if number > taken:
            offset = size if number == len(events) else 0
            yield Record(origin, number, orjson.dumps(event), event=event), _checkpoint(origin, offset, number, head)


def _checkpoint(origin: str, offset: int, line: int, head: bytes) -> Checkpoint | None:
    return None if origin == STDIN else Checkpoint(offset, line, head)


def _lines_after(prefix: bytes, stream: BinaryIO) -> Iterator[bytes]:
    """The lines of ``prefix`` (already read) and then of the rest of ``stream``."""
    lines = prefix.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += stream.readline()
    yield from lines
    yield from stream


def _batch(value: Any) -> list[Any] | None:
    """The events of a Segment batch body ``{"batch": [...]}``, or None for anything else."""
    if isinstance(value, dict) and isinstance(value.get("batch"), list) and "type" not in value:
        return value["batch"]
    return None


def _chain(first: Iterable[bytes], rest: Iterable[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest
