"""``segment-topsort run`` and ``replay``: map Segment events and deliver them to Topsort, durably.

Input is read on a thread of its own, mapped (in ``--workers`` processes) and committed to the spool
chunk by chunk, each chunk with the position reached in its file, so a run stopped at any point
(even by ``kill -9``) and started again with the same files resumes where it stopped. Standard input
is never skipped: it cannot be told apart from other data.

One module, a little over 350 lines: the two commands share their options, inputs, signal handling,
progress bar and summary, which are the whole of what a delivering command adds to the pipeline.
"""

from __future__ import annotations

import secrets
import select
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
from click.core import ParameterSource
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .options import (
    stderr,
    EXIT_INPUT_SKIPPED,
    api_key_file_option,
    api_key_or_exit,
    delivery_tuning,
    endpoint_option,
    endpoint_or_exit,
    engine_or_exit,
    input_limits,
    limits_from,
    report_fault,
    rules_option,
    workers_option,
)
from ..delivery.dispatch import Dispatcher
from ..errors import DeliveryError, EngineError
from ..delivery.pipeline import DeliveryTarget, MapStep, Pipeline, Source, deliver
from ..engine import Engine
from ..limits import InputLimits
from ..ndjson import decode_line
from ..delivery.retry import RetryPolicy
from ..ingest.files import (
    STDIN,
    Checkpoint,
    InputError,
    OnFault,
    Record,
    expand_sources,
    read_source,
    uncompressed_size,
)
from ..delivery.spool import Spool
from ..mapping import Mapper
from ..workers import make_mapper
from ..reports.summary import Tally

UNANSWERED_LIMIT = 30.0
"""Seconds after which a run whose endpoint never answered stops (sooner with a shorter --max-retry-time)."""
EXIT_TERMINATED = 143
"""Exit status after SIGTERM (128 + 15), as a shell reports a process ended by it."""

