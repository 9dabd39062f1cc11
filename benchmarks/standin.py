"""A loopback Topsort stand-in for throughput benchmarks: answers ``POST /v2/events`` with 204, at little cost.

    .venv/bin/python -m benchmarks.standin --port 8080 --key KEY

The sandbox (``segment-topsort sandbox``) checks every event against the schemas, as Topsort would, and
spends about a millisecond of CPU per request doing so; on a 2-core machine that CPU is taken from the
command being measured. This stand-in only checks the key, counts the events of each body and answers
204 (401 for another key), so a benchmark measures the client. ``GET /_sandbox/stats`` and
``POST /_sandbox/reset`` answer as the sandbox's do (``events_accepted``, ``requests`` by status).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

_ARRAYS = ("impressions", "clicks", "purchases", "pageviews")


class _Counts:
    def __init__(self) -> None:
        self.events = 0
        self.requests = Counter[str]()


async def _serve(port: int, key: str) -> None:
    counts = _Counts()
    bearer = f"bearer {key}".encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                request_line, *header_lines = head.split(b"\r\n")
                headers = dict(line.lower().split(b": ", 1) for line in header_lines if b": " in line)
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                status, payload = _respond(request_line, headers, body, counts, bearer)
                counts.requests[str(status)] += 1
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (status, len(payload), payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, limit=64 * 1024 * 1024)
    async with server:
        await server.serve_forever()


def _respond(request_line: bytes, headers: dict[bytes, bytes], body: bytes, counts: _Counts,
             bearer: bytes) -> tuple[int, bytes]:
    method, path, _ = request_line.split(b" ", 2)
    if path == b"/_sandbox/stats":
        return 200, orjson.dumps({"events_accepted": counts.events, "requests": counts.requests})
    if path == b"/_sandbox/reset":
        counts.events, counts.requests = 0, Counter()
        return 200, b"{}"
    if method != b"POST" or path != b"/v2/events":
        return 404, b"{}"
    if headers.get(b"authorization", b"").lower() != bearer:
        return 401, b'{"errCode":"unauthorized"}'
    data = orjson.loads(body)
    counts.events += sum(len(data.get(name, ())) for name in _ARRAYS)
    return 204, b""


def start_standin(key: str) -> tuple[str, subprocess.Popen[bytes]]:
    """The stand-in in a process of its own, accepting ``key``: its URL and process."""
    return start_server(lambda port: [sys.executable, "-m", "benchmarks.standin", "--port", str(port), "--key", key])


def start_server(command: Callable[[int], list[str]], env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """Start ``command(port)`` on a free loopback port and wait until it answers ``/_sandbox/stats``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(command(port), cwd=Path(__file__).resolve().parents[1], env=env or dict(os.environ),
                              stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/_sandbox/stats")
            return url, server
        except httpx.TransportError:
            time.sleep(0.05)
    server.terminate()
    raise SystemExit(f"{command(port)[2:4]} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.key))


if __name__ == "__main__":
    main()
