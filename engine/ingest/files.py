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
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..errors import InputError, SourceError, SourceRefused
from ..ndjson import LineBlock, batch_events, event_record, line_records, too_long, undecoded
from ..record import Checkpoint, OnFault, Record, SourceFault
from ..limits import (
    DEFAULT_LIMITS,
    GZIP_RATIO_FLOOR,
    KEPT_BYTES,
    MAX_DOCUMENT_BYTES,
    InputLimits,
    MiB,
    size,
)

STDIN = "-"
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD = 256
"""Bytes at the start of a source kept in its checkpoint, to recognise it on the next run."""
_SKIP_CHUNK = MiB
"""Bytes read at a time while skipping the rest of an over-long line."""
BLOCK = MiB
"""Bytes of NDJSON read at a time by :func:`read_blocks` (a few hundred events)."""
_BLANK_RUN = 1024
"""Blank lines in a row kept in a block as newlines; a longer run ends it."""


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


def read_blocks(
    sources: Iterable[str | Path], limits: InputLimits = DEFAULT_LIMITS, on_fault: OnFault | None = None,
) -> Iterator[Record | LineBlock]:
    """What :func:`read_records` reads with ``decoded=False``, with the lines of NDJSON handed over in
    :class:`~engine.ndjson.LineBlock` values of about ``BLOCK`` bytes, for the map stage to split
    (:func:`~engine.ndjson.block_records`): the same records, at a fraction of the cost here. A plain
    file (or stdin) is read a block at a time, cut at a newline; a gzipped one line by line, as
    :func:`read_source` reads it (its expansion checked as it goes), its lines joined. JSON documents,
    and a source that is no regular file (a pipe, a folder), come record by record."""
    for name in expand_sources(sources):
        if name != STDIN and not _regular(name):
            for record, _ in read_source(name, limits=limits, on_fault=on_fault, decoded=False):
                yield record
            continue
        at = _Cursor()
        try:
            with nullcontext((sys.stdin.buffer, None)) if name == STDIN else _open(name) as (stream, compressed):
                if name != STDIN:
                    stream.read(_HEAD)  # as read_source does: a source whose start cannot be read never opened
                    stream.seek(0)
                at.opened = True
                reader = _Lines(stream, limits, compressed, name)
                if (document := _document_records(name, reader, b"", None)) is not None:
                    yield from (record for record, _ in document)
                elif compressed is None:
                    yield from reader.blocks(at, BLOCK)
                else:
                    yield from reader.joined(at, BLOCK)
        except (OSError, EOFError, zlib.error, SourceRefused) as exc:
            _fault(name, exc, at, on_fault)


def read_source(
    name: str, start: Checkpoint | None = None, *, limits: InputLimits = DEFAULT_LIMITS,
    on_fault: OnFault | None = None, decoded: bool = True, blocks: bool = False,
) -> Iterator[tuple[Record | LineBlock, Checkpoint | None]]:
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

    With ``blocks`` (and ``decoded=False``), the NDJSON lines of a plain file come in
    :class:`~engine.ndjson.LineBlock` values of about ``BLOCK`` bytes, as :func:`read_blocks` reads
    them, each with the checkpoint reached at its end (the one the line-by-line read gives at that
    line); a gzipped file, a JSON document and stdin come record by record as without it.
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
            blocked = blocks and not decoded and compressed is None
            yield from _read(name, stream, head, start if same else None, limits, at, compressed, decoded, blocked)
    except (OSError, EOFError, zlib.error, SourceRefused) as exc:
        _fault(name, exc, at, on_fault)


def _regular(name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name).st_mode)
    except OSError:
        return False


def uncompressed_size(name: str) -> int | None:
    """The bytes a plain file holds (for progress), or None for stdin, gzipped and unreadable files, and
    anything but a regular file (a pipe's first bytes are not read here)."""
    if name == STDIN or not _regular(name):
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


def _fault(name: str, exc: BaseException, at: _Cursor, on_fault: OnFault | None) -> None:
    """Hand a source that could not be read to its end to ``on_fault``; raise :class:`SourceError` without one."""
    fault = SourceFault(name, at.line if at.opened else None, _damage(exc, at))
    if on_fault is None:
        raise SourceError(str(fault)) from None
    on_fault(fault)


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
    compressed: BinaryIO | None, decoded: bool = True, blocks: bool = False,
) -> Iterator[tuple[Record | LineBlock, Checkpoint | None]]:
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
    elif (document := _document_records(origin, reader, head, start)) is not None:
        yield from document
        return
    if blocks:
        for unit in reader.blocks(at, BLOCK):
            yield unit, _checkpoint(origin, reader.offset, at.line, head[: reader.offset])
        return
    yield from _ndjson(origin, reader, head, at, decoded)


