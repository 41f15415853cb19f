"""Literal secrets in a config's text: taken out before the text is stored, put back from
the live config when a stored version is applied again.

The config history (`storage.config_versions`) keeps every applied config's text. A
secret written as `${VAR}` is only a name there, but one written literally (`api_key:
sk-...`, a password in a database URL, a Slack webhook URL) would be kept verbatim, in
every version, in every backup of the ledger. So each secret-bearing field's literal
part is replaced by `${METERGATE_REDACTED}` before the text is stored, with the rest of
the text (comments, layout, other fields) kept as written. The marker is an environment
reference on purpose: a stored version applied without its secrets restored fails
validation ("METERGATE_REDACTED is not set") instead of running with a placeholder key.

Restoring takes each redacted field from the live config text, at the same key path:
the file on disk, or the text the process runs. A secret that exists in neither (a
provider removed since that version) cannot be restored, and the version is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import yaml

from metergate.config.loader import ConfigError, ConfigProblem

MARKER = "${METERGATE_REDACTED}"


def url_secrets(url: str) -> list[str]:
    """The literal secrets a URL carries: its password, secret-named query values."""
    return [url[start:end] for start, end in _parts("url", url).values()]


def without_password(url: str) -> str:
    """A URL fit for a log line, a banner or an error message: the password of its
    userinfo and the values of secret-named query parameters (libpq's `?password=`, a
    collector's `?token=`) are `***`."""
    for start, end in sorted(_parts("url", url).values(), reverse=True):
        url = f"{url[:start]}***{url[end:]}"
    return url


Kind = Literal["whole", "url", "header"]
_ANY = "*"
# Where secrets live in a config, by key path (`*`: any name). "whole": the value is the
# secret; "url": the password in the userinfo and secret-named query parameters;
# "header": the value, when the header's name says it carries credentials.
_FIELDS: tuple[tuple[tuple[str, ...], Kind], ...] = (
    (("providers", _ANY, "api_key"), "whole"),
    (("providers", _ANY, "azure", "client_secret"), "whole"),
    (("providers", _ANY, "bedrock", "secret_access_key"), "whole"),
    (("providers", _ANY, "bedrock", "session_token"), "whole"),
    (("providers", _ANY, "headers", _ANY), "header"),
    (("providers", _ANY, "base_url"), "url"),
    (("providers", _ANY, "proxy"), "url"),
    (("ledger", "url"), "url"),
    (("redis", "url"), "url"),
    (("admin", "api_key"), "whole"),
    (("server", "metrics_token"), "whole"),
    (("budgets", _ANY, "webhook_url"), "whole"),  # a webhook URL is a bearer capability
    (("rollouts", _ANY, "webhook_url"), "whole"),
    (("rollouts", _ANY, "prometheus_url"), "url"),
    (("mcp", "servers", _ANY, "url"), "url"),
    (("mcp", "servers", _ANY, "headers", _ANY), "header"),
    (("mcp", "servers", _ANY, "env", _ANY), "whole"),  # a stdio server's credentials
    (("tracing", "endpoint"), "url"),
    (("tracing", "headers", _ANY), "whole"),  # a collector's token, whatever its name
)
# A name ending in `key` (at a word's end): Ocp-Apim-Subscription-Key (Azure API
# Management), X-Access-Key, AccessKey, Gemini's `?key=` carry credentials; X-Keyspace
# does not (and a header hidden in the history changes no version when it changes).
_SECRET_NAME = re.compile(
    r"auth|token|secret|passw|pwd|key(?![a-z])|cookie|session|signature|credential|"
    r"^sig$|^code$",
    re.IGNORECASE,
)
# `${VAR}` (or `${VAR:-}`, `${VAR-}`: empty default): a name, not a secret. A non-empty
# default is a literal secret written inside the reference.
_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-)?\}")
_SCHEME = re.compile(r"^\s*(?:bearer|basic|token|bot|apikey)\s+", re.IGNORECASE)
_NULL = "tag:yaml.org,2002:null"


@dataclass(frozen=True, slots=True)
class _Field:
    path: tuple[str, ...]
    kind: Kind
    node: yaml.ScalarNode


def redact(text: str) -> str:
    """`text` with the literal part of every secret-bearing field replaced by MARKER
    (unchanged when it has none)."""
    edits: dict[tuple[int, int], str] = {}
    for field in _fields(text):
        redacted = _redacted_value(field)
        if redacted != field.node.value:
            edits[_span(field.node)] = _render(redacted)
    return _apply(text, edits)


def restore(redacted: str, *donors: str, name: str = "<config>") -> str:
    """Put back every MARKER of `redacted` from the first donor text (live config file,
    running config) with a value at the same key path. A field no donor has raises
    ConfigError naming it."""
    donor_fields = [{f.path: f for f in _fields(donor)} for donor in donors]
    edits: dict[tuple[int, int], str] = {}
    problems: list[ConfigProblem] = []
    for field in _fields(redacted):
        value = field.node.value
        marked = {
            part: span
            for part, span in _parts(field.kind, value).items()
            if value[span[0] : span[1]] == MARKER
        }
        if not marked:
            continue
        found = None
        for donor, fields in zip(donors, donor_fields, strict=True):
            other = fields.get(field.path)
            if other is not None:
                found = _restored(value, marked, donor, other)
                if found is not None:
                    break
        if found is None:
            problems.append(
                ConfigProblem(
                    name,
                    field.path,
                    "this version's literal secret is not kept in the config history, and "
                    "the live config has none at this key to restore it from",
                    "write the secret as ${VAR} (and export VAR), or put it back in the "
                    "config file, then try again",
                    field.node.start_mark.line + 1,
                )
            )
            continue
        edits[_span(field.node)] = found
    if problems:
        raise ConfigError(problems)
    return _apply(redacted, edits)


