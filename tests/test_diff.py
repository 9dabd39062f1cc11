"""`diff` against the truth computed independently from two `map --format outcomes` runs, for known
rule edits over a generated corpus; `--fail-on` gates; rules read from git as REF:PATH."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.corpus import write_ndjson
from engine.paths import BUNDLED_RULES

from .conftest import ndjson, run_cli

EVENTS = 3000
USER = "opaqueUserId: {first: [anonymousId, userId]}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "events.ndjson"
    write_ndjson(path, EVENTS, seed=15)
    return path


@pytest.fixture(scope="module")
def outcomes_before(corpus: Path) -> list[dict[str, Any]]:
    return _outcomes(corpus, "--rules", str(BUNDLED_RULES))


def _edited_rules(folder: Path, old: str, new: str) -> Path:
    shutil.copytree(BUNDLED_RULES, folder)
    edited = 0
    for file in folder.glob("*.yaml"):
        text = file.read_text()
        if old in text:
            file.write_text(text.replace(old, new))
            edited += 1
    assert edited, f"{old!r} is in no bundled rule file"
    return folder


def _edit(tmp_path: Path, case: str) -> list[str]:
    """The --rules arguments of the new rule set for one known edit."""
    if case == "anonymousId only":
        return ["--rules", str(_edited_rules(tmp_path / "new", USER, "opaqueUserId: anonymousId"))]
    if case == "lookup entry removed":
        return ["--rules", str(_edited_rules(tmp_path / "new", "{ios: mobile, android: mobile,", "{android: mobile,"))]
    if case == "field added, value changed":
        folder = _edited_rules(tmp_path / "new", "windows: desktop", "windows: mobile")
        pages = folder / "pageviews.yaml"
        pages.write_text(pages.read_text().replace("channel: properties.channel",
                                                   "channel: {from: properties.channel, default: onsite}"))
        return ["--rules", str(folder)]
    switch = tmp_path / "off" / "off.yaml"
    switch.parent.mkdir()
    switch.write_text("rules:\n  - {name: product-clicked, enabled: false}\n")
    return ["--rules", str(BUNDLED_RULES), "--rules", str(switch.parent)]


def _outcomes(corpus: Path, *rules: str) -> list[dict[str, Any]]:
    result = run_cli("map", str(corpus), "--format", "outcomes", *rules)
    assert result.returncode == 0, result.stderr.decode()
    return ndjson(result.stdout)


def _diff(corpus: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli("diff", "--base", str(BUNDLED_RULES), str(corpus), *args)


@pytest.mark.parametrize("case", ["anonymousId only", "lookup entry removed", "rule disabled",
                                  "field added, value changed"])
def test_diff_counts_equal_those_of_two_map_runs(
    case: str, corpus: Path, outcomes_before: list[dict[str, Any]], tmp_path: Path
) -> None:
    rules = _edit(tmp_path, case)
    expected = _expected(outcomes_before, _outcomes(corpus, *rules))
    result = _diff(corpus, *rules, "--format", "json", "--examples", "2")
    assert result.returncode == 0, result.stderr.decode()
    report = orjson.loads(result.stdout)
    assert set(report) == {"events", "changed", "transitions", "rules", "fields"}
    assert report["events"] == EVENTS
    assert report["changed"] == expected["changed"] > 0
    assert report["transitions"] == expected["transitions"]
    by_rule = {rule["rule"]: rule for rule in report["rules"]}
    assert set(by_rule) == set(expected["rules"])
    for name, counts in expected["rules"].items():
        found = by_rule[name]
        assert {key: found[key] for key in ("before", "after", "added", "removed", "changed")} == {
            key: counts[key] for key in ("before", "after", "added", "removed", "changed")}, name
        assert found["rejected"] == {"before": counts["rejected before"], "after": counts["rejected after"]}, name
        new = {(r["path"], r["reason"]): r["count"] for r in found["new_rejections"]}
        assert new == dict(expected["new rejections"].get(name, {})), name
    assert {path: {k: v for k, v in found.items() if k != "examples"} for path, found in report["fields"].items()} \
        == expected["fields"]
    for path, found in report["fields"].items():
        assert set(found) == {"gained", "lost", "changed", "examples"}
        assert 1 <= len(found["examples"]) <= 2
        for example in found["examples"]:
            assert (example["before"], example["after"]) in expected["values"][(path, example["messageId"])]

    if case == "anonymousId only":
        assert by_rule["product-viewed"]["new_rejections"][0]["path"] == "$.opaqueUserId"
        listed = by_rule["product-list-viewed"]["new_rejections"]  # one per item, counted together
        assert [r["reason"] for r in listed] == ["required, but missing or null"] and listed[0]["count"] > 1
        assert report["fields"] == {}
    elif case == "lookup entry removed":
        assert report["fields"]["impressions.deviceType"]["lost"] > 0
        # a device type lost changes what is emitted, never whether: each event keeps its verdict
        assert all(before == after for before, after in (t.split("→") for t in report["transitions"]))
        assert report["transitions"]["emitted→emitted"] > 0
    elif case == "field added, value changed":
        assert report["fields"]["pageviews.channel"]["gained"] > 0
        assert report["fields"]["impressions.deviceType"]["changed"] > 0
    else:
        assert by_rule["product-clicked"]["after"] == 0
        assert by_rule["product-clicked"]["removed"] == by_rule["product-clicked"]["before"] > 0


@pytest.mark.parametrize(("case", "fail_on", "status"), [
    ("anonymousId only", "rejected", 1), ("lookup entry removed", "rejected", 0),
    ("lookup entry removed", "changed", 1), ("lookup entry removed", "never", 0), ("rule disabled", "rejected", 0),
])
def test_fail_on_sets_the_exit_status(case: str, fail_on: str, status: int, corpus: Path, tmp_path: Path) -> None:
    result = _diff(corpus, *_edit(tmp_path, case), "--fail-on", fail_on, "--format", "markdown")
    assert result.returncode == status, result.stderr.decode()


def test_markdown_and_text_show_the_same_counts(corpus: Path, tmp_path: Path) -> None:
    rules = _edit(tmp_path, "anonymousId only")
    report = orjson.loads(_diff(corpus, *rules, "--format", "json").stdout)
    removed = next(r for r in report["rules"] if r["rule"] == "product-viewed")["removed"]
    markdown = _diff(corpus, *rules, "--format", "markdown").stdout.decode()
    assert markdown.startswith(f"## Rule change: {report['changed']:,} of {EVENTS:,} events change")
    transition = report["transitions"]["emitted→rejected"]
    assert f"| emitted → rejected | {transition:,} |" in markdown
    assert re.search(rf"\| `product-viewed` \| impressions \| [\d,]+ \| [\d,]+ \| 0 \| {removed:,} \| 0 \|", markdown)
    assert "| `product-viewed` | `$.opaqueUserId` | required, but missing or null |" in markdown
    text = _diff(corpus, *rules).stdout.decode()
    assert re.search(rf"emitted → rejected\s+{transition:,}", text)
    assert "|" not in text


def test_the_same_rules_change_nothing(corpus: Path) -> None:
    result = _diff(corpus, "--format", "json", "--fail-on", "changed")
    assert result.returncode == 0
    report = orjson.loads(result.stdout)
    assert (report["changed"], report["transitions"], report["fields"]) == (0, {}, {})


def test_rules_are_read_from_git_as_ref_colon_path(corpus: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_RULES, repo / "rules")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "rules"], ["commit", "-qm", "rules"]):
        subprocess.run([*git, *command], cwd=repo, check=True, capture_output=True)
    edited = repo / "rules" / "interactions.yaml"
    edited.write_text(edited.read_text().replace(USER, "opaqueUserId: anonymousId"))

    from_git = run_cli("diff", "--base", "main:rules", "--rules", "rules", str(corpus), "--format", "json", cwd=repo)
    assert from_git.returncode == 0, from_git.stderr.decode()
    on_disk = _diff(corpus, "--rules", str(repo / "rules"), "--format", "json")
    assert orjson.loads(from_git.stdout) == orjson.loads(on_disk.stdout)
    assert orjson.loads(from_git.stdout)["changed"] > 0

    one_file = run_cli("check", "main:rules/interactions.yaml", cwd=repo)
    assert one_file.returncode == 0 and "6 rules" in one_file.stderr.decode()
    missing = run_cli("check", "--rules", "nope:rules", cwd=repo)
    assert missing.returncode == 2
    assert "nope:rules: not a folder here, and git cannot read it as REF:PATH" in missing.stderr.decode()


# -- the independent reference: counts straight from two `map --format outcomes` runs ----------------


def _expected(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    rules: dict[str, Counter[str]] = defaultdict(Counter)
    new_rejections: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    fields: dict[str, Counter[str]] = defaultdict(Counter)
    values: dict[tuple[str, str], list[tuple[Any, Any]]] = defaultdict(list)
    transitions: Counter[str] = Counter()
    changed = 0
    assert len(before) == len(after) == EVENTS
    for old, new in zip(before, after):
        assert (old["origin"], old["line"]) == (new["origin"], new["line"])
        for side, outcome in (("before", old), ("after", new)):
            for emitted in outcome["emitted"]:
                rules[emitted["rule"]][side] += 1
            for rejection in outcome["rejected"]:
                rules[rejection["rule"]][f"rejected {side}"] += 1
        if (old["emitted"], old["rejected"]) == (new["emitted"], new["rejected"]):
            continue
        changed += 1
        transitions[f"{_verdict(old)}→{_verdict(new)}"] += 1
        was = {(e["rule"], e["event"]["id"]): e for e in old["emitted"]}
        now = {(e["rule"], e["event"]["id"]): e for e in new["emitted"]}
        assert len(was) == len(old["emitted"]) and len(now) == len(new["emitted"])  # ids unique per rule
        for rule, _ in was.keys() - now.keys():
            rules[rule]["removed"] += 1
        for rule, _ in now.keys() - was.keys():
            rules[rule]["added"] += 1
        for key in was.keys() & now.keys():
            if was[key]["event"] == now[key]["event"]:
                continue
            rules[key[0]]["changed"] += 1
            kind = was[key]["kind"]
            a, b = _flat(was[key]["event"]), _flat(now[key]["event"])
            for path in a.keys() | b.keys():
                if a.get(path) != b.get(path):
                    verdict = "gained" if path not in a else "lost" if path not in b else "changed"
                    fields[f"{kind}.{path}"][verdict] += 1
                    values[(f"{kind}.{path}", new["messageId"])].append((a.get(path), b.get(path)))
        gained = Counter(map(_reason, new["rejected"])) - Counter(map(_reason, old["rejected"]))
        for (rule, path, reason), count in gained.items():
            new_rejections[rule][(path, reason)] += count
    return {
        "changed": changed, "transitions": dict(transitions), "rules": rules, "new rejections": new_rejections,
        "fields": {path: {k: found[k] for k in ("gained", "lost", "changed")} for path, found in fields.items()},
        "values": values,
    }


def _verdict(outcome: dict[str, Any]) -> str:
    if outcome["rejected"]:
        return "partly rejected" if outcome["emitted"] else "rejected"
    return "emitted" if outcome["emitted"] else "skipped"


def _flat(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, child in value.items():
        if isinstance(child, dict):
            flat.update(_flat(child, f"{prefix}{key}."))
        elif isinstance(child, list) and child and all(isinstance(x, dict) for x in child):
            for index, element in enumerate(child):
                for sub, leaf in _flat(element).items():
                    flat.setdefault(f"{prefix}{key}[].{sub}", [None] * len(child))[index] = leaf
        else:
            flat[prefix + key] = child
    return flat


def _reason(rejection: dict[str, Any]) -> tuple[str, str, str]:
    reason = rejection["reason"]
    if rejection["item"] is not None:
        reason = re.sub(r"^item \d+ of [^:]*: ", "", reason)
    return rejection["rule"], re.sub(r"\[\d+\]", "[]", rejection["path"]), reason