def _document_records(
    origin: str, reader: _Lines, head: bytes, start: Checkpoint | None
) -> Iterator[tuple[Record, Checkpoint | None]] | None:
    """The records of a source that is one JSON document (see :func:`_read`), or None for NDJSON."""
    text = reader.peek_line().strip()
    if text.startswith(b"[") or (text.startswith(b"{") and not _parses(text)):
        data = reader.read_ahead(MAX_DOCUMENT_BYTES)
        if len(data) <= MAX_DOCUMENT_BYTES and reader.at_end():
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if text.startswith(b"["):
                    error = f"{origin}: not a valid JSON document: {exc}"
                    return iter([(Record(origin, 1, data[:2048], error=error), _checkpoint(origin, len(data), 1, head))])
            else:
                return _document(origin, document, len(data), head, start)
    return None


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

    def blocks(self, at: _Cursor, size: int) -> Iterator[LineBlock | Record]:
        """The rest of a plain stream as blocks of whole lines (the last one perhaps without its
        newline); a line longer than the limit that no block could hold whole comes as its
        record (:func:`~engine.ndjson.too_long`), the rest of it skipped. When each is handed out,
        ``at.line`` counts the lines handed out and ``offset`` is where they end."""
        pending, self._ahead, self._at = self._ahead[self._at:], b"", 0
        while True:
            chunk = self._stream.read(size)
            data = pending + chunk if pending else chunk
            first = at.line + 1
            if not chunk:
                if data:
                    at.line += data.count(b"\n") + (not data.endswith(b"\n"))
                    self.offset += len(data)
                    yield LineBlock(self._origin, first, data, self.max_line_bytes)
                return
            cut = data.rfind(b"\n") + 1
            pending = data[cut:]
            if cut:
                at.line += data.count(b"\n", 0, cut)
                self.offset += cut
                yield LineBlock(self._origin, first, data[:cut], self.max_line_bytes)
            if len(pending) > self.max_line_bytes:  # a line too long, its end not read yet
                at.line += 1
                record = too_long(self._origin, at.line, pending, self.max_line_bytes)
                self.offset += len(pending)
                pending = self._after_newline(size)
                yield record

    def _after_newline(self, size: int) -> bytes:
        """Skip to the end of the line being read (counted in ``offset``); what follows it in the last chunk read."""
        while chunk := self._stream.read(size):
            if (end := chunk.find(b"\n")) >= 0:
                self.offset += end + 1
                return chunk[end + 1:]
            self.offset += len(chunk)
        return b""

    def joined(self, at: _Cursor, size: int) -> Iterator[LineBlock | Record]:
        """The rest of the stream read line by line (as :meth:`__iter__` reads it: the gzip ratio
        checked as it goes), the lines joined into blocks of about ``size`` bytes; an over-long line
        comes as its record. The lines read before a fault are handed out before it is raised."""
        parts: list[bytes] = []
        length, first = 0, at.line + 1
        try:
            for line, newlines, over in self:
                if parts and (over or length >= size):
                    yield LineBlock(self._origin, first, b"".join(parts), self.max_line_bytes)
                    parts, length = [], 0
                if not parts:
                    first = at.line + 1
                at.line += newlines
                if over:
                    yield too_long(self._origin, at.line, line, self.max_line_bytes)
                    continue
                if not line and newlines > _BLANK_RUN:  # a long run of blank lines: the next block starts after it
                    if parts:
                        yield LineBlock(self._origin, first, b"".join(parts), self.max_line_bytes)
                        parts, length = [], 0
                    continue
                parts.append(line or b"\n" * newlines)  # a short run of blank lines keeps its count
                length += len(line) or newlines
        except (OSError, EOFError, zlib.error, SourceRefused):
            if parts:
                yield LineBlock(self._origin, first, b"".join(parts), self.max_line_bytes)
            raise
        if parts:
            yield LineBlock(self._origin, first, b"".join(parts), self.max_line_bytes)

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
    for raw, lines, over in reader:
        at.line += lines
        line = at.line
        checkpoint = _checkpoint(origin, reader.offset, line, head[: reader.offset])
        if over:
            yield too_long(origin, line, raw, reader.max_line_bytes), checkpoint
            continue
        raw = raw.strip()
        if not raw:
            continue
        if not decoded and undecoded(raw):
            yield Record(origin, line, raw), checkpoint
            continue
        records = line_records(origin, line, raw)
        last = len(records) - 1
        for position, record in enumerate(records):
            yield record, checkpoint if position == last else None


def _document(
    origin: str, document: Any, size: int, head: bytes, start: Checkpoint | None
) -> Iterator[tuple[Record, Checkpoint | None]]:
    events = batch_events(document)
    if events is None:
        events = document if isinstance(document, list) else [document]
    taken = start.line if start is not None else 0
    for number, event in enumerate(events, start=1):
        if number > taken:
            offset = size if number == len(events) else 0
            yield event_record(origin, number, event), _checkpoint(origin, offset, number, head)


def _checkpoint(origin: str, offset: int, line: int, head: bytes) -> Checkpoint | None:
    return None if origin == STDIN else Checkpoint(offset, line, head)
