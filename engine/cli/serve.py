"""``segment-topsort serve``: the command over :class:`engine.ingest.http.server.Server`."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import click

from ..delivery.retry import RetryPolicy
from ..errors import EngineError, RulesInvalid
from ..ingest.http.server import Server, ServeSettings
from .options import (
    api_key_file_option, api_key_or_exit, delivery_tuning, endpoint_option, endpoint_or_exit, rules_option,
)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@endpoint_option(required=True)
@api_key_file_option
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
    endpoint_or_exit(endpoint)
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
