"""Request bodies for ``serve``: read within a deadline, decompressed as they stream, bounded, parsed.

``Content-Encoding: gzip`` and ``deflate`` (zlib, or raw deflate as some clients send it) are
inflated piece by piece with ``max_length``, so the request limit is counted on the decompressed
bytes and a bomb is refused with 413 once its output passes the limit, never expanded further.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from starlette.requests import Request

from ...errors import RequestRefused
from ...limits import MAX_DEPTH, too_deep
from .settings import MAX_EVENT_BYTES, MAX_REQUEST_BYTES

_PIECE = 64 * 1024
"""Most decompressed bytes produced per step."""


async def read_body(request: Request, timeout: float) -> tuple[bytes, bytes]:
    """The body as sent and decompressed: refused with 413 past the request limit, 408 past ``timeout``."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
        raise RequestRefused(415, "unsupported_encoding",
                      f"Content-Encoding {encoding!r} is not supported; send plain, gzip or deflate bodies")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise RequestRefused(413, "request_too_large", f"{declared} bytes; at most {MAX_REQUEST_BYTES} per request")
    inflate = _Inflater(encoding) if encoding not in ("identity", "") else None
    sent: list[bytes] = []
    plain: list[bytes] = []
    size = sent_size = 0
    try:
        async with asyncio.timeout(timeout):
            async for part in _pieces(request):
                sent_size += len(part)
                if sent_size > MAX_REQUEST_BYTES:
                    raise RequestRefused(413, "request_too_large", f"more than {MAX_REQUEST_BYTES} bytes in one request")
                sent.append(part)
                for piece in inflate.feed(part) if inflate else (part,):
                    size += len(piece)
                    if size > MAX_REQUEST_BYTES:
                        raise RequestRefused(413, "request_too_large",
                                      f"more than {MAX_REQUEST_BYTES} bytes in one request once decompressed"
                                      f" ({sent_size} compressed bytes read so far)")
                    plain.append(piece)
    except TimeoutError:
        raise RequestRefused(408, "request_timeout", f"the body was not received within {timeout:g} s") from None
    if inflate:
        inflate.finish()
        return b"".join(sent), b"".join(plain)
    body = b"".join(sent)
    return body, body


async def _pieces(request: Request) -> AsyncIterator[bytes]:
    async for part in request.stream():
        if part:
            yield part


class _Inflater:
    """Streaming gzip/deflate decompression that never yields more than ``_PIECE`` bytes at a time."""

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding != "deflate"
        self._head = b""
        self._inflate: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decompressed pieces of ``data``; the caller counts them against the limit as they come."""
        piece = self._next(data)
        while piece:
            yield piece
            piece = self._next(b"")

    def finish(self) -> None:
        if self._inflate is None or not self._inflate.eof:
            what = "gzip" if self._gzip else "deflate"
            raise RequestRefused(400, "bad_encoding", f"the {what} body is truncated")

    def _next(self, data: bytes) -> bytes:
        """Decompress up to ``_PIECE`` bytes of ``data`` (and what is left of earlier input)."""
        if self._inflate is None:  # deflate: zlib-wrapped per RFC 9110, or raw as some clients send it
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            zlib_header = (data[0] & 0x0F) == 8 and int.from_bytes(data[:2], "big") % 31 == 0
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        inflate = self._inflate
        if inflate.eof:
            if self._gzip and inflate.unused_data[:2] == b"\x1f\x8b":  # another gzip member
                data = inflate.unused_data + data
                self._inflate = inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif inflate.unused_data.strip(b"\0") or data.strip(b"\0"):
                raise RequestRefused(400, "bad_encoding", "bytes follow the end of the compressed body")
            else:
                return b""
        try:
            return inflate.decompress(inflate.unconsumed_tail + data, _PIECE)
        except zlib.error as exc:
            raise RequestRefused(400, "bad_encoding", f"the body cannot be decompressed: {exc}") from None


def parse(body: bytes) -> Any:
    """The JSON value of a body, or 400 (also for one nested deeper than events may be)."""
    if too_deep(body):
        raise RequestRefused(400, "too_deep", f"the body nests deeper than {MAX_DEPTH} levels, as no input may")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestRefused(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def check_event_size(size: int, what: str) -> None:
    """Refuse an event over Segment's 32 KB limit with 413."""
    if size > MAX_EVENT_BYTES:
        raise RequestRefused(413, "event_too_large", f"{what} is {size} bytes; at most {MAX_EVENT_BYTES} per event")
