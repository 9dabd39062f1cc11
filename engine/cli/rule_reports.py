"""The ``diff`` and ``coverage`` commands: what a rule change does, and what the rules make of traffic."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import orjson

from .main import _engine, _progress
from .options import RulesFolder, rules_option
from ..reports.coverage import coverage_of
from ..reports.diff import diff_records
from ..reports.format import coverage_text, diff_text
from ..ingest.files import expand_sources, read_records
from ..errors import InputError
from ..record import Record

_FORMATS = click.Choice(["text", "markdown", "json"])


@click.command("diff")
@click.argument("files", nargs=-1)
@click.option("--base", "base_dirs", multiple=True, required=True, type=RulesFolder(),
              help="A rules folder of the rules before the change, or REF:PATH read from git, e.g. main:rules "
                   "(repeatable, like --rules).")
@rules_option
@click.option("--format", "output_format", type=_FORMATS, default="text", show_default=True,
              help="markdown is ready to paste into a pull request.")
@click.option("--examples", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Examples kept per output field (messageId, before, after).")
@click.option("--fail-on", type=click.Choice(["changed", "rejected", "never"]), default="never", show_default=True,
              help="Exit 1 when any event changes, or when any event gets a rejection it did not have.")
def diff_command(files: tuple[str, ...], base_dirs: tuple[Path, ...], rule_dirs: tuple[Path, ...],
                 output_format: str, examples: int, fail_on: str) -> None:
    """Run the same Segment events through two rule sets (--base, the old; --rules, the new) and
    report what changes: outcomes, Topsort events per rule, rejections, and fields.

    FILES as for `map`. The events stream: both rule sets map each event in one pass.
    """
    sources = _sources(files)
    before, after = _engine(base_dirs), _engine(rule_dirs)
    with _progress("comparing") as advance:
        found = diff_records(_counted(sources, advance), before, after, examples)
    report = found.report()
    _print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n" if output_format == "json"
           else diff_text(report, markdown=output_format == "markdown"))
    sys.exit(1 if found.failed(fail_on) else 0)  # type: ignore[arg-type]


@click.command("coverage")
@click.argument("files", nargs=-1)
@rules_option
@click.option("--format", "output_format", type=_FORMATS, default="text", show_default=True)
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Rejection reasons shown per rule.")
def coverage_command(files: tuple[str, ...], rule_dirs: tuple[Path, ...], output_format: str, top: int) -> None:
    """What arrives and what the rules make of it: every (type, event name) by volume with the
    rules that took it (or none); per rule matched, emitted, rejected and how often each field is filled.

    FILES as for `map`.
    """
    sources = _sources(files)
    engine = _engine(rule_dirs)
    with _progress("reading") as advance:
        found = coverage_of(_counted(sources, advance), engine)
    report = found.report(top)
    _print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n" if output_format == "json"
           else coverage_text(report, markdown=output_format == "markdown"))


def _sources(files: tuple[str, ...]) -> list[str]:
    try:
        return expand_sources(files or ("-",))
    except InputError as exc:
        raise click.UsageError(str(exc)) from None


def _counted(sources: list[str], advance: Callable[[], None]) -> Iterator[Record]:
    for record in read_records(sources):
        advance()
        yield record


def _print(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
