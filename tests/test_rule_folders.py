"""One way to name rule folders (--rules, or trailing arguments where nothing else is positional),
the function-name suggestion, and the double-count warning left to `check`."""

from __future__ import annotations

from pathlib import Path

import orjson

from engine.paths import BUNDLED_RULES

from .conftest import run_cli

TWICE = """
rules:
  - name: {name}
    when: {{type: track, event: Tap}}
    emit: clicks
    fields: {{id: messageId, occurredAt: timestamp, opaqueUserId: {user}, resolvedBidId: properties.bid}}
"""


def test_check_and_test_take_folders_as_arguments_or_with_rules() -> None:
    for command in ("check", "test"):
        positional = run_cli(command, str(BUNDLED_RULES))
        option = run_cli(command, "--rules", str(BUNDLED_RULES))
        assert positional.returncode == option.returncode == 0, option.stderr.decode()
        assert positional.stderr.splitlines()[-1] == option.stderr.splitlines()[-1]
        both = run_cli(command, str(BUNDLED_RULES), "--rules", str(BUNDLED_RULES))
        assert both.returncode == 2
        assert "either as arguments or with --rules, not both" in both.stderr.decode()


def test_explain_takes_rule_folders_after_the_event(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_bytes(orjson.dumps({"type": "page", "messageId": "p-1", "timestamp": "2026-01-01T00:00:00Z",
                                    "anonymousId": "a", "properties": {"page": {"type": "home", "pageId": "h"}}}))
    positional = run_cli("explain", str(event), str(BUNDLED_RULES))
    option = run_cli("explain", str(event), "--rules", str(BUNDLED_RULES))
    assert positional.returncode == option.returncode == 0, positional.stderr.decode()
    assert positional.stdout == option.stdout
    assert b"Outcome: 1 emitted, 0 rejected" in positional.stdout


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    result = run_cli("check", "--rules", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "nowhere: no such rules folder or file" in result.stderr.decode()


def test_an_unknown_function_suggests_the_closest_one(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(TWICE.format(name="tap", user="lowr(anonymousId)"))
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 1
    assert "unknown function lowr() (did you mean lower()?)" in result.stderr.decode()


def test_the_double_count_warning_is_for_check_only(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(TWICE.format(name="one", user="anonymousId")
                                     + TWICE.format(name="two", user="userId").replace("rules:\n", ""))
    checked = run_cli("check", str(tmp_path))
    assert checked.returncode == 0
    assert checked.stderr.decode().count("counted twice") == 1
    for args in (["test", str(tmp_path)], ["map", "--rules", str(tmp_path)]):
        result = run_cli(*args, stdin=b"")
        assert result.returncode == 0, result.stderr.decode()
        assert "counted twice" not in result.stderr.decode()
