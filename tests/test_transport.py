"""The dispatcher's transport: keep-alive per thread, a closed idle connection opened again, httpx's errors."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from engine.delivery.transport import PerThreadTransport, default_transport


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[tuple[str, int]] = set()
    close_after = False
    """Drop the connection after answering, without saying so (as an idle timeout does)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).connections.add(self.client_address)
        answer = b"%d:%s:%s" % (len(body), self.headers["Authorization"].encode(), self.path.encode())
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("Retry-After", "7")
        self.end_headers()
        self.wfile.write(answer)
        self.close_connection = type(self).close_after

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections, _Handler.close_after = set(), False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _client(timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(transport=PerThreadTransport(timeout), headers={"Authorization": "Bearer k"})


def test_requests_share_one_connection_and_keep_headers_body_and_path(server: str) -> None:
    with _client() as client:
        answers = [client.post(f"{server}/v2/events?x=1", content=b"x" * n) for n in (10, 20_000)]
    assert [a.text for a in answers] == ["10:Bearer k:/v2/events?x=1", "20000:Bearer k:/v2/events?x=1"]
    assert answers[0].status_code == 200 and answers[0].headers["retry-after"] == "7"
    assert len(_Handler.connections) == 1


def test_a_connection_closed_while_idle_is_opened_again(server: str) -> None:
    _Handler.close_after = True
    with _client() as client:
        answers = [client.post(f"{server}/v2/events", content=b"{}") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(_Handler.connections) == 3


def test_failures_are_httpx_transport_errors() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts, never answers
        port = listener.getsockname()[1]
        with _client(timeout=0.2) as client, pytest.raises(httpx.TimeoutException):
            client.post(f"http://127.0.0.1:{port}/v2/events", content=b"{}")
    with _client() as client, pytest.raises(httpx.TransportError):
        client.post(f"http://127.0.0.1:{port}/v2/events", content=b"{}")  # nothing listens any more


def test_a_proxy_named_by_the_environment_is_used_unless_the_host_is_spared(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(default_transport("https://api.topsort.com", 5.0, 8), PerThreadTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert isinstance(default_transport("https://api.topsort.com", 5.0, 8), httpx.HTTPTransport)
    assert isinstance(default_transport("http://127.0.0.1:9", 5.0, 8), PerThreadTransport)  # an https proxy only
    monkeypatch.setenv("NO_PROXY", "api.topsort.com")
    assert isinstance(default_transport("https://api.topsort.com", 5.0, 8), PerThreadTransport)


def test_an_endpoint_httpx_cannot_parse_is_left_to_fail_at_its_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """As before: the dispatcher's first request fails and stops delivery with httpx's reason."""
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    assert isinstance(default_transport("http://[::1/v2/events", 5.0, 8), PerThreadTransport)
