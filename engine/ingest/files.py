"""Read Segment events the way Segment hands them out, streaming, one record per event.

A source is a file, ``-`` (stdin), a folder (read recursively, e.g. a downloaded Segment
archive ``segment-logs/<source-id>/<day>/…gz``) or a glob. Each file may be gzipped (told by its
first bytes, not its name) and holds either NDJSON — one event, or one ``{"batch": [...]}`` body,
per line; streamed in constant memory — or one JSON document: an array of events, a batch body
or a single event (read whole, as Segment's webhook and batch bodies are small).

One cohesive thing (reading file sources within the limits, resumably), hence over 350 lines.
"""

from __future__ import annotations

import errno
import glob
import gzip
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..errors import InputError, SourceError, SourceRefused
from ..record import Checkpoint, OnFault, Record, SourceFault, decode, too_deep_reason
from ..limits import (
    DEFAULT_LIMITS,
    GZIP_RATIO_FLOOR,
    KEPT_BYTES,
    MAX_DOCUMENT_BYTES,
    InputLimits,
    MiB,
    size,
    too_deep,
)

STDIN = "-"
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD = 256
"""Bytes at the start of a source kept in its checkpoint, to recognise it on the next run."""
_SKIP_CHUNK = MiB
"""Bytes read at a time while skipping the rest of an over-long line."""


def expand_sources(names: Iterable[str | Path]) -> list[str]:
    """Files to read, in order: folders become their files (recursively, sorted, hidden ones
    left out), globs their matches; ``-`` stays. A folder that cannot be listed stays itself,
    for :func:`read_source` to report. Raises :class:`InputError` for a missing one."""
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


def read_records(
    sources: Iterable[str | Path], limits: InputLimits = DEFAULT_LIMITS, on_fault: OnFault | None = None,
    *, decoded: bool = True,
) -> Iterator[Record]:
    """Every record of every source (see :func:`expand_sources`), in order; ``decoded=False``: see
    :func:`read_source`."""
    for name in expand_sources(sources):
        for record, _ in read_source(name, limits=limits, on_fault=on_fault, decoded=decoded):
            yield record


def read_source(
    name: str, start: Checkpoint | None = None, *, limits: InputLimits = DEFAULT_LIMITS,
    on_fault: OnFault | None = None, decoded: bool = True,
) -> Iterator[tuple[Record, Checkpoint | None]]:
    """The records of one file (or stdin) with the checkpoint reached after each.

    With ``start`` (a checkpoint of an earlier read of the same file), reading resumes after it,
    unless the file's first bytes show it is another file. Stdin has no checkpoints; records of
    one batch line share their line's checkpoint, given with the last of them.

    A source that cannot be read to its end (unreadable, a truncated or corrupt gzip, a gzip
    bomb) yields what it could and is handed to ``on_fault``, which is told its path and the
    last line read; without ``on_fault`` it raises :class:`SourceError` instead.

    With ``decoded=False``, an NDJSON line that cannot be a batch body (no ``batch`` and no
    ``\\u`` escape in it) is left undecoded (see :class:`~engine.record.Record`), for the map stage
    to decode, perhaps in a worker process; batch lines are still expanded here, event by event.
    """
    at = _Cursor()
    try:
        if name == STDIN:
            yield from _read(name, sys.stdin.buffer, b"", None, limits, at, None, decoded)
            return
        if Path(name).is_dir():  # a folder expand_sources could not list: say why
            os.scandir(name).close()
            raise IsADirectoryError(errno.EISDIR, "a folder that could not be listed", name)
        with _open(name) as (stream, compressed):
            head = stream.read(_HEAD)
            stream.seek(0)
            same = start is not None and head.startswith(start.head) and start.offset <= _size(name, stream)
            yield from _read(name, stream, head, start if same else None, limits, at, compressed, decoded)
    except (OSError, EOFError, zlib.error, SourceRefused) as exc:
        fault = SourceFault(name, at.line if at.opened else None, _damage(exc, at))
        if on_fault is None:
            raise SourceError(str(fault)) from None
        on_fault(fault)


def decode_line(origin: str, line: int, raw: bytes) -> Record:
    """The record of one (stripped, non-blank) input line."""
    record = decode(Record(origin, line, raw), check_depth=False)
    if record.error is None and too_deep(raw) and _batch(record.event) is None:  # a batch's events are checked one by one
        return Record(origin, line, raw, error=too_deep_reason(origin, line))
    return record


