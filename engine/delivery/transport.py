"""The dispatcher's HTTP transport: httpx's own, with the proxy the environment names.

The dispatcher sends each request straight through an ``httpx.BaseTransport`` (an
``httpx.Client`` around it costs ~80 µs more CPU per request, for redirects, cookies and auth
it does not use), so the environment's proxy settings, which the client would apply, are applied here.
"""

from __future__ import annotations

import urllib.request

import httpx


def default_transport(url: str, connections: int) -> httpx.HTTPTransport:
    """httpx's transport for ``url``, keeping up to ``connections`` alive, through the proxy that
    ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` name for it (unless ``NO_PROXY`` spares its host)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return httpx.HTTPTransport(limits=limits)  # each request fails as httpx says why
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(parsed.host, proxies):
        return httpx.HTTPTransport(proxy=proxy, limits=limits)
    return httpx.HTTPTransport(limits=limits)
