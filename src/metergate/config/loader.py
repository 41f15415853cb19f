"""Load a YAML config, substitute `${ENV}` secrets, validate, and report every problem.

Each problem carries the file, the key path (`models.gpt-4.1.upstreams[0]`), the line
when known, and a hint, so `metergate check` and a refused start say exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from metergate.config.model import GatewayConfig

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
# `${VAR}`, `${VAR:-default}` (VAR unset or empty) and `${VAR-default}` (VAR unset), as
# in the shell and docker compose, which fill the same variables in the same deployments.
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    path: KeyPath
    message: str
    hint: str = ""
    line: int | None = None

    def render(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        text = f"{where}: {format_path(self.path) or '(top level)'}: {self.message}"
        return text + (f"\n    hint: {self.hint}" if self.hint else "")


class ConfigError(Exception):
    """Raised when a config cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(problem.render() for problem in problems))


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with the text it came from, which config history stores."""

    config: GatewayConfig
    text: str
    source: str


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Read and validate a config file (the embedded default when `path` is None)."""
    return read_config(path).config


def read_config(path: str | Path | None = None, ledger_only: bool = False) -> LoadedConfig:
    """`ledger_only`: for a command that works on the ledger database alone (`parse_config`)."""
    source = Path(path).resolve() if path else DEFAULT_CONFIG
    name = str(source)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(name, (), f"cannot read file: {exc.strerror}", "check the path")]
        ) from exc
    text = _decode(data, name)
    return LoadedConfig(parse_config(text, name, ledger_only), text, name)


def _decode(data: bytes, name: str) -> str:
    """The text of a config file, which must be UTF-8; ConfigError says where it is not
    (a file saved as Latin-1 or Windows-1252 fails at its first accented letter)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start : exc.start].decode("utf-8")) + 1  # valid up to there
        raise ConfigError(
            [
                ConfigProblem(
                    name,
                    (),
                    f"not valid UTF-8: byte 0x{data[exc.start]:02x} at line {line}, "
                    f"column {column} (byte offset {exc.start})",
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                    line,
                )
            ]
        ) from exc


def parse_config(text: str, name: str = "<config>", ledger_only: bool = False) -> GatewayConfig:
    """The validated config, or a ConfigError with every problem found.

    `ledger_only`: for a command that works on the ledger database alone (`keys`, `usage`,
    `rollout`, ...): a `${VAR}` outside `ledger:` that is not set (a provider's key, a
    webhook, kept in the gateway's environment only) is left empty, unless its field
    cannot be empty. The gateway and `check` need every one."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        for either in (mark, getattr(exc, "context_mark", None)):
            if either is not None:  # the file's name, where PyYAML says "<unicode string>"
                either.name = name
        raise ConfigError(
            [ConfigProblem(name, (), f"not valid YAML: {exc}", "fix the YAML syntax", line)]
        ) from exc
    lines: dict[KeyPath, int] = {}
    _index_lines(root, (), lines)
    raw = yaml.safe_load(text) if root is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem(name, (), "the top level must be a mapping")])

    problems: list[ConfigProblem] = []
    _duplicates(root, (), problems, name)
    _keys_that_are_not_names(root, (), problems, name)
    odd_keys = any(p.message.startswith("YAML reads") for p in problems)
    found = len(problems)
    sources: dict[KeyPath, list[str]] = {}  # the variables each value was made from
    raw = _substitute_env(raw, (), problems, name, lines, sources)
    unset = {problem.path for problem in problems[found:]}
    tolerated: list[ConfigProblem] = []
    if ledger_only:
        tolerated = [p for p in problems[found:] if p.path[:1] != ("ledger",)]
        problems = [p for p in problems if p not in tolerated]
    config: GatewayConfig | None = None
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        invalid = [_named_source(p, sources) for p in _from_validation(exc, name, lines)]
        if odd_keys:  # said above, with the key as written and its line
            invalid = [p for p in invalid if p.path[-1:] != ("[key]",)]
        problems.extend(  # a variable not set is told once, not also that the empty
            p for p in invalid if p.path not in unset
        )  # string it became is, say, no URL
        failed = {p.path for p in invalid}
        problems.extend(p for p in tolerated if p.path in failed)  # it could not be empty
    if config is not None:
        from metergate.config.checks import cross_reference_problems

        for path, message, hint in cross_reference_problems(config):
            problems.append(ConfigProblem(name, path, message, hint, _line_for(path, lines)))
    if problems:  # in file order, as an editor shows them; unplaced ones last
        problems.sort(key=lambda problem: (problem.line is None, problem.line or 0))
        raise ConfigError(problems)
    assert config is not None
    return config


def _index_lines(node: yaml.Node | None, path: KeyPath, out: dict[KeyPath, int]) -> None:
    if node is None:
        return
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            _index_lines(value_node, child, out)
            out[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), out)


