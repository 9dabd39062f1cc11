"""The dispatcher's HTTP transport: the standard library's ``http.client``, one keep-alive
connection per posting thread, behind httpx's transport interface.

httpx's own transport (httpcore and h11, in Python) costs about 140 µs of CPU per request here, and
``http.client`` (its parser in C) about 55: with a few thousand requests per 100 000 events, sharing
one core with the spool and the reader, that difference is a tenth of ``run``'s time. The dispatcher
keeps httpx's interface (requests, responses, exceptions, the ``transport=`` seam), and uses httpx's
own transport when the environment names a proxy for the endpoint (:func:`default_transport`).

Failures are raised as httpx's: a timeout as :class:`httpx.TimeoutException`, a header that cannot
be sent as :class:`httpx.LocalProtocolError`, any other failure to connect, send or read as
:class:`httpx.TransportError`. A kept-alive connection the server closed
meanwhile is opened again once, at once, before the failure counts.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request

import httpx


def default_transport(url: str, timeout: float, connections: int) -> httpx.BaseTransport:
    """The transport for ``url``: :class:`PerThreadTransport`, or httpx's through the proxy that
    ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` name for it (unless ``NO_PROXY`` spares its host)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return PerThreadTransport(timeout)  # each request fails as httpx says why
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(parsed.host, proxies):
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.HTTPTransport(proxy=proxy, limits=limits)
    return PerThreadTransport(timeout)


class PerThreadTransport(httpx.BaseTransport):
    """Sends each request on its thread's own keep-alive connection (``http``/``https`` only)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._local = threading.local()
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.scheme, url.host, url.port)
        target = url.raw_path.decode("ascii")
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers.raw}
        body = request.read()
        kept = getattr(self._local, "connection", None) is not None and self._local.key == key
        while True:
            try:
                connection = self._connection(key, reuse=kept)
                connection.request(request.method, target, body=body, headers=headers)
                response = connection.getresponse()
                content = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                if kept:
                    kept = False  # the server closed the idle connection: once more, on a new one
                    continue
                raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}", request=request) from exc
            except ValueError as exc:  # a header http.client will not send (a line break in it)
                self._drop()
                raise httpx.LocalProtocolError(str(exc), request=request) from exc
            except TimeoutError as exc:
                self._drop()
                raise httpx.ReadTimeout(f"no answer within {self._timeout} s", request=request) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc
            if response.will_close:
                self._drop()
            return httpx.Response(response.status, headers=response.getheaders(), content=content, request=request)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, set()
        for connection in connections:
            connection.close()

    def _connection(self, key: tuple[str, str, int | None], *, reuse: bool) -> http.client.HTTPConnection:
        """This thread's connection to ``key`` (scheme, host, port): the kept one if ``reuse``, else a new one."""
        if reuse:
            return self._local.connection
        self._drop()
        scheme, host, port = key
        if scheme == "https":
            with self._lock:
                if self._ssl is None:
                    self._ssl = httpx.create_ssl_context()
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self._timeout, context=self._ssl)
        elif scheme == "http":
            connection = http.client.HTTPConnection(host, port, timeout=self._timeout)
        else:
            raise httpx.UnsupportedProtocol(f"cannot send to a {scheme!r} URL")
        self._local.connection, self._local.key = connection, key
        with self._lock:
            self._all.add(connection)
        return connection

    def _drop(self) -> None:
        """Close this thread's connection, if any."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            self._local.connection = None
            connection.close()
            with self._lock:
                self._all.discard(connection)