def uncompressed_size(name: str) -> int | None:
    """The bytes a plain file holds (for progress), or None for stdin, gzipped and unreadable files."""
    if name == STDIN:
        return None
    try:
        with open(name, "rb") as stream:
            return None if stream.read(2) == _GZIP_MAGIC else Path(name).stat().st_size
    except OSError:
        return None


@dataclass(slots=True)
class _Cursor:
    """How far a read got, for the report of a fault."""

    opened: bool = False
    line: int = 0


def _damage(exc: BaseException, at: _Cursor) -> str:
    rest = "; the rest of the file was not read" if at.opened else ""
    if isinstance(exc, SourceRefused):
        return f"{exc}{rest}"
    if isinstance(exc, EOFError):
        return f"the gzip data is truncated (it ends before its end marker){rest}"
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"the gzip data is corrupt ({exc}){rest}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be read: {exc.strerror}{rest}"
    return f"cannot be read: {exc}{rest}"


def _event_record(origin: str, line: int, event: Any) -> Record:
    """The record of one event of a batch or document, re-encoded; one too deep is refused."""
    try:
        raw = orjson.dumps(event)
    except orjson.JSONEncodeError:  # deeper than orjson writes
        return Record(origin, line, b"", error=too_deep_reason(origin, line))
    if too_deep(raw):
        return Record(origin, line, raw[:KEPT_BYTES], error=too_deep_reason(origin, line))
    return Record(origin, line, raw, event=event)


def _size(name: str, stream: BinaryIO) -> float:
    """The size a plain file has now; a gzipped one is taken as unbounded."""
    return float("inf") if isinstance(stream, gzip.GzipFile) else Path(name).stat().st_size


def _folder_files(folder: Path) -> list[str]:
    """The files under ``folder``, sorted; a subfolder that cannot be listed is kept as itself."""
    found: list[str] = []

    def unlisted(error: OSError) -> None:
        found.append(str(error.filename))

    for parent, folders, files in os.walk(folder, onerror=unlisted):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.extend(os.path.join(parent, name) for name in files if not name.startswith("."))
    return sorted(found, key=lambda name: Path(name).parts)


