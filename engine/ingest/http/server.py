"""``segment-topsort serve``: receive Segment events over HTTP and deliver them to Topsort.

A request is answered 200 only once its events are committed to the spool; they are mapped by the
rules on arrival and delivered in the background by the same :class:`~engine.dispatch.Dispatcher`
as ``run``. The pieces:

* :mod:`engine.ingest.http.app`: the HTTP application: paths, credentials, CORS, refusals;
* :mod:`engine.ingest.http.body`: bodies read within a deadline, decompressed as they stream, bounded;
* :mod:`engine.ingest.http.tracking`: Segment's Tracking API semantics (batch context, clock skew, ids);
* :mod:`engine.ingest.http.delivery`: the thread that owns the spool and delivers; admission to it;
* :mod:`engine.ingest.http.acking_spool`: requests' events committed together, repeated messageIds dropped;
* :mod:`engine.ingest.http.reload`: the rules in force and their reloads;
* :mod:`engine.ingest.http.dedupe`, :mod:`engine.ingest.http.metrics`, :mod:`engine.ingest.http.settings`.

This module holds the server (uvicorn on a thread) and the command. SIGHUP reloads the rules if the
new set has no errors; SIGTERM or Ctrl-C stops taking requests, answers those in flight and gives
delivery a moment to empty the spool.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import click
import uvicorn

from ...cli.options import api_key_or_exit, delivery_tuning, rules_option
from ...errors import EngineError, RulesInvalid, ServeError, ServerStartError
from ...http_server import head_deadline_protocol, listen, start_in_thread
from ...delivery.retry import RetryPolicy
from .app import Receiver
from .settings import MAX_EVENT_BYTES, MAX_REQUEST_BYTES, MAX_REQUEST_EVENTS, ServeSettings

__all__ = ["MAX_EVENT_BYTES", "MAX_REQUEST_BYTES", "MAX_REQUEST_EVENTS", "Receiver", "ServeError", "ServeSettings",
           "Server", "serve_command"]

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


# -- the command -----------------------------------------------------------------------------------


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--endpoint", envvar="TOPSORT_ENDPOINT", metavar="URL", required=True,
              help="Topsort's base URL, e.g. https://api.topsort.com (or TOPSORT_ENDPOINT).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the Topsort API key (default: the TOPSORT_API_KEY environment variable).")
@rules_option
@click.option("--spool", "spool_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("segment-topsort-serve.spool"), show_default=True,
              help="SQLite file holding received events until Topsort accepts them.")
@click.option("--dead-letters", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("dead-letters.ndjson"), show_default=True,
              help="NDJSON file that receives every event that could not be delivered, with why.")
@click.option("--write-key", "write_keys", multiple=True, metavar="KEY",
              help="A write key to accept on /v1/* (repeatable; also SEGMENT_WRITE_KEYS, comma-separated)."
                   " None given: any.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A browser origin (https://shop.example) allowed to call /v1/* from analytics.js"
                   " (repeatable; * for any). None given: browsers cannot call serve across origins.")
@click.option("--max-spooled", type=click.IntRange(1), default=50_000, show_default=True,
              help="Answer 503 with Retry-After while this many Topsort events wait for delivery or are being received.")
@click.option("--retry-after", type=click.IntRange(1), default=5, show_default=True,
              help="Seconds a 503 asks the sender to wait.")
@click.option("--dedupe-window", "dedupe_size", type=click.IntRange(0), default=100_000, show_default=True,
              help="Remember this many recent messageIds to drop repeats (0: off).")
@click.option("--dedupe-seconds", type=click.FloatRange(min=0), default=86_400.0, show_default=True,
              help="Forget a messageId after this many seconds.")
@click.option("--watch-rules", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Also reload the rules when their files change, looking every SECONDS (0: only on SIGHUP).")
@click.option("--read-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a client has to send a request's headers (else the connection is closed) and body (else 408).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On stop, seconds to wait for requests in flight and for the spool to empty.")
@delivery_tuning
def serve_command(
    host: str, port: int, endpoint: str, api_key_file: Path | None, rule_dirs: tuple[Path, ...],
    spool_path: Path, dead_letters: Path, write_keys: tuple[str, ...], cors_origins: tuple[str, ...],
    max_retry_time: float, **tuning: Any,
) -> None:
    """Receive Segment events over HTTP (Webhooks destination, Tracking API, analytics.js) and deliver them to Topsort.

    Each request is answered 200 once its events are in the spool; delivery runs in the
    background. The webhook secret comes from SEGMENT_SHARED_SECRET. SIGHUP reloads the rules.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not endpoint.startswith(("http://", "https://")):
        raise click.UsageError(f"--endpoint must be an http:// or https:// URL, not {endpoint!r}")
    keys = {*write_keys, *re.split(r"[,\s]+", os.environ.get("SEGMENT_WRITE_KEYS", ""))} - {""}
    api_key = api_key_or_exit(api_key_file, "serve needs Topsort's API key: set TOPSORT_API_KEY or pass --api-key-file")
    settings = ServeSettings(
        endpoint=endpoint, api_key=api_key, spool=spool_path, dead_letters=dead_letters,
        rule_dirs=rule_dirs, shared_secret=os.environ.get("SEGMENT_SHARED_SECRET") or None,
        write_keys=frozenset(keys), cors_origins=frozenset(cors_origins), policy=RetryPolicy(max_elapsed=max_retry_time), **tuning,
    )
    try:
        Server(settings, host=host, port=port).serve_forever()
    except RulesInvalid as exc:
        raise click.ClickException(f"{exc}\nRun `segment-topsort check` for details.") from None
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