def _duplicates(
    node: yaml.Node | None, path: KeyPath, problems: list[ConfigProblem], name: str
) -> None:
    """A key written twice in one mapping: YAML keeps the last one and drops the first
    without a word, so a pasted second `models:` block would silently replace the first."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen and key != "<<":  # (merge keys may repeat)
                problems.append(
                    ConfigProblem(
                        name,
                        (*path, key),
                        f"written twice in the same mapping (lines {seen[key]} and {line}); "
                        "YAML would keep only the last one",
                        "merge the two into one, or remove the one not meant",
                        line,
                    )
                )
            seen.setdefault(key, line)
            _duplicates(value_node, (*path, key), problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates(item, (*path, index), problems, name)


_READ_AS = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:null": "null",
}
_BOOLEAN_WORDS = "YAML reads on, off, yes, no, true and false unquoted as booleans"


def _keys_that_are_not_names(
    node: yaml.Node | None, path: KeyPath, problems: list[ConfigProblem], name: str
) -> None:
    """Every key of this config is a name (a model, a key, a header); YAML reads some
    unquoted words and numbers as something else, so `on:` became the key true, which
    validation would call `models[1].[key]`, at the line of `models:`."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            read_as = _READ_AS.get(key_node.tag)
            if read_as is not None and isinstance(key_node, yaml.ScalarNode):
                text = str(key_node.value)
                problems.append(
                    ConfigProblem(
                        name,
                        (*path, text),
                        f"YAML reads the key {text} as {read_as}, not as a name",
                        f'quote it: "{text}":'
                        + (f" ({_BOOLEAN_WORDS})" if read_as == "a boolean" else ""),
                        key_node.start_mark.line + 1,
                    )
                )
            _keys_that_are_not_names(value_node, (*path, str(key_node.value)), problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _keys_that_are_not_names(item, (*path, index), problems, name)


def _line_for(path: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def _substitute_env(
    value: Any,
    path: KeyPath,
    problems: list[ConfigProblem],
    name: str,
    lines: dict,
    sources: dict[KeyPath, list[str]],
) -> Any:
    """`value` with its `${VAR}` references replaced; `sources` gets, for each value that
    had any, what each became (`VAR='value'`), for a message about that value."""
    if isinstance(value, dict):
        return {
            k: _substitute_env(v, (*path, k), problems, name, lines, sources)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _substitute_env(v, (*path, i), problems, name, lines, sources)
            for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        variable, form, default = match.group(1, 2, 3)
        found = os.environ.get(variable)
        if found is not None and (found or form != ":-"):
            sources.setdefault(path, []).append(f"{variable}={found!r}")
            return found
        if default is not None:
            sources.setdefault(path, []).append(f"{variable} unset: the default {default!r}")
            return default
        problems.append(
            ConfigProblem(
                name,
                path,
                f"environment variable {variable} is not set",
                f"set {variable} where this config is read (a running gateway keeps the "
                f"environment it started with: set it there and restart the gateway), or "
                f"write ${{{variable}:-default}}",
                _line_for(path, lines),
            )
        )
        return ""

    return _ENV_PATTERN.sub(replace, value)


def _named_source(problem: ConfigProblem, sources: dict[KeyPath, list[str]]) -> ConfigProblem:
    """A value made from `${VAR}` is not what the file shows: say what it was made of
    (the variable alone for a secret field)."""
    from metergate.config.secrets import holds_secret  # (it reads ConfigError from here)

    made_of = sources.get(problem.path)
    if not made_of:
        return problem
    if holds_secret(problem.path):
        made_of = [part.split("=", 1)[0].split(" ", 1)[0] for part in made_of]
    return dataclasses.replace(problem, message=f"{problem.message} (from {'; '.join(made_of)})")


def _quote_hint(value: Any) -> str:
    """What to do about a value YAML read as something other than the text it is."""
    if isinstance(value, bool):
        return f"quote it ({_BOOLEAN_WORDS})"
    if isinstance(value, int | float | datetime.date):
        kind = "date" if isinstance(value, datetime.date) else "number"
        return f'YAML reads {value} unquoted as a {kind}: quote it ("{value}")'
    return ""


def _from_validation(exc: ValidationError, name: str, lines: dict) -> list[ConfigProblem]:
    problems = []
    for error in exc.errors():
        path = tuple(error["loc"])
        kind = error["type"]
        hint = ""
        if kind == "extra_forbidden":
            message = "unknown key"
            hint = "check the spelling against the config reference in the README"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error":
            message = error["msg"].replace("Input should be", "must be")
        else:  # a validator's own message, without pydantic's "Value error, " before it
            message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind == "string_type":
            hint = _quote_hint(error.get("input"))
        problems.append(ConfigProblem(name, path, message, hint, _line_for(path, lines)))
    return problems
