"""`segment-topsort check`: every problem of a broken rules folder, located as file:line:column."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Engine, RulesInvalid, check_rules
from engine.paths import BUNDLED_RULES

from .conftest import ROOT, run_cli

BROKEN = Path("tests/data/broken_rules")

EXPECTED = [
    # YAML syntax: where PyYAML stopped, where the construct began, and what it found instead
    "a_yaml_syntax.yaml:4:9: error: not valid YAML: while parsing a flow mapping (started at 3:11): "
    "expected ',' or '}', but got ':'",
    # rule-schema violations
    "b_rule_schema.yaml:4:11: error: rule 'wrong-kind': 'impression' is not one of",
    "b_rule_schema.yaml:7:5: error: rule 'typo-in-when': 'when' is a required property",
    "b_rule_schema.yaml:8:5: error: rule 'typo-in-when': unknown key 'whenn'",
    "b_rule_schema.yaml:21:21: error: rule 'literal-field' field 'items.quantity': 1 is not a field",
    # JMESPath: syntax errors point into the expression; unknown functions and arity at load time
    "c_jmespath.yaml:3:86: error: rule 'bad-expressions' field 'when.if': invalid JMESPath",
    "c_jmespath.yaml:7:21: error: rule 'bad-expressions' field 'opaqueUserId': in 'lowercase(anonymousId)': unknown function lowercase()",
    "c_jmespath.yaml:8:37: error: rule 'bad-expressions' field 'occurredAt': invalid JMESPath 'timestamp ~ 1'",
    "c_jmespath.yaml:9:16: error: rule 'bad-expressions' field 'channel': in 'join(properties.channel)': join() takes 2 argument(s), 1 given",
    # schema-aware: fields the Topsort schema for the kind does not allow
    "d_topsort_fields.yaml:7:7: error: rule 'impression-typos' field 'resolvedBidID': Topsort impressions has no field 'resolvedBidID' (did you mean 'resolvedBidId'?)",
    "d_topsort_fields.yaml:8:7: error: rule 'impression-typos' field 'clickType': Topsort impressions has no field 'clickType': it is a field of Topsort clicks only",
    "d_topsort_fields.yaml:10:9: error: rule 'impression-typos' field 'placement.pathh': Topsort impressions placement has no field 'pathh' (did you mean 'path'?)",
    # schema-aware: constants Topsort refuses at their place (each once fitted like any value there)
    "f_topsort_values.yaml:10:26: error: rule 'values-topsort-refuses' field 'clickType': const \"add_to_cart\" would "
    "be rejected on every event it reaches: \"add_to_cart\" is not one of \"product\", \"like\" or \"add-to-cart\"",
    "f_topsort_values.yaml:11:73: error: rule 'values-topsort-refuses' field 'deviceType': lookup value \"television\" "
    "(for \"tv\") would be rejected on every event it reaches: \"television\" is not one of \"desktop\" or \"mobile\"",
    "f_topsort_values.yaml:12:52: error: rule 'values-topsort-refuses' field 'channel': default \"web\" would be "
    "rejected on every event it reaches: \"web\" is not one of",
    "f_topsort_values.yaml:13:45: error: rule 'values-topsort-refuses' field 'entity': const {\"type\":\"brand\",\"id\":\"acme\"} "
    "would be rejected on every event it reaches: at type: \"brand\" is not one of \"product\" or \"vendor\"",
    "f_topsort_values.yaml:17:62: error: rule 'values-topsort-refuses' field 'placement.page': const 0 would be rejected "
    "on every event it reaches: 0 is less than the minimum of 1",
    # schema-aware: an impression or click is sponsored or organic; a rule that can make neither
    "f_topsort_values.yaml:22:5: error: rule 'attributes-to-nothing': every Topsort impressions event needs "
    "resolvedBidId (sponsored) or entity (organic), and this rule maps neither: each event it takes would be rejected",
    # duplicates
    "e_duplicates.yaml:7:7: error: rule 'twice' field 'id': key 'id' appears twice",
    "e_duplicates.yaml:8: error: rule 'twice': a rule of this name is already in this folder",
]


def test_check_reports_each_problem_with_file_line_column() -> None:
    result = run_cli("check", str(BROKEN))
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    errors = [line for line in lines if ": error: " in line]
    for expected in EXPECTED:
        matching = [line for line in errors if line.startswith(f"{BROKEN}/{expected}")]
        assert matching, f"missing: {expected}\n---\n" + "\n".join(errors)
    assert len(errors) == len(EXPECTED), "\n".join(errors)
    assert lines[-1] == f"1 rule (1 enabled), {len(EXPECTED)} errors, 0 warnings"


def test_constants_topsort_accepts_once_fitted_are_not_errors() -> None:
    _, problems = check_rules([ROOT / BROKEN / "f_topsort_values.yaml"])
    lines = {p.line for p in problems}
    assert lines == {10, 11, 12, 13, 17, 22}  # not: the merge part without path (16), const 42 for a string (18)


def test_bundled_rules_are_clean() -> None:
    result = run_cli("check")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode().strip().endswith("0 errors, 0 warnings")


def test_loading_broken_rules_raises_with_every_problem() -> None:
    with pytest.raises(RulesInvalid) as raised:
        Engine.from_folders(ROOT / BROKEN)
    assert len([p for p in raised.value.problems if p.severity == "error"]) == len(EXPECTED)
    assert "resolvedBidID" in str(raised.value)


def test_map_refuses_to_run_with_broken_rules() -> None:
    result = run_cli("map", "--rules", str(BROKEN), "-", stdin=b"{}\n")
    assert result.returncode == 2
    assert result.stdout == b""
    assert "nothing was processed" in result.stderr.decode()


# --- folders, overrides and switches -----------------------------------------------------------

RULE = """
  - name: {name}
    when: {{type: track, event: {event}}}
    emit: clicks
    fields: {{id: messageId, occurredAt: timestamp, opaqueUserId: anonymousId, channel: {{const: {channel}}},
             entity: {{const: {{type: vendor, id: v-1}}}}}}
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def _click(engine: Engine, event: str) -> list[dict]:
    outcome = engine.process({"type": "track", "event": event, "messageId": "m", "timestamp": "2026-01-01T00:00:00Z",
                              "anonymousId": "a"})
    return [e.event.get("channel") for e in outcome.emitted]


