"""The ``segment-topsort`` command line: check, test, map and explain (run, replay, sandbox beside them)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import click
import orjson
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..topsort.batching import Batcher, encoded_body
from .options import (
    stderr,
    EXIT_INPUT_SKIPPED, input_limits, limits_from, report_fault, rule_folders, rules_option, workers_option,
)
from ..delivery.dead_letters import DeadLetterFile
from ..engine import Engine
from ..errors import InputError, Problem, RulesInvalid
from ..mapping import MappedSlice
from ..outcome import KINDS
from ..workers import make_mapper
from ..reports.explain import RuleExplanation, explain
from ..limits import MAX_DEPTH, MAX_LINE_BYTES, size, too_deep
from ..rules.loader import check_rules
from ..paths import BUNDLED_RULES
from ..rules.inline_tests import run_rule_tests
from ..ingest.files import expand_sources, read_blocks
from ..reports.summary import Tally


class _LazyGroup(click.Group):
    """Commands whose modules (HTTP servers, Kafka, delivery) are imported only when named,
    so `check`, `test`, `map` and `explain` start without them."""

    _LAZY = {
        "run": "engine.cli.deliver:run_command",
        "replay": "engine.cli.deliver:replay_command",
        "sandbox": "engine.cli.sandbox:sandbox_command",
        "serve": "engine.cli.serve:serve_command",
        "consume": "engine.cli.kafka:consume_command",
        "produce": "engine.cli.kafka:produce_command",
        "diff": "engine.cli.rule_reports:diff_command",
        "coverage": "engine.cli.rule_reports:coverage_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self._LAZY:
            return super().get_command(ctx, name)
        module, attribute = self._LAZY[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segment-topsort")
def main() -> None:
    """Turn Segment events into Topsort ad events with YAML + JMESPath rules."""


@main.command()
@rule_folders
def check(rule_dirs: tuple[Path, ...]) -> None:
    """Check rule folders (default: the bundled rules) before any event flows.

    Reports YAML, rule-schema, JMESPath and Topsort-schema errors as file:line:column,
    and warns of rules that would count one user action twice. Exits 1 on errors.
    """
    rules, problems = check_rules(rule_dirs or (BUNDLED_RULES,))
    _print_problems(problems)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    enabled = sum(rule.enabled for rule in rules)
    stderr.print(f"{_count(len(rules), 'rule')} ({enabled} enabled), {_count(errors, 'error')}, "
                 f"{_count(warnings, 'warning')}")
    sys.exit(1 if errors else 0)


@main.command("test")
@rule_folders
@click.option("--coverage", is_flag=True, help="Also list the fields and branches the tests exercised, and those not.")
def test_command(rule_dirs: tuple[Path, ...], coverage: bool) -> None:
    """Run the tests written inside the rule files; show a diff for each failure."""
    engine = _engine(rule_dirs)
    results = run_rule_tests(engine.rules.rules)
    for result in results:
        mark = "[green]pass[/]" if result.passed else "[red]FAIL[/]"
        rule = result.rule
        stderr.print(f"{mark} {escape(rule.name)}: {escape(result.name)}  [dim]{rule.file}:{rule.line}[/]")
        if result.failure:
            stderr.print(escape(_indent(result.failure, 6)))
    failed = sum(not r.passed for r in results)
    if coverage:
        from ..rules.inline_coverage import render_test_coverage, rule_test_coverage

        click.echo(render_test_coverage(rule_test_coverage(engine.rules.rules)))
    stderr.print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


@main.command("map")
@click.argument("files", nargs=-1)
@rules_option
@input_limits
@click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path),
              help="Append each rejected input event, with rule, path and reason, to this NDJSON file.")
@click.option("--format", "output_format", type=click.Choice(["requests", "outcomes"]), default="requests",
              show_default=True,
              help="requests: Topsort request bodies (at most 50 per array); outcomes: one line per input event.")
@workers_option
def map_command(
    files: tuple[str, ...], rule_dirs: tuple[Path, ...], rejects: Path | None, output_format: str, workers: int,
    **limits: Any,
) -> None:
    """Map Segment events to Topsort events, without sending anything.

    FILES are NDJSON, JSON arrays or batch bodies, gzipped or not; folders (read recursively,
    e.g. a Segment archive), globs, or - for stdin (the default).
    """
    try:
        sources = expand_sources(files or ("-",))
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    engine = _engine(rule_dirs)
    tally = Tally()
    mapper = make_mapper(engine, workers)
    units = read_blocks(sources, limits_from(limits), on_fault=partial(report_fault, stderr, tally))
    with (DeadLetterFile(rejects) if rejects else nullcontext()) as dead, _progress("mapping") as advance, \
            closing(mapper):
        output = _MapOutput(sys.stdout.buffer, tally, dead)
        for mapped in mapper.summaries(units, outcome_lines=output_format == "outcomes"):
            output.add(mapped)
            advance(sum(mapped.verdicts.values()))
        requests = output.finish()
    extra = {"requests written": requests} if output_format == "requests" else {}
    if rejects:
        extra["rejected events kept"] = dead.written if dead else 0
    stderr.print(tally.table("map", extra))
    if tally.faults:
        sys.exit(EXIT_INPUT_SKIPPED)


class _MapOutput:
    """Where ``map`` puts what each slice became: the tally, the dead letters, and its output
    (``--format outcomes`` lines as they come, or Topsort request bodies as the batcher fills them)."""

    def __init__(self, out: BinaryIO, tally: Tally, dead: DeadLetterFile | None) -> None:
        self._out, self._tally, self._dead = out, tally, dead
        self._batcher: Batcher[bytes] = Batcher()
        self.requests = 0

    def add(self, mapped: MappedSlice) -> None:
        self._tally.add_slice(mapped)
        if self._dead is not None:
            for letter in mapped.dead_letters:
                self._dead.write_encoded(letter)
        _write(self._out, mapped.outcome_lines)
        add = self._batcher.add
        for code, body in zip(mapped.kinds, mapped.bodies):
            if batch := add(KINDS[code], body):
                self.requests += _write(self._out, encoded_body(batch) + b"\n")

    def finish(self) -> int:
        """Write the last request body; the request bodies written."""
        if (batch := self._batcher.flush()) is not None:
            self.requests += _write(self._out, encoded_body(batch) + b"\n")
        return self.requests


@main.command("explain")
@click.argument("event_file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@rule_folders
def explain_command(event_file: str, rule_dirs: tuple[Path, ...]) -> None:
    """Show, for one Segment event (a JSON file), every rule considered and what it made of it."""
    with (nullcontext(sys.stdin.buffer) if event_file == "-" else open(event_file, "rb")) as stream:
        data = stream.read(MAX_LINE_BYTES + 1)
    if len(data) > MAX_LINE_BYTES:
        raise click.ClickException(f"{event_file} is larger than {size(MAX_LINE_BYTES)}, the limit of one event")
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise click.ClickException(f"{event_file} is not a JSON document: {exc}") from None
    if too_deep(data):
        raise click.ClickException(f"{event_file} nests deeper than {MAX_DEPTH} levels, the limit of one event")
    engine = _engine(rule_dirs)
    console = Console(highlight=False, soft_wrap=True)
    if not isinstance(event, dict):
        console.print(f"Not a Segment event: a JSON object is expected, this is {type(event).__name__}.")
        sys.exit(1)
    console.print(f"[bold]Event[/] messageId={event.get('messageId')!r} type={event.get('type')!r}"
                  + (f" event={event.get('event')!r}" if event.get("type") == "track" else ""))
    for explanation in explain(engine, event):
        _print_explanation(console, explanation)
    outcome = engine.process(event)
    verdict = "skipped (no rule wants it)" if outcome.skipped else (
        f"{len(outcome.emitted)} emitted, {len(outcome.rejected)} rejected")
    console.print(f"[bold]Outcome:[/] {verdict}")


def _print_explanation(console: Console, found: RuleExplanation) -> None:
    rule = found.rule
    head = f"{escape(rule.name)} [dim]({_relative(rule.file)}:{rule.line}) -> {rule.kind}[/]"
    if not found.matched:
        console.print(f"[dim]-[/] {head}: [dim]{escape(found.why)}[/]")
        return
    console.print(f"[green]+[/] {head}: matched")
    for rejection in found.rejected:
        console.print(f"    [red]rejected[/] {rejection.path}: {escape(rejection.reason)}")
    for output in found.outputs:
        indent = "    "
        if output.item is not None:
            console.print(f"    [bold]item {output.item}[/]")
            indent += "  "
        width = max(len(value.field) for value in output.fields)
        for value in output.fields:
            shown = f"[red]error: {escape(value.error)}[/]" if value.error else escape(_json(value.value))
            spec = value.spec if isinstance(value.spec, str) else _json(value.spec)
            console.print(f"{indent}{value.field:<{width}}  {escape(spec)}  [dim]->[/] {shown}")
        if output.emitted is not None:
            console.print(f"{indent}[green]valid[/]: emits {escape(_json(output.emitted.event))}")
        for rejection in output.rejected:
            console.print(f"{indent}[red]rejected[/] {rejection.path}: {escape(rejection.reason)}")


def _relative(file: str) -> str:
    path = Path(file)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return file


def _engine(rule_dirs: Sequence[Path]) -> Engine:
    try:
        engine = Engine.from_folders(*rule_dirs)
    except RulesInvalid as exc:
        _print_problems(exc.problems)
        stderr.print("[red]The rules have errors; nothing was processed.[/] Run `segment-topsort check` for details.")
        sys.exit(2)
    _print_problems(list(engine.rules.warnings))
    return engine


def _print_problems(problems: Sequence[Problem]) -> None:
    for problem in problems:
        colour = "red" if problem.severity == "error" else "yellow"
        stderr.print(f"[{colour}]{escape(str(problem))}[/]")


def _write(out: BinaryIO, data: bytes) -> int:
    """Write ``data`` (lines already encoded) to the output; 1 when there was any."""
    if not data:
        return 0
    try:
        out.write(data)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): stop quietly
        sys.exit(0)
    return 1


@contextmanager
def _progress(label: str, every: int = 1024) -> Iterator[Any]:
    """A live count of events on a terminal (stderr); nothing otherwise."""
    if not stderr.is_terminal:
        yield lambda events=1: None
        return
    columns = (SpinnerColumn(), TextColumn(f"{label} {{task.completed:,}} events"), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(label, total=None)
        count = 0

        def advance(events: int = 1) -> None:
            nonlocal count
            if (count + events) // every > count // every:
                progress.update(task, completed=count + events)
            count += events

        yield advance


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # a value no JSON encoder writes (an integer beyond 64 bits)
        text = repr(value)
        return text if len(text) <= 200 else f"{text[:200]}…"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())
