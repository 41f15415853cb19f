"""Masking what a request log record must not keep: credentials, e-mail addresses, card
numbers, and whatever the operator names (regexes, JSON paths, headers).

Order: JSON paths on a parsed body first (they need the structure), then every regex
on the text, then the size cap, so a cut can never leave half a secret unmasked.

JSON paths: `$.field`, `$.list[*].field`, `$.list[0]`, `$.object.*`, `$..field` (that
field at any depth); the grammar `config.observe.JSON_PATH` accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from metergate.config.observe import RedactionConfig

MASK = "[REDACTED]"
# Always masked: they authenticate someone, and a header is not the place for prose.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
    }
)

_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("key", r"\bmgk_[A-Za-z0-9_-]{43}"),
    ("key", r"\b(?:sk|pk|rk)-(?:proj-|ant-(?:api\d\d-)?|live-|test-)?[A-Za-z0-9_-]{16,}"),
    ("key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("key", r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    ("key", r"\bgh[pousr]_[A-Za-z0-9]{36,}"),
    ("key", r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # a JWT
    ("key", r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}"),
    (
        "email",
        r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,}\b",
    ),
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")

Token = tuple[str, Any]  # ("key", name) | ("index", n) | ("any", None) | ("deep", name)
_TOKEN = re.compile(
    r"\.\.([A-Za-z_][A-Za-z0-9_-]*)|\.([A-Za-z_][A-Za-z0-9_-]*)|\.\*|\[\*\]|\[(\d+)\]"
)


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group())
    return "[REDACTED:card]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group()


def parse_path(path: str) -> list[Token]:
    tokens: list[Token] = []
    for match in _TOKEN.finditer(path, 1):
        deep, key, index = match.groups()
        if deep is not None:
            tokens.append(("deep", deep))
        elif key is not None:
            tokens.append(("key", key))
        elif index is not None:
            tokens.append(("index", int(index)))
        else:
            tokens.append(("any", None))
    return tokens


def _slots(node: Any, token: Token) -> Iterator[tuple[Any, Any]]:
    """The (container, key) pairs one path step reaches from `node`."""
    kind, arg = token
    if kind == "key":
        if isinstance(node, dict) and arg in node:
            yield node, arg
    elif kind == "index":
        if isinstance(node, list) and arg < len(node):
            yield node, arg
    elif kind == "any":
        if isinstance(node, dict):
            yield from ((node, k) for k in list(node))
        elif isinstance(node, list):
            yield from ((node, i) for i in range(len(node)))
    else:  # deep: the field at any depth below (and in) node
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, dict):
                if arg in current:
                    yield current, arg
                stack.extend(v for k, v in current.items() if k != arg)
            elif isinstance(current, list):
                stack.extend(current)


def mask_path(data: Any, tokens: list[Token]) -> None:
    """Replace every value the path reaches with the mask (in place)."""
    frontier = [data]
    for step, token in enumerate(tokens):
        slots = [slot for node in frontier for slot in _slots(node, token)]
        if step == len(tokens) - 1:
            for container, key in slots:
                container[key] = MASK
            return
        frontier = [container[key] for container, key in slots]


class Redactor:
    def __init__(self, config: RedactionConfig) -> None:
        patterns = [(f"[REDACTED:{kind}]", rx) for kind, rx in _DEFAULTS] if config.defaults else []
        patterns += [(MASK, rx) for rx in config.patterns]
        self.patterns = [(mask, re.compile(rx)) for mask, rx in patterns]
        self.cards = config.defaults
        self.paths = [parse_path(p) for p in config.json_paths]
        self.headers = SECRET_HEADERS | {h.lower() for h in config.headers}

    def text(self, value: str) -> str:
        for mask, pattern in self.patterns:
            value = pattern.sub(mask, value)
        if self.cards:
            value = _CARD.sub(_mask_card, value)
        return value

    def json(self, data: Any) -> Any:
        """Mask the configured JSON paths in `data` (in place; pass a copy)."""
        for tokens in self.paths:
            mask_path(data, tokens)
        return data

    def header_map(self, headers: dict[bytes, bytes] | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for raw_name, raw_value in (headers or {}).items():
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            out[name] = MASK if name in self.headers else self.text(value)
        return out