@contextmanager
def _open(name: str) -> Iterator[tuple[BinaryIO, BinaryIO | None]]:
    """The decompressed stream of a file, and its compressed one when it is gzipped."""
    with open(name, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raw.seek(0)
            yield raw, None
            return
        raw.seek(0)
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            yield stream, raw  # type: ignore[misc]


def _read(
    origin: str, stream: BinaryIO, head: bytes, start: Checkpoint | None, limits: InputLimits, at: _Cursor,
    compressed: BinaryIO | None, decoded: bool = True,
) -> Iterator[tuple[Record, Checkpoint | None]]:
    """A JSON document when the source parses as one, else NDJSON, line by line.

    Only a source that opens an array, or whose first line is not a whole JSON value (a
    pretty-printed object), is tried as a document; one that fails to parse then (a broken
    first line of NDJSON) is read line by line after all. A document is read whole, up to
    ``MAX_DOCUMENT_BYTES``; anything larger is NDJSON, and streams.
    """
    at.opened = True
    reader = _Lines(stream, limits, compressed, origin)
    if start is not None and start.offset > 0:
        reader.resume(start.offset)
        at.line = start.line
        yield from _ndjson(origin, reader, head, at, decoded)
        return
    first = reader.peek_line()
    text = first.strip()
    if text.startswith(b"[") or (text.startswith(b"{") and not _parses(text)):
        data = reader.read_ahead(MAX_DOCUMENT_BYTES)
        if len(data) <= MAX_DOCUMENT_BYTES and reader.at_end():
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
    yield from _ndjson(origin, reader, head, at, decoded)


def _parses(text: bytes) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


class _Lines:
    """The lines of a stream, each at most ``max_line_bytes`` long, read in bounded memory.

    An over-long line is skipped to its end (its first KiB kept), runs of blank lines are
    skipped a buffer at a time, and a gzipped stream that expands beyond the ratio limit is
    refused (:class:`SourceRefused`).
    """

    def __init__(self, stream: BinaryIO, limits: InputLimits, compressed: BinaryIO | None, origin: str) -> None:
        self._stream = stream
        self.max_line_bytes = limits.max_line_bytes
        self._ratio = limits.max_gzip_ratio
        self._compressed = compressed
        self._origin = origin
        self._ahead = b""
        """Bytes read from the start to decide the format, to be read again as lines (from ``_at``)."""
        self._at = 0
        self.offset = 0
        self._next_check = GZIP_RATIO_FLOOR

    def resume(self, offset: int) -> None:
        self._stream.seek(offset)
        self.offset = offset

    def peek_line(self) -> bytes:
        """The first line (bounded), kept to be read again."""
        self._ahead = self._stream.readline(self.max_line_bytes + 1)
        return self._ahead

    def read_ahead(self, size: int) -> bytes:
        """Up to ``size + 1`` bytes from the start, kept to be read again as lines."""
        self._ahead += self._stream.read(size + 1 - len(self._ahead))
        return self._ahead

    def at_end(self) -> bool:
        return len(self._ahead) <= MAX_DOCUMENT_BYTES

    def __iter__(self) -> Iterator[tuple[bytes, int, bool]]:
        """``(line, newlines, too_long)``; ``newlines`` counts the lines it stands for (a run of
        blank lines is one empty ``line``), ``too_long`` marks a line cut to its first KiB."""
        while True:
            line = self._readline(self.max_line_bytes + 1)
            if not line:
                return
            self.offset += len(line)
            if len(line) > self.max_line_bytes and not line.endswith(b"\n"):
                self._skip_rest()
                yield line[:KEPT_BYTES], 1, True
            elif line.isspace():
                yield b"", 1 + self._skip_blank(), False
            else:
                yield line, 1, False
            if self.offset >= self._next_check:
                self._check_ratio()

    def _readline(self, size: int) -> bytes:
        if self._at == len(self._ahead):
            return self._stream.readline(size)
        ahead, start = self._ahead, self._at
        cut = ahead.find(b"\n", start, start + size)
        end = cut + 1 if cut >= 0 else min(start + size, len(ahead))
        line, self._at = ahead[start:end], end
        if self._at == len(ahead):
            self._ahead, self._at = b"", 0
            if not line.endswith(b"\n") and len(line) < size:
                line += self._stream.readline(size - len(line))
        return line

    def _skip_rest(self) -> None:
        while True:
            part = self._readline(_SKIP_CHUNK)
            self.offset += len(part)
            if self.offset >= self._next_check:
                self._check_ratio()
            if not part or part.endswith(b"\n"):
                return

    def _skip_blank(self) -> int:
        """Skip whole blank lines at hand (a buffer at a time); return how many."""
        skipped = 0
        while self._at == len(self._ahead) and hasattr(self._stream, "peek"):
            buffered = self._stream.peek(_SKIP_CHUNK)
            blank = len(buffered) - len(buffered.lstrip())
            end = buffered.rfind(b"\n", 0, blank) + 1
            if end <= 0:
                break
            self._stream.read(end)
            self.offset += end
            skipped += buffered.count(b"\n", 0, end)
            if self.offset >= self._next_check:
                self._check_ratio()
        return skipped

    def _check_ratio(self) -> None:
        self._next_check = self.offset + MiB
        if self._compressed is None or self.offset < GZIP_RATIO_FLOOR:
            return
        read = max(self._compressed.tell(), 1)
        if self.offset > self._ratio * read:
            raise SourceRefused(
                f"gzip expands {self.offset / read:,.0f}× ({size(read)} → {size(self.offset)} so far), past the"
                f" limit of {self._ratio:g}× (--max-gzip-ratio): refused as a likely gzip bomb"
            )


def _ndjson(
    origin: str, reader: _Lines, head: bytes, at: _Cursor, decoded: bool = True
) -> Iterator[tuple[Record, Checkpoint | None]]:
    for raw, lines, too_long in reader:
        at.line += lines
        line = at.line
        checkpoint = _checkpoint(origin, reader.offset, line, head[: reader.offset])
        if too_long:
            error = f"{origin}:{line}: line longer than {size(reader.max_line_bytes)} (--max-line-bytes); skipped"
            yield Record(origin, line, raw, error=error), checkpoint
            continue
        raw = raw.strip()
        if not raw:
            continue
        if not decoded and b"batch" not in raw and b"\\u" not in raw:  # cannot spell {"batch": ...}
            yield Record(origin, line, raw), checkpoint
            continue
        record = decode_line(origin, line, raw)
        batch = _batch(record.event)
        if batch is None:
            yield record, checkpoint
            continue
        for position, event in enumerate(batch, start=1):
            yield _event_record(origin, line, event), checkpoint if position == len(batch) else None


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
            yield _event_record(origin, number, event), _checkpoint(origin, offset, number, head)


def _checkpoint(origin: str, offset: int, line: int, head: bytes) -> Checkpoint | None:
    return None if origin == STDIN else Checkpoint(offset, line, head)


def _batch(value: Any) -> list[Any] | None:
    """The events of a Segment batch body ``{"batch": [...]}``, or None for anything else."""
    if isinstance(value, dict) and isinstance(value.get("batch"), list) and "type" not in value:
        return value["batch"]
    return None