_NO_TARGET = (
    "run delivers to Topsort, so it needs an endpoint (--endpoint or TOPSORT_ENDPOINT) and an API"
    " key (TOPSORT_API_KEY or --api-key-file); to see what would be sent without sending anything"
    " use `segment-topsort map`, or deliver to a local stand-in started with `segment-topsort sandbox`."
)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where to deliver, and the files of a run."""

    delivery: DeliveryTarget
    spool: Path
    dead_letters: Path
    limits: InputLimits
    workers: int


_Inputs = Callable[[Spool, InputLimits, OnFault], list[Source]]
"""Opens the inputs of a run: given the spool (for checkpoints), the limits and where faults go."""


def _delivery_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        rules_option,
        endpoint_option(required=False),
        api_key_file_option,
        click.option("--spool", "spool_path", type=click.Path(dir_okay=False, path_type=Path),
                     default=Path("segment-topsort.spool"), show_default=True,
                     help="SQLite file holding events between mapping and delivery, and how far each file was read."),
        delivery_tuning,
        input_limits,
        workers_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("run")
@click.argument("files", nargs=-1)
@_delivery_options
@click.option("--dead-letters", "dead_letters", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("dead-letters.ndjson"), show_default=True,
              help="NDJSON file that receives every input event that could not be delivered, with why.")
@click.option("--sandbox", "use_sandbox", is_flag=True,
              help="Deliver to a local Topsort stand-in started for this run (see `segment-topsort sandbox`),"
                   " instead of --endpoint: a full rehearsal that sends nothing to Topsort.")
def run_command(
    files: tuple[str, ...], rule_dirs: tuple[Path, ...], dead_letters: Path, use_sandbox: bool, **settings: Any
) -> None:
    """Map Segment events and deliver them to Topsort.

    FILES are NDJSON, JSON arrays or batch bodies, gzipped or not; folders (read recursively,
    e.g. a Segment archive), globs, or - for stdin (the default).

    Events wait in the spool until Topsort accepts them or they are dead-lettered; run again
    with the same files after a crash or a stop, and it resumes where it stopped.
    """
    engine = engine_or_exit(rule_dirs)
    try:
        sources = expand_sources(files or (STDIN,))
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    names = list({name if name == STDIN else str(Path(name).resolve()): name for name in sources}.values())

    def inputs(spool: Spool, limits: InputLimits, on_fault: OnFault) -> list[Source]:
        return [_open_input(name, spool, limits, on_fault) for name in names]

    if not use_sandbox:
        _deliver("run", engine, _target(dead_letters=dead_letters, **settings), inputs)
        return
    if settings.get("endpoint"):
        raise click.UsageError("--sandbox and --endpoint exclude each other")
    key = secrets.token_urlsafe(24)
    spool_given = click.get_current_context().get_parameter_source("spool_path") != ParameterSource.DEFAULT
    from ..sandbox.server import Sandbox  # only a rehearsal loads the sandbox (Starlette, uvicorn)

    mapper = make_mapper(engine, settings["workers"], start=True)  # forked before the sandbox's server thread
    with closing(mapper), Sandbox(api_key=key) as sandbox, tempfile.TemporaryDirectory() as scratch:
        # a rehearsal starts afresh each time, unless asked to keep a spool
        settings.update(endpoint=sandbox.url, api_key_file=None)
        if not spool_given:
            settings["spool_path"] = Path(scratch) / "rehearsal.spool"
        _deliver("run", engine, _target(dead_letters=dead_letters, api_key=key, **settings), inputs, mapper)
        accepted = sandbox.store.stats()["events_accepted"]
        stderr.print(f"The sandbox at {sandbox.url} accepted {accepted:,} Topsort event(s); it stops with this run.")


@click.command("replay")
@click.argument("dead_letter_file", metavar="DEAD_LETTERS",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_delivery_options
@click.option("--dead-letters", "dead_letters", type=click.Path(dir_okay=False, path_type=Path),
              help="Where events that fail again go. Default: DEAD_LETTERS with .replay before its suffix.")
def replay_command(
    dead_letter_file: Path, rule_dirs: tuple[Path, ...], dead_letters: Path | None, **settings: Any
) -> None:
    """Send dead-lettered events through the rules again and deliver them (after fixing rules or data).

    An unchanged DEAD_LETTERS file replayed again resumes where the last replay stopped; an
    edited one is replayed from the start.
    """
    dead_letters = dead_letters or dead_letter_file.with_name(
        f"{dead_letter_file.stem}.replay{dead_letter_file.suffix or '.ndjson'}"
    )
    if dead_letters.resolve() == dead_letter_file.resolve():
        raise click.UsageError("--dead-letters must not be the file being replayed")
    target = _target(dead_letters=dead_letters, **settings)
    engine = engine_or_exit(rule_dirs)
    _deliver("replay", engine, target,
             lambda spool, limits, on_fault: [_open_replay(dead_letter_file, spool, limits, on_fault)])


# -- the run ---------------------------------------------------------------------------------------


def _deliver(title: str, engine: Engine, target: _Target, inputs: _Inputs, mapper: Mapper | None = None) -> None:
    """Read, map (through ``mapper``, made here when not given), spool and deliver; print the summary. Exits 1
    when delivery cannot go on, 143 after SIGTERM, 3 when some input could not be read (see the README's exit
    statuses)."""
    try:
        spool = Spool(target.spool)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    with spool:
        left_before = spool.unsent
        exported = spool.export_dead_letters(target.dead_letters)
        tally = Tally()
        mapper = mapper or make_mapper(engine, target.workers, start=True)  # forks before any thread starts
        ingest = Pipeline(MapStep(mapper, tally))
        dispatcher = target.delivery.dispatcher(spool)
        failure: EngineError | OSError | None = None
        terminated = threading.Event()

        def terminate(_signum: int, _frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
            terminated.set()
            dispatcher.stop(0.0)  # requests in flight are answered; the rest stays in the spool

        previous = _on_sigterm(terminate)
        try:
            with _progress(ingest, dispatcher) as show:

                def tick() -> None:
                    nonlocal exported
                    exported += spool.export_dead_letters(target.dead_letters)
                    show()

                deliver(dispatcher, ingest.chunks(inputs(spool, target.limits, partial(report_fault, stderr, tally))), tick)
        except (DeliveryError, OSError) as exc:
            failure = exc
        finally:
            _on_sigterm(previous)
            mapper.close()
            exported += spool.export_dead_letters(target.dead_letters)
            stderr.print(_summary(title, tally, dispatcher, left_before, spool.unsent, exported))
            if exported:
                stderr.print(f"Dead letters: {target.dead_letters} (send them again with `segment-topsort replay`)")
    if terminated.is_set():
        stderr.print("Stopped by SIGTERM: requests in flight were answered; the rest waits in the spool for the next run.")
        sys.exit(EXIT_TERMINATED)
    if failure:
        raise click.ClickException(str(failure))
    if tally.faults:
        sys.exit(EXIT_INPUT_SKIPPED)


def _on_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM and return the one it replaces (only the main thread may; a
    handler that was not set from Python is None and stays)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


# -- inputs ----------------------------------------------------------------------------------------


def _open_input(name: str, spool: Spool, limits: InputLimits, on_fault: OnFault) -> Source:
    if name == STDIN:
        records = read_source(name, limits=limits, on_fault=on_fault, decoded=False)
        return Source(name, None, records, _stdin_at_hand, None, steady=False)
    key = str(Path(name).resolve())
    start = spool.checkpoint(key)
    records = read_source(name, start, limits=limits, on_fault=on_fault, decoded=False, blocks=True)
    return Source(name, key, records, lambda: True, _todo(name, start))


def _open_replay(path: Path, spool: Spool, limits: InputLimits, on_fault: OnFault) -> Source:
    stat = path.stat()
    key = f"replay:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    start = spool.checkpoint(key)
    records = _revived(read_source(str(path), start, limits=limits, on_fault=on_fault))
    return Source(str(path), key, records, lambda: True, _todo(str(path), start))


def _todo(name: str, start: Checkpoint | None) -> int | None:
    size = uncompressed_size(name)
    if size is None:
        return None
    return size - start.offset if start and start.offset <= size else size


def _revived(letters: Iterable[tuple[Record, Checkpoint | None]]) -> Iterator[tuple[Record, Checkpoint | None]]:
    """The original input records kept in dead-letter records."""
    for letter, checkpoint in letters:
        data = letter.event
        if letter.error or not isinstance(data, dict) or not ("event" in data or "raw" in data):
            error = letter.error or f"{letter.origin}:{letter.line}: not a dead-letter record"
            yield Record(letter.origin, letter.line, letter.raw, error=error), checkpoint
            continue
        origin, line = data.get("origin") or letter.origin, data.get("line") or letter.line
        if "event" in data:
            yield Record(origin, line, orjson.dumps(data["event"]), event=data["event"]), checkpoint
        else:
            yield decode_line(origin, line, str(data["raw"]).encode()), checkpoint


def _stdin_at_hand() -> bool:
    """Whether standard input has more to read right now (so a chunk may wait for it)."""
    try:
        return bool(select.select([sys.stdin], [], [], 0)[0])
    except (OSError, ValueError):
        return True


# -- settings, progress, summary -------------------------------------------------------------------


def _target(
    *, endpoint: str | None, api_key_file: Path | None, spool_path: Path, dead_letters: Path,
    api_key: str | None = None, **tuning: Any,
) -> _Target:
    api_key = api_key or api_key_or_exit(api_key_file, _NO_TARGET)
    if not endpoint:
        raise click.UsageError(_NO_TARGET)
    endpoint_or_exit(endpoint)
    limits = limits_from(tuning)
    retry_time = tuning["max_retry_time"]
    delivery = DeliveryTarget(
        endpoint, api_key, max_in_flight=tuning["max_in_flight"], max_latency=tuning["max_latency"],
        timeout=tuning["timeout"], policy=RetryPolicy(max_elapsed=retry_time,
                                                      unanswered_limit=min(UNANSWERED_LIMIT, retry_time)),
    )
    return _Target(delivery, spool_path, dead_letters, limits, tuning["workers"])


@contextmanager
def _progress(ingest: Pipeline, dispatcher: Dispatcher) -> Iterator[Callable[[], None]]:
    """A live bar on a terminal (stderr): input read, events delivered, waiting, failed."""
    if not stderr.is_terminal:
        yield lambda: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("", total=None)

        def show() -> None:
            stats = dispatcher.stats
            progress.update(
                task,
                description=f"read {ingest.read:,} · delivered {stats.delivered:,} · in spool"
                f" {dispatcher.spool.unsent:,} · failed {stats.failed:,}",
                total=ingest.todo,
                completed=ingest.bytes,
            )

        yield show


def _summary(
    title: str, tally: Tally, dispatcher: Dispatcher, left_before: int, left_now: int, exported: int
) -> Table:
    stats = dispatcher.stats
    elapsed = max(time.perf_counter() - tally.started, 1e-9)
    extra = {
        "left by an earlier run": left_before,
        "delivered": stats.delivered,
        "requests sent": stats.requests,
        "retried requests": stats.retries,
        "undeliverable events": stats.failed,
        "dead letters written": exported,
        "left in the spool": left_now,
        "delivered events/s": round(stats.delivered / elapsed),
    }
    return tally.table(title, extra)