def _restored(
    value: str, marked: dict[str, tuple[int, int]], donor: str, other: _Field
) -> str | None:
    """The text that replaces a redacted value, from a donor's field at the same path:
    the donor's own source when it redacts to the very same value (kept as written),
    else the value with the donor's secret parts put in. None when the donor lacks one."""
    theirs = _parts(other.kind, other.node.value)
    if not set(marked) <= set(theirs):
        return None
    start, end = _span(other.node)
    source = _strip_properties(donor[start:end]).rstrip()
    if _redacted_value(other) == value and "\n" not in source and source[:1] not in "|>":
        return source
    secrets = {part: other.node.value[slice(*theirs[part])] for part in marked}
    return _render(_replace(value, marked, secrets))


def _redacted_value(field: _Field) -> str:
    value = field.node.value
    parts = _parts(field.kind, value)
    literal = {part: span for part, span in parts.items() if not _from_env(value, span)}
    return _replace(value, literal, dict.fromkeys(literal, MARKER))


# --- finding the fields ----------------------------------------------------------------


def _fields(text: str) -> Iterator[_Field]:
    yield from _walk(yaml.compose(text, Loader=yaml.SafeLoader), (), set())


def _walk(node: yaml.Node | None, path: tuple[str, ...], above: set[int]) -> Iterator[_Field]:
    """Every secret-bearing scalar under `node`; `above`: the collections on the way down
    (a recursive alias would otherwise never end)."""
    if node is None or id(node) in above:
        return
    if isinstance(node, yaml.ScalarNode):
        kind = _kind(path)
        if kind is not None and node.tag != _NULL:
            yield _Field(path, kind, node)
        return
    above.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == "<<":  # a merge key: its mappings belong to this path
                merged = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for item in merged:
                    yield from _walk(item, path, above)
            else:
                yield from _walk(value_node, (*path, str(key_node.value)), above)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk(item, (*path, str(index)), above)
    above.discard(id(node))


def holds_secret(path: tuple[str | int, ...]) -> bool:
    """Does the config field at `path` carry a secret (all of it, or a URL's parts)?"""
    return _kind(tuple(str(part) for part in path)) is not None


def _kind(path: tuple[str, ...]) -> Kind | None:
    for pattern, kind in _FIELDS:
        if len(pattern) == len(path) and all(
            p in (_ANY, q) for p, q in zip(pattern, path, strict=True)
        ):
            if kind == "header":
                return "whole" if _SECRET_NAME.search(path[-1]) else None
            return kind
    return None


# --- the secret parts of a value --------------------------------------------------------


def _parts(kind: Kind, value: str) -> dict[str, tuple[int, int]]:
    """Named spans of `value` that hold secrets."""
    if kind != "url":
        return {"value": (0, len(value))} if value else {}
    parts: dict[str, tuple[int, int]] = {}
    scheme = value.find("://")
    start = scheme + 3 if scheme >= 0 else 0
    end = _authority_end(value, start)
    at = value.rfind("@", start, end)
    if scheme >= 0 and at >= 0:
        colon = value.find(":", start, at)
        if colon >= 0 and colon + 1 < at:
            parts["password"] = (colon + 1, at)
    query = value.find("?", end)
    if query >= 0:
        fragment = value.find("#", query)
        stop = fragment if fragment >= 0 else len(value)
        position = query + 1
        for pair in value[query + 1 : stop].split("&"):
            name, equals, _ = pair.partition("=")
            if equals and _SECRET_NAME.search(name) and len(pair) > len(name) + 1:
                parts[f"query:{name}"] = (position + len(name) + 1, position + len(pair))
            position += len(pair) + 1
    return parts


def _authority_end(value: str, start: int) -> int:
    """Where the authority of a URL ends (`/`, `?` or `#`), skipping `${...}`."""
    index = start
    while index < len(value):
        if value.startswith("${", index):
            close = value.find("}", index)
            index = close + 1 if close >= 0 else len(value)
            continue
        if value[index] in "/?#":
            return index
        index += 1
    return len(value)


def _from_env(value: str, span: tuple[int, int]) -> bool:
    """Whether the part is made of `${VAR}` references only (an auth scheme word aside)."""
    part = _SCHEME.sub("", value[span[0] : span[1]])
    return not _REFERENCE.sub("", part).strip()


def _replace(value: str, spans: dict[str, tuple[int, int]], new: dict[str, str]) -> str:
    for name, (start, end) in sorted(spans.items(), key=lambda item: -item[1][0]):
        value = value[:start] + new[name] + value[end:]
    return value


# --- editing the text ------------------------------------------------------------------


def _span(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.index, node.end_mark.index


def _strip_properties(source: str) -> str:
    """A scalar's source without its anchor or tag (`&a !!str value` -> `value`)."""
    while source[:1] in ("&", "!"):
        _, _, source = source.partition(" ")
        source = source.lstrip(" ")
    return source


def _render(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a YAML double-quoted scalar


def _apply(text: str, edits: dict[tuple[int, int], str]) -> str:
    for (start, end), new in sorted(edits.items(), key=lambda item: -item[0][0]):
        source = text[start:end]
        kept = source[: len(source) - len(_strip_properties(source))]  # anchor, tag
        body = source[len(kept) :]
        trailing = body[len(body.rstrip()) :]  # a block scalar's line breaks
        text = text[:start] + kept + new + trailing + text[end:]
    return text
