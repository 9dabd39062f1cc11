"""The dispatcher's default transport: httpx's, through the proxy the environment names for the endpoint."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from engine.delivery.transport import default_transport

_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                    "no_proxy")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        answer = self.path.encode()  # absolute ("http://host/...") when asked as a proxy
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _post(url: str) -> str:
    with default_transport(url, 2) as transport:
        response = transport.handle_request(httpx.Request("POST", url, content=b"{}"))
        return response.read().decode()


def test_without_a_proxy_requests_go_straight_to_the_endpoint(server: str) -> None:
    assert _post(f"{server}/v2/events") == "/v2/events"


def test_a_proxy_named_by_the_environment_carries_the_requests(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", server)
    assert _post("http://topsort.invalid/v2/events") == "http://topsort.invalid/v2/events"
    monkeypatch.setenv("NO_PROXY", "topsort.invalid")
    with pytest.raises(httpx.ConnectError):  # spared: sent straight to a host that does not exist
        _post("http://topsort.invalid/v2/events")


def test_an_endpoint_httpx_cannot_parse_fails_at_its_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """As with a client: the dispatcher's first request fails and stops delivery with httpx's reason."""
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    with pytest.raises(httpx.InvalidURL):
        _post("http://[::1/v2/events")