def test_a_later_folder_overrides_a_rule_by_name(tmp_path: Path) -> None:
    base = _write(tmp_path / "base", "r.yaml", "rules:" + RULE.format(name="tap", event="Tap", channel="onsite"))
    mine = _write(tmp_path / "mine", "r.yaml", "rules:" + RULE.format(name="tap", event="Tap", channel="offsite"))
    assert _click(Engine.from_folders(base), "Tap") == ["onsite"]
    engine = Engine.from_folders(base, mine)
    assert _click(engine, "Tap") == ["offsite"]
    assert [r.name for r in engine.rules.rules] == ["tap"]


def test_a_switch_turns_a_rule_of_an_earlier_folder_off_and_on(tmp_path: Path) -> None:
    base = _write(tmp_path / "base", "r.yaml", "rules:" + RULE.format(name="tap", event="Tap", channel="onsite"))
    off = _write(tmp_path / "off", "r.yaml", "rules:\n  - {name: tap, enabled: false}\n")
    on = _write(tmp_path / "on", "r.yaml", "rules:\n  - {name: tap, enabled: true}\n")
    assert _click(Engine.from_folders(base, off), "Tap") == []
    assert _click(Engine.from_folders(base, off, on), "Tap") == ["onsite"]


def test_a_switch_for_an_unknown_rule_is_an_error(tmp_path: Path) -> None:
    off = _write(tmp_path / "off", "r.yaml", "rules:\n  - {name: nowhere, enabled: false}\n")
    _, problems = check_rules([BUNDLED_RULES, off])
    assert [(p.rule, p.line) for p in problems] == [("nowhere", 2)]
    assert "no earlier rules folder defines" in problems[0].message


def test_enabled_false_switches_a_rule_off(tmp_path: Path) -> None:
    text = "rules:" + RULE.format(name="tap", event="Tap", channel="onsite").replace(
        "    emit:", "    enabled: false\n    emit:")
    engine = Engine.from_folders(_write(tmp_path, "r.yaml", text))
    assert _click(engine, "Tap") == []
    assert engine.rule("tap").enabled is False


def test_two_rules_for_the_same_event_and_kind_are_warned_about(tmp_path: Path) -> None:
    text = "rules:" + RULE.format(name="one", event="Tap", channel="onsite") + RULE.format(
        name="two", event="Tap", channel="offsite")
    _, problems = check_rules([_write(tmp_path, "r.yaml", text)])
    assert [(p.severity, p.rule) for p in problems] == [("warning", "two")]
    assert "counted twice" in problems[0].message


def test_a_constant_that_is_no_json_value_is_an_error_not_a_crash(tmp_path: Path) -> None:
    rule = RULE.format(name="binary", event="Tap", channel="onsite").replace(
        "channel: {const: onsite}", "externalVendorId: {const: [!!binary aGVsbG8=]}")  # YAML makes bytes of it
    _, problems = check_rules([_write(tmp_path, "r.yaml", "rules:" + rule)])
    assert [(p.rule, p.field, p.message.split(": ", 1)[1]) for p in problems] == [
        ("binary", "externalVendorId", "not a JSON value (Unsupported type: 'bytes')")]
