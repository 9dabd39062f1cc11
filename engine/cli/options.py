"""Command-line options shared by the commands that load rules and deliver to Topsort."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from ..engine import Engine
from ..delivery.api_key import read_api_key
from ..errors import ApiKeyError, EngineError, RulesFolderError
from ..limits import MAX_GZIP_RATIO, MAX_LINE_BYTES, InputLimits
from ..rules.folders import resolve_rules_folder
from ..record import SourceFault
from ..reports.summary import Tally
from ..workers import usable_cores

F = TypeVar("F", bound=Callable[..., Any])

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
"""Where the commands speak to the user: progress, summaries, warnings and errors."""


class RulesFolder(click.ParamType):
    """A rules folder or file, or ``REF:PATH`` read from git for as long as the command runs."""

    name = "DIR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            return value
        cleanup = ExitStack()
        if ctx is not None:
            ctx.call_on_close(cleanup.close)
        try:
            return resolve_rules_folder(str(value), cleanup)
        except RulesFolderError as exc:
            self.fail(str(exc), param, ctx)


rules_option = click.option(
    "--rules", "rule_dirs", multiple=True, type=RulesFolder(),
    help="A rules folder, or REF:PATH read from git (repeatable; later folders override rules of the same "
         "name). Default: the bundled rules.",
)


def rule_folders(command: F) -> F:
    """``--rules DIR`` (repeatable) and the same folders as trailing arguments, as ``rule_dirs``."""

    @functools.wraps(command)
    def named_either_way(*args: Any, rule_paths: tuple[Path, ...] = (), rule_dirs: tuple[Path, ...] = (),
                         **kwargs: Any) -> Any:
        if rule_paths and rule_dirs:
            raise click.UsageError("name the rule folders either as arguments or with --rules, not both")
        return command(*args, rule_dirs=rule_paths or rule_dirs, **kwargs)

    with_option = rules_option(named_either_way)
    return click.argument("rule_paths", nargs=-1, type=RulesFolder(), metavar="[RULES]...")(with_option)  # type: ignore[return-value]


def delivery_tuning(command: F) -> F:
    """``--max-in-flight``, ``--max-latency``, ``--max-retry-time`` and ``--timeout``: how the
    :class:`~engine.delivery.dispatch.Dispatcher` sends to Topsort."""
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


def endpoint_option(*, required: bool) -> Callable[[F], F]:
    """``--endpoint`` (or ``TOPSORT_ENDPOINT``): Topsort's base URL."""
    return click.option("--endpoint", envvar="TOPSORT_ENDPOINT", metavar="URL", required=required,
                        help="Topsort's base URL, e.g. https://api.topsort.com (or TOPSORT_ENDPOINT).")


api_key_file_option = click.option(
    "--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the Topsort API key (default: the TOPSORT_API_KEY environment variable).",
)


workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=lambda: usable_cores(), show_default="the usable cores",
    help="Processes that decode and map events (1: all in this process). Output is the same for any number.",
)


EXIT_INPUT_SKIPPED = 3
"""Exit status of a command that went through, but could not read some input (a damaged,
unreadable or refused file or folder, each reported with its path)."""


def input_limits(command: F) -> F:
    """``--max-line-bytes`` and ``--max-gzip-ratio``, given to the command as ``limits``."""

    options = [
        click.option("--max-line-bytes", type=click.IntRange(min=1024), default=MAX_LINE_BYTES, show_default=True,
                     help="Longest input line (or record) read; a longer one is skipped and dead-lettered."),
        click.option("--max-gzip-ratio", type=click.FloatRange(min=1), default=MAX_GZIP_RATIO, show_default=True,
                     help="Largest expansion of a gzipped input (past its first 16 MiB); beyond it the rest of"
                          " the file is refused as a likely gzip bomb."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def limits_from(settings: dict[str, Any]) -> InputLimits:
    """The :class:`InputLimits` of :func:`input_limits`' options, taken out of ``settings``."""
    return InputLimits(settings.pop("max_line_bytes"), settings.pop("max_gzip_ratio"))


def report_fault(console: Console, tally: Tally, fault: SourceFault) -> None:
    """Say on ``console`` which source could not be read to its end, and count it."""
    console.print(f"[yellow]{escape(str(fault))}[/]")
    tally.fault(fault)


def api_key_or_exit(key_file: Path | None, missing: str) -> str:
    """The Topsort API key (:func:`~engine.delivery.api_key.read_api_key`), or a usage error: ``missing``
    when none is set, the one-sentence reason when it cannot be used."""
    try:
        key = read_api_key(key_file)
    except ApiKeyError as exc:
        raise click.UsageError(str(exc)) from None
    if key is None:
        raise click.UsageError(missing)
    return key


def endpoint_or_exit(endpoint: str) -> str:
    """``endpoint``, or a usage error when it is not an http(s) URL."""
    if not endpoint.startswith(("http://", "https://")):
        raise click.UsageError(f"--endpoint must be an http:// or https:// URL, not {endpoint!r}")
    return endpoint


def engine_or_exit(rule_dirs: tuple[Path, ...]) -> Engine:
    """The engine of ``rule_dirs`` (default: the bundled rules), or an error naming what is wrong."""
    try:
        return Engine.from_folders(*rule_dirs)
    except EngineError as exc:
        raise click.ClickException(f"{exc}\nRun `segment-topsort check` for details.") from None
