"""``segment-topsort serve``: receive Segment events over HTTP and deliver them to Topsort.

A request is answered 200 only once its events are committed to the spool; they are mapped by the
rules on arrival and delivered in the background by the same :class:`~engine.delivery.dispatch.Dispatcher`
as ``run``. The pieces:

* :mod:`engine.ingest.http.app`: the HTTP application: paths, credentials, CORS, refusals;
* :mod:`engine.ingest.http.body`: bodies read within a deadline, decompressed as they stream, bounded;
* :mod:`engine.ingest.http.tracking`: Segment's Tracking API semantics (batch context, clock skew, ids);
* :mod:`engine.ingest.http.delivery`: the thread that owns the spool and delivers; admission to it;
* :mod:`engine.ingest.http.acking_spool`: requests' events committed together, repeated messageIds dropped;
* :mod:`engine.ingest.http.reload`: the rules in force and their reloads;
* :mod:`engine.ingest.http.dedupe`, :mod:`engine.ingest.http.metrics`, :mod:`engine.ingest.http.settings`.

This module holds the server (uvicorn on a thread); the command is :mod:`engine.cli.serve`. SIGHUP reloads the rules if the
new set has no errors; SIGTERM or Ctrl-C stops taking requests, answers those in flight and gives
delivery a moment to empty the spool.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import TracebackType
from typing import Any, Self

import uvicorn

from ...errors import ServeError, ServerStartError
from ...http_server import head_deadline_protocol, listen, start_in_thread
from .app import Receiver
from .settings import MAX_EVENT_BYTES, MAX_REQUEST_BYTES, MAX_REQUEST_EVENTS, ServeSettings

__all__ = ["MAX_EVENT_BYTES", "MAX_REQUEST_BYTES", "MAX_REQUEST_EVENTS", "Receiver", "ServeError", "ServeSettings",
           "Server"]

log = logging.getLogger("segment_topsort.serve")

_KEEP_ALIVE = 5
"""Seconds an idle keep-alive connection stays open."""


# -- the server ------------------------------------------------------------------------------------


class Server:
    """A :class:`Receiver` served by uvicorn on a background thread: a context manager.

    ``port=0`` picks a free port; :attr:`url` is the base URL once started. Leaving the context
    stops taking requests, answers those in flight, then drains and closes the spool.
    """

    def __init__(self, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.receiver = Receiver(settings, on_failure=self.stop)
        self._address = (host, port)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> Self:
        sock, self.url = listen(*self._address)
        try:
            self.receiver.start()
        except BaseException:
            sock.close()
            raise
        config = uvicorn.Config(
            self.receiver.app, lifespan="off", access_log=False, log_config=None, log_level="warning",
            timeout_graceful_shutdown=self.receiver.settings.drain_timeout, timeout_keep_alive=_KEEP_ALIVE,
            http=head_deadline_protocol(self.receiver.settings.read_timeout),
        )
        self._server = uvicorn.Server(config)
        try:
            self._thread = start_in_thread(self._server, sock, "segment-topsort-serve")
        except ServerStartError:
            self.receiver.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._thread:
            self._thread.join()
        self.receiver.close()

    def stop(self) -> None:
        """Stop taking requests (those in flight are answered); safe from any thread or a signal handler."""
        if self._server:
            self._server.should_exit = True

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM; SIGHUP reloads the rules. Call from the main thread."""
        with self:
            log.info("receiving Segment events on %s (POST /webhook, /v1/batch, /v1/track, ...)", self.url)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_hup)
            assert self._thread is not None
            while self._thread.is_alive():
                self._thread.join(0.2)
            log.info("stopping: delivering what is left in the spool")
        if self.receiver.failure is not None:
            raise ServeError(str(self.receiver.failure))

    def _on_stop(self, signum: int, frame: Any) -> None:
        if self._server and self._server.should_exit:
            self._server.force_exit = True  # a second signal: do not wait for requests in flight
        self.stop()

    def _on_hup(self, signum: int, frame: Any) -> None:
        threading.Thread(target=self.receiver.reload_rules, name="segment-topsort-reload", daemon=True).start()
