"""Serve an ASGI app with uvicorn on a socket of our own, in a background thread.

Shared by ``serve`` and the sandbox: binding first gives the real port of ``port=0`` (tests use
free ports) and lets the caller build its URL before the server runs.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import ServerStartError


def listen(host: str, port: int) -> tuple[socket.socket, str]:
    """A TCP socket bound to ``host:port`` (0: any free port), and the base URL it serves."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then, so small answers do not wait ~40 ms
        sock = socket.socket(family, kind, socket.IPPROTO_TCP)
    except OSError as exc:
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"http://{bound_host}:{bound_port}"
    return sock, url


def start_in_thread(server: uvicorn.Server, sock: socket.socket, name: str, timeout: float = 10) -> threading.Thread:
    """Run ``server`` on ``sock`` in a daemon thread; return once it accepts connections."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServerStartError(f"the {name} server did not start; see the log above")
        time.sleep(0.005)
    return thread


def head_deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived within ``seconds`` (uvicorn itself waits for them for ever). Pass as ``Config(http=...)``."""
    step = min(1.0, seconds / 4)

    class _HeadDeadline(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_since, self._head_cycle = time.monotonic(), self.cycle
            self._head_watch = self.loop.call_later(step, self._watch_head)

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_watch.cancel()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            if self.transport.is_closing():
                return
            if self.conn.their_state is not h11.IDLE or self.cycle is not self._head_cycle:
                self._head_since, self._head_cycle = time.monotonic(), self.cycle  # a request under way
            elif time.monotonic() - self._head_since >= seconds:
                self.transport.close()
                return
            self._head_watch = self.loop.call_later(step, self._watch_head)

    return _HeadDeadline
