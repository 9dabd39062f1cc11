"""``segment-topsort sandbox``: serve the local Topsort stand-in (:mod:`engine.sandbox.server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ServerStartError
from ..sandbox.server import Faults, Sandbox
from .options import api_key_or_exit


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the API key to accept (default: the TOPSORT_API_KEY environment variable).",
)
@click.option(
    "--store", "store_file", type=click.Path(dir_okay=False, path_type=Path),
    help="Also append accepted events to this NDJSON file.",
)
@click.option(
    "--poison-prefix", default="poison", show_default=True,
    help="Refuse requests holding a resolvedBidId with this prefix, as Topsort refuses unknown bids; '' disables.",
)
@click.option("--rate-limit", type=click.FloatRange(0, 1), default=0.0, help="Share of requests answered 429.")
@click.option("--retry-after", type=click.IntRange(min=0), default=1, show_default=True, help="Retry-After seconds on 429.")
@click.option("--server-error", type=click.FloatRange(0, 1), default=0.0, help="Share of requests answered 500.")
@click.option("--drop", type=click.FloatRange(0, 1), default=0.0, help="Share of connections closed without an answer.")
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, help="Seconds added before every answer.")
@click.option("--slow", type=click.FloatRange(0, 1), default=0.0, help="Share of requests delayed by --slow-seconds.")
@click.option(
    "--slow-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True, help="Delay of the slow share."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fault draws.")
def sandbox_command(
    host: str,
    port: int,
    api_key_file: Path | None,
    store_file: Path | None,
    poison_prefix: str,
    seed: int,
    **fault_settings: Any,
) -> None:
    """Serve a local stand-in for Topsort's POST /v2/events, with optional fault injection."""
    api_key = api_key_or_exit(api_key_file, "no API key: set TOPSORT_API_KEY or pass --api-key-file")
    try:
        faults = Faults(**fault_settings)
        sandbox = Sandbox(
            api_key, faults=faults, seed=seed, poison_prefix=poison_prefix, store_file=store_file, host=host, port=port
        )
        sandbox.serve_forever(lambda url: click.echo(
            f"Topsort sandbox on {url}: POST /v2/events; GET /_sandbox/events, /_sandbox/stats"))
    except (ValueError, RuntimeError, OSError, ServerStartError) as exc:
        raise click.ClickException(str(exc)) from exc
