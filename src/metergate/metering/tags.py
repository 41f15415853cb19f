"""Request tags: who to attribute a request to, beyond its key.

A caller tags a request with `x-metergate-tags: team=search,feature=rerank` and/or
OpenAI's `metadata` object; a key and its team carry default tags. The most specific
wins: team defaults < key defaults < `metadata` < the header. Every tag is stored in the
ledger; only names on the `tags.metric_labels` allow-list reach Prometheus, with a
bounded set of values (`TagLabels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metergate.config.observe import TAG_NAME, TagsConfig
from metergate.errors import InvalidRequest

HEADER = b"x-metergate-tags"
MAX_TAGS = 16  # per source, as OpenAI allows 16 metadata pairs
MAX_VALUE = 512
OTHER = "other"


def _bad(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_tags")


def check_tag(name: str, value: str, where: str) -> None:
    """Raise a 400 that says what is wrong with one tag (`where`: its source, for the text)."""
    if not TAG_NAME.fullmatch(name):
        raise _bad(
            f"{where}: tag name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if not value or len(value) > MAX_VALUE or not value.isprintable():
        raise _bad(f"{where}: tag {name!r} needs a printable value of 1-{MAX_VALUE} characters")


def parse_header(raw: bytes) -> dict[str, str]:
    """`name=value,name=value`; spaces around items are ignored."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("x-metergate-tags must be UTF-8 text: name=value,name=value") from None
    tags: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise _bad(f"x-metergate-tags: {item!r} is not name=value")
        name, value = name.strip(), value.strip()
        check_tag(name, value, "x-metergate-tags")
        tags[name] = value
    if len(tags) > MAX_TAGS:
        raise _bad(f"x-metergate-tags: at most {MAX_TAGS} tags per request")
    return tags


def from_metadata(metadata: Any) -> dict[str, str]:
    """Tags from OpenAI's `metadata`: string values under valid tag names. Other entries
    stay in the request (they are OpenAI's) but are not tags; a `metadata` that is not
    an object of strings is the caller's mistake either way."""
    if not isinstance(metadata, dict):
        raise _bad("`metadata` must be an object of string values", "metadata")
    tags: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(value, str):
            raise _bad(f"`metadata.{name}` must be a string", "metadata")
        if TAG_NAME.fullmatch(name) and value and len(value) <= MAX_VALUE and value.isprintable():
            tags[name] = value
    if len(tags) > MAX_TAGS:
        raise _bad(f"`metadata` may carry at most {MAX_TAGS} entries", "metadata")
    return tags


def request_tags(headers: Mapping[bytes, bytes] | None, body: dict[str, Any]) -> dict[str, str]:
    """The tags a request itself carries (`metadata`, then the header over it)."""
    metadata = body.get("metadata")
    raw = headers.get(HEADER) if headers is not None else None
    if metadata is None and raw is None:
        return {}
    tags = from_metadata(metadata) if metadata is not None else {}
    if raw is not None:
        tags.update(parse_header(raw))
    return tags


def merge(*layers: Mapping[str, str] | None) -> dict[str, str]:
    """Layers from least to most specific; a later layer's value wins."""
    merged: dict[str, str] = {}
    for layer in layers:
        if layer:
            merged.update(layer)
    return merged


class TagLabels:
    """Turns a request's tags into bounded (tag, value) label pairs for Prometheus."""

    def __init__(self, config: TagsConfig) -> None:
        self.max_values = config.max_label_values
        self._allowed: dict[str, frozenset[str] | None] = {
            name: None if values == "*" else frozenset(values)
            for name, values in config.metric_labels.items()
        }
        self._seen: dict[str, set[str]] = {name: set() for name in self._allowed}

    def __bool__(self) -> bool:
        return bool(self._allowed)

    def labels(self, tags: Mapping[str, str]) -> list[tuple[str, str]]:
        """One (name, value) per allow-listed tag the request carries; a value off the
        list (or past `max_label_values` new ones for `*`) becomes `other`."""
        pairs = []
        for name, allowed in self._allowed.items():
            value = tags.get(name)
            if value is None:
                continue
            if allowed is not None:
                pairs.append((name, value if value in allowed else OTHER))
                continue
            seen = self._seen[name]
            if value not in seen:
                if len(seen) >= self.max_values:
                    value = OTHER
                else:
                    seen.add(value)
            pairs.append((name, value))
        return pairs
