"""Command-line options shared by the commands that load rules and deliver to Topsort."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import click

from .rule_folders import RulesFolderError, resolve_rules_folder

F = TypeVar("F", bound=Callable[..., Any])


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
