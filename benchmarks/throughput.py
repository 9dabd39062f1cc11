"""Events per second of one implementation over the corpus, per preset group, on one thread.

A *pipeline* takes one NDJSON line and does the whole job: decode, map, validate, and encode
each Topsort event it makes; it returns how many it made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from engine import Engine

loads, dumps = orjson.loads, orjson.dumps

from .handwritten import HandWritten
from .naive import NaiveInterpreter

Pipeline = Callable[[bytes], int]

STREAM = "all, in stream order"
"""The group of the whole corpus in generated order: the headline figure. Events of one preset
in a row run faster (warm caches and branch predictors) than the mix a real stream brings."""


@dataclass(frozen=True)
class Timing:
    """``events`` input events took ``seconds`` and made ``emitted`` Topsort events."""

    events: int
    emitted: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.events / self.seconds if self.seconds else float("inf")

    @property
    def micros(self) -> float:
        return self.seconds / self.events * 1e6 if self.events else 0.0

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.events + other.events, self.emitted + other.emitted, self.seconds + other.seconds)


def engine_pipeline(engine: Engine) -> Pipeline:
    """orjson decode, ``engine.process``, orjson encode of each emitted event."""
    process, loads, dumps = engine.process, orjson.loads, orjson.dumps

    def run(line: bytes) -> int:
        emitted = process(loads(line)).emitted
        for made in emitted:
            dumps(made.event)
        return len(emitted)

    return run


def floor_pipeline(engine: Engine, lines: Sequence[bytes]) -> Pipeline:
    """The work no mapping avoids: decode each line, validate and encode the engine's outputs
    for it (mapped beforehand, outside the timing). Any implementation costs at least this."""
    outputs = {}
    for line in lines:
        outcome = engine.process(loads(line))
        outputs[line] = [(engine.rule(made.rule).validator.is_valid, made.event) for made in outcome.emitted]

    def run(line: bytes) -> int:
        loads(line)
        made = outputs[line]
        for is_valid, event in made:
            is_valid(event)
            dumps(event)
        return len(made)

    return run


def naive_pipeline(naive: NaiveInterpreter) -> Pipeline:
    """json decode, the rules interpreted with jmespath.search, python-jsonschema, json encode."""
    return lambda line: len(naive.process_line(line))


def handwritten_pipeline(hand: HandWritten) -> Pipeline:
    """orjson decode, hand-written dict code, jsonschema-rs, orjson encode."""
    return lambda line: len(hand.process_line(line))


def time_groups(
    pipelines: Mapping[str, Pipeline], groups: Mapping[str, Sequence[bytes]], repeat: int
) -> dict[str, dict[str, Timing]]:
    """Per pipeline and group, the best of ``repeat`` timed passes over the group's lines.

    The passes of the pipelines alternate, so a change in the machine's load (a shared machine)
    weighs on all of them alike.
    """
    best: dict[str, dict[str, Timing]] = {name: {} for name in pipelines}
    for _ in range(max(1, repeat)):
        for group, lines in groups.items():
            for name, pipeline in pipelines.items():
                timing = _timed(pipeline, lines)
                kept = best[name].get(group)
                if kept is None or timing.seconds < kept.seconds:
                    best[name][group] = timing
    return best


def overall(timings: Mapping[str, Timing]) -> Timing:
    """The preset groups together (the stream group left out): the same events, the sum of their times."""
    return sum((timing for group, timing in timings.items() if group != STREAM), Timing(0, 0, 0.0))


def _timed(pipeline: Pipeline, lines: Sequence[bytes]) -> Timing:
    start = time.perf_counter()
    emitted = 0
    for line in lines:
        emitted += pipeline(line)
    return Timing(len(lines), emitted, time.perf_counter() - start)
