"""What a key may be named and capped at, whoever creates it: the admin API and
`metergate keys create` apply these same rules, so neither makes a key the other refuses."""

from __future__ import annotations

import re
from typing import Any

from metergate.errors import InvalidRequest
from metergate.teams import whole_number

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # whole string: fullmatch
CAP_MAX = 2**31 - 1  # the column is a 32-bit INTEGER in PostgreSQL


def check_name(value: Any, label: str = "`name`") -> str:
    """A key's name; `label` is what the caller wrote it as (a JSON field, an option)."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InvalidRequest(
            f"{label} must be 1-64 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes a metric label)",
            param="name",
        )
    return value


def check_cap(
    value: Any, label: str = "`max_tokens_cap`", unset: str | None = "null"
) -> int | None:
    """A positive 32-bit integer; 2213.0 is one too (JSON does not tell them apart).
    `unset`: how the caller asks for no cap, named in the error when it can."""
    if value is None:
        return None
    number = whole_number(value)
    if number is None or not 1 <= number <= CAP_MAX:
        raise InvalidRequest(
            f"{label} must be an integer from 1 to {CAP_MAX}" + (f", or {unset}" if unset else ""),
            param="max_tokens_cap",
        )
    return number
