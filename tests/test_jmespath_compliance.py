"""Every case of the official JMESPath compliance suite: the compiler must do what jmespath does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jmespath
import pytest

from engine.compile.functions import FUNCTIONS
from engine.compile.jmespath_compiler import compile_expression

from .jmespath_outcomes import outcome, typed

SUITE = Path(__file__).resolve().parent / "data" / "jmespath-compliance"
"""A copy of the official cases (MIT, see LICENSE.txt there), so a clone tests on its own."""
EXPECTED_CASES = 908


def _load_cases() -> list[Any]:
    cases = []
    for path in sorted(SUITE.glob("*.json")):
        for group, suite in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            for number, case in enumerate(suite["cases"]):
                case_id = f"{path.name}[{group}][{number}] {case['expression']}"
                cases.append(pytest.param(suite["given"], case, id=case_id))
    return cases


CASES = _load_cases()


def compiled_outcome(expression: str, document: Any) -> tuple[str, Any]:
    return outcome(lambda: compile_expression(expression, FUNCTIONS)(document))


def reference_outcome(expression: str, document: Any) -> tuple[str, Any]:
    options = jmespath.Options(custom_functions=FUNCTIONS)
    return outcome(lambda: jmespath.search(expression, document, options=options))


def test_suite_is_complete() -> None:
    assert len(CASES) == EXPECTED_CASES


@pytest.mark.parametrize(("given", "case"), CASES)
def test_case(given: Any, case: dict[str, Any]) -> None:
    expression = case["expression"]
    expected = reference_outcome(expression, given)
    assert compiled_outcome(expression, given) == expected
    # The reference itself passes the suite, so this also proves the cases were read right.
    if "result" in case:
        assert expected == ("result", typed(case["result"]))
    if "error" in case:
        assert expected[0] == "error"
