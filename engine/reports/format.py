"""Render the reports of ``diff`` and ``coverage`` as plain text or as Markdown for a pull request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .diff import ARROW

_VALUE_WIDTH = 60


def diff_text(report: dict[str, Any], markdown: bool = False) -> str:
    """The ``diff`` report (see :meth:`engine.reports.diff.RuleSetDiff.report`) as text or Markdown."""
    out = _Out(markdown)
    events, changed = report["events"], report["changed"]
    share = f" ({changed / events:.1%})" if events else ""
    out.heading(2, f"Rule change: {_n(changed)} of {_n(events)} events change{share}")
    if not changed:
        out.line("The new rules make exactly what the old ones made of these events.")
    if report["transitions"]:
        out.table(("transition", "events"), [(_arrow(key), _n(count)) for key, count in report["transitions"].items()])
    rules = [rule for rule in report["rules"] if _rule_differs(rule)]
    if rules:
        out.heading(3, "Rules")
        out.table(("rule", "kind", "before", "after", "added", "removed", "changed", "rejected before → after"), [
            (out.code(rule["rule"] or "(input)"), rule["kind"] or "", _n(rule["before"]), _n(rule["after"]),
             _n(rule["added"]), _n(rule["removed"]), _n(rule["changed"]),
             f"{_n(rule['rejected']['before'])} → {_n(rule['rejected']['after'])}")
            for rule in rules
        ])
        new = [(rule["rule"], found) for rule in rules for found in rule["new_rejections"]]
        if new:
            out.heading(3, "New rejections")
            out.table(("rule", "path", "reason", "events", "e.g. messageId"), [
                (out.code(rule or "(input)"), out.code(found["path"]), out.cell(found["reason"]),
                 _n(found["count"]), out.code(found["example"] or ""))
                for rule, found in new
            ])
    if report["fields"]:
        out.heading(3, "Fields of Topsort events made by both")
        out.table(("field", "gained", "lost", "changed", "e.g. messageId: before → after"), [
            (out.code(path), _n(found["gained"]), _n(found["lost"]), _n(found["changed"]),
             _example(out, found["examples"][0]) if found["examples"] else "")
            for path, found in report["fields"].items()
        ])
        examples = [(path, example) for path, found in report["fields"].items() for example in found["examples"][1:]]
        if examples:
            out.details("More examples", ("field", "messageId: before → after"),
                        [(out.code(path), _example(out, example)) for path, example in examples])
    return out.text()


def _rule_differs(rule: dict[str, Any]) -> bool:
    return bool(rule["added"] or rule["removed"] or rule["changed"] or rule["new_rejections"]
                or rule["rejected"]["before"] != rule["rejected"]["after"])


def _example(out: _Out, example: dict[str, Any]) -> str:
    return (f"{out.code(example['messageId'] or '?')}: {out.code(_value(example['before']))} → "
            f"{out.code(_value(example['after']))}")


def _value(value: Any) -> str:
    if value is None:
        return "(none)"
    text = orjson.dumps(value).decode()
    return text if len(text) <= _VALUE_WIDTH else text[:_VALUE_WIDTH - 1] + "…"


def _arrow(transition: str) -> str:
    return transition.replace(ARROW, " → ")


def _n(number: int) -> str:
    return f"{number:,}"


class _Out:
    """Lines of a report, written as Markdown or as plain aligned text."""

    def __init__(self, markdown: bool) -> None:
        self.markdown = markdown
        self.lines: list[str] = []

    def heading(self, level: int, title: str) -> None:
        if self.lines and self.lines[-1]:
            self.lines.append("")
        self.lines.append(f"{'#' * level} {title}" if self.markdown else title)
        if not self.markdown:
            self.lines.append("=" * len(title) if level <= 2 else "-" * len(title))
        self.lines.append("")

    def line(self, text: str) -> None:
        self.lines.append(text)

    def code(self, value: str) -> str:
        if not self.markdown or not value:
            return value
        ticks = "``" if "`" in value else "`"
        return f"{ticks}{self.cell(value)}{ticks}"

    def cell(self, value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ") if self.markdown else value.replace("\n", " ")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.markdown:
            self.lines.append("| " + " | ".join(headers) + " |")
            self.lines.append("|" + "|".join("---" if i == 0 else "--:" if _numeric(rows, i) else "---"
                                             for i in range(len(headers))) + "|")
            self.lines.extend("| " + " | ".join(row) + " |" for row in rows)
        else:
            widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
            for row in (headers, *rows):
                cells = [cell.rjust(width) if i and _numeric(rows, i) else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(row, widths))]
                self.lines.append("  ".join(cells).rstrip())
        self.lines.append("")

    def details(self, summary: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.markdown:
            self.lines.extend([f"<details><summary>{summary}</summary>", ""])
            self.table(headers, rows)
            self.lines.extend(["</details>", ""])
        else:
            self.heading(3, summary)
            self.table(headers, rows)

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def _numeric(rows: Sequence[Sequence[str]], column: int) -> bool:
    return bool(rows) and all(row[column].replace(",", "").replace("%", "").replace(".", "").strip().isdigit()
                              for row in rows)


def coverage_text(report: dict[str, Any], markdown: bool = False) -> str:
    """The ``coverage`` report (see :meth:`engine.reports.coverage.Coverage.report`) as text or Markdown."""
    out = _Out(markdown)
    events = report["events"]
    out.heading(2, f"Coverage of {_n(events)} events")
    out.table(("outcome", "events", "share"),
              [(verdict, _n(count), _percent(count, events)) for verdict, count in report["outcomes"].items()])
    out.heading(3, "What arrives, by volume")
    out.table(("type", "event", "events", "taken by"), [
        (arrival["type"], out.cell(arrival["event"] or ""), _n(arrival["count"]), _taken_by(out, arrival))
        for arrival in report["arrivals"]
    ])
    out.heading(3, "Rules")
    out.table(("rule", "kind", "matched", "emitted", "rejected"), [
        (out.code(name) + ("" if rule["enabled"] else " (disabled)"), rule["kind"], _n(rule["matched"]),
         _n(rule["emitted"]), _n(rule["rejected"]))
        for name, rule in report["rules"].items()
    ])
    for name, rule in report["rules"].items():
        if not rule["matched"]:
            continue
        out.heading(4, f"{name}: fields filled, of {_n(rule['emitted'])} Topsort {rule['kind']}")
        out.table(("field", "filled", "of", "rate"), [
            (out.code(path), _n(fill["filled"]), _n(fill["of"]), _percent(fill["filled"], fill["of"]))
            for path, fill in rule["fields"].items()
        ])
        if rule["reasons"]:
            out.table(("rejected at", "reason", "count"), [
                (out.code(reason["path"]), out.cell(reason["reason"]), _n(reason["count"]))
                for reason in rule["reasons"]
            ])
    return out.text()


def _taken_by(out: _Out, arrival: dict[str, Any]) -> str:
    parts = [f"{out.code(rule)} {_n(count)}" for rule, count in arrival["rules"].items()]
    if arrival["none"]:
        parts.append(("**none**" if out.markdown else "none") + (f" {_n(arrival['none'])}" if parts else ""))
    return ", ".join(parts)


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "–"
