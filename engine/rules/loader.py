"""Load rule folders: parse YAML, check it against the rule schema, compile, apply overrides.

Every problem is reported as file:line:column with the rule and field it concerns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from .checks import double_count_warnings
from ..errors import Problem, RulesInvalid, YamlSyntaxError
from ..compile.fields import SPEC_KEYS
from ..paths import RULES_SCHEMA
from .rule import Rule, compile_rule
from .yaml_source import Path_, YamlDocument, load_yaml

RULE_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class RuleSet:
    """The rules of some folders, in order (disabled ones included), and any warnings."""

    rules: tuple[Rule, ...]
    warnings: tuple[Problem, ...] = ()

    @property
    def enabled(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.enabled)


def load_rules(folders: Iterable[str | Path]) -> RuleSet:
    """Load and compile rule folders (later folders override earlier ones by rule name).

    Raises :class:`RulesInvalid` listing every error when any rule file is wrong.
    """
    rules, problems = check_rules(folders, double_counts=False)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise RulesInvalid(problems)
    return RuleSet(tuple(rules), tuple(problems))


def check_rules(
    folders: Iterable[str | Path], *, double_counts: bool = True
) -> tuple[list[Rule], list[Problem]]:
    """Like :func:`load_rules`, but return every problem (errors and warnings) instead of raising.

    The warnings about rules that count one user action twice are for ``check``; loading for any
    other command leaves them out (``double_counts=False``), so they are not repeated everywhere.
    """
    problems: list[Problem] = []
    merged: dict[str, Rule] = {}
    for folder in folders:
        defined_here: dict[str, Rule] = {}
        for file in _rule_files(Path(folder), problems):
            for entry, rule_or_switch in _load_file(file, problems):
                _merge(entry, rule_or_switch, merged, defined_here, problems)
    rules = list(merged.values())
    if double_counts:
        problems.extend(double_count_warnings(rules))
    return rules, problems


def _rule_files(folder: Path, problems: list[Problem]) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        problems.append(Problem(str(folder), None, None, None, None, "no such rules folder or file"))
        return []
    files = sorted(p for p in folder.rglob("*") if p.suffix in RULE_FILE_SUFFIXES and p.is_file())
    if not files:
        problems.append(Problem(str(folder), None, None, None, None, "holds no .yaml rule files", "warning"))
    return files


@dataclass(frozen=True)
class _Switch:
    name: str
    enabled: bool
    file: str
    line: int | None


def _load_file(file: Path, problems: list[Problem]) -> list[tuple[dict[str, Any], Rule | _Switch]]:
    try:
        doc = load_yaml(file)
    except YamlSyntaxError as exc:
        where = exc.position
        problems.append(
            Problem(str(file), where.line if where else None, where.column if where else None, None, None,
                    f"not valid YAML: {exc}")
        )
        return []
    for path, position in doc.duplicates:
        problems.append(_located(doc, path, position.line, position.column, f"key {path[-1]!r} appears twice"))
    broken: set[int | None] = set()
    for error in _rules_validator().iter_errors(doc.data):
        path = tuple(error.absolute_path)
        problems.append(_schema_problem(doc, path, error))
        in_rule = len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int)
        broken.add(path[1] if in_rule else None)
    if None in broken:
        return []
    loaded = []
    for index, entry in enumerate(doc.data["rules"]):
        if index in broken:
            continue
        ypath = ("rules", index)
        line = _line(doc, ypath)
        if "emit" not in entry:
            loaded.append((entry, _Switch(entry["name"], entry["enabled"], str(file), line)))
            continue
        count = len(problems)
        rule = compile_rule(entry, str(file), ypath, line, _reporter(doc, entry["name"], problems))
        if len(problems) == count:
            loaded.append((entry, rule))
    return loaded


def _merge(
    entry: dict[str, Any],
    loaded: Rule | _Switch,
    merged: dict[str, Rule],
    defined_here: dict[str, Rule | _Switch],
    problems: list[Problem],
) -> None:
    name = loaded.name
    twin = defined_here.get(name)
    if twin is not None:
        problems.append(
            Problem(loaded.file, loaded.line, None, name, None,
                    f"a rule of this name is already in this folder ({twin.file}:{twin.line}); "
                    "names must be unique, a later folder may override them")
        )
        return
    defined_here[name] = loaded
    if isinstance(loaded, Rule):
        merged[name] = loaded
    elif name in merged:
        merged[name] = dataclasses.replace(merged[name], enabled=loaded.enabled)
    else:
        problems.append(
            Problem(loaded.file, loaded.line, None, name, None,
                    "switches a rule that no earlier rules folder defines (a switch has only name and enabled)")
        )


@cache
def _rules_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(orjson.loads(RULES_SCHEMA.read_bytes()))


def _reporter(doc: YamlDocument, rule: str, problems: list[Problem]):
    def report(ypath: Path_, message: str, *, field: str | None = None, key: bool = False,
               offset: int | None = None) -> None:
        position = doc.position(ypath, key=key)
        line = position.line if position else None
        column = position.column if position else None
        if column is not None and offset is not None:
            column += offset + (1 if position.quoted else 0)
        problems.append(Problem(doc.file, line, column, rule, field, message))

    return report


def _schema_problem(doc: YamlDocument, path: Path_, error: jsonschema.ValidationError) -> Problem:
    message = error.message
    key = False
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            path, key = (*path, extra[0]), True
            message = f"unknown key {extra[0]!r}; allowed here: {', '.join(sorted(allowed))}"
    elif error.validator == "type" and "fields" in path:
        message = (f"{error.instance!r} is not a field: write a JMESPath expression (a string), "
                   f"a spec such as {{const: {orjson.dumps(error.instance).decode()}}}, or a mapping of fields")
    position = doc.position(path, key=key)
    problem = _located(doc, path, position.line if position else None, position.column if position else None,
                       message)
    return problem


def _located(doc: YamlDocument, path: Path_, line: int | None, column: int | None, message: str) -> Problem:
    return Problem(doc.file, line, column, _rule_name(doc.data, path), _field_name(path), message)


def _rule_name(data: Any, path: Sequence[Any]) -> str | None:
    if len(path) >= 2 and path[0] == "rules" and isinstance(data, dict):
        try:
            name = data["rules"][path[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return None


def _field_name(path: Sequence[Any]) -> str | None:
    if "fields" not in path:
        return None
    after = list(path)[list(path).index("fields") + 1:]
    parts = [p for p in after if isinstance(p, str) and p not in SPEC_KEYS]
    return ".".join(parts) or None


def _line(doc: YamlDocument, path: Path_) -> int | None:
    position = doc.position(path)
    return position.line if position else None
