"""Command-line options shared by the commands that load rules and deliver to Topsort."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

rules_option = click.option(
    "--rules", "rule_dirs", multiple=True, type=click.Path(exists=True, path_type=Path),
    help="A rules folder (repeatable; later folders override rules of the same name). Default: the bundled rules.",
)


def delivery_tuning(command: F) -> F:
    """``--max-in-flight``, ``--max-latency``, ``--max-retry-time`` and ``--timeout``: how the
    :class:`~engine.dispatch.Dispatcher` sends to Topsort."""
    options = [
        click.option("--max-in-flight", type=click.IntRange(1, 64), default=8, show_default=True,
                     help="Requests to Topsort at once."),
        click.option("--max-latency", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="Seconds an event may wait for its batch to fill."),
        click.option("--max-retry-time", type=click.FloatRange(min=0), default=120.0, show_default=True,
                     help="Seconds a request to Topsort is retried before its events are dead-lettered."),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                     help="Seconds to wait for Topsort's answer."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
