"""What a key may be named, capped at, expire at and be limited to, whoever creates or
changes it: the admin API and `metergate keys` apply these same rules, so neither makes
a key the other refuses."""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from decimal import Decimal
from typing import Any

from metergate.errors import InvalidRequest
from metergate.teams import TeamError, check_limit, check_usd, whole_number

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


LAST_EXPIRY = 253_402_300_799  # 9999-12-31T23:59:59Z: later is not a date a person can read


def check_expiry(
    value: Any, label: str = "`expires_at`", not_before: float | None = None
) -> float | None:
    """When a key stops working, in epoch seconds, or None for never. A time already
    past expires a key at once (unlike a revoked key, it can be given a later one).
    Given `not_before` (now), an earlier time is refused: where a person types a new
    key's expiry (the CLI, the console's form), a past one is most likely a slip (last
    year for this one), and the key would never work. The admin API takes it, as its
    document can say no more than a range, and a program means the time it computes."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= LAST_EXPIRY
    ):
        raise InvalidRequest(
            f"{label} must be a time in epoch seconds (0 to {LAST_EXPIRY}, the end of the "
            "year 9999), or null for a key that never expires",
            param="expires_at",
        )
    if not_before is not None and value <= not_before:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
        raise InvalidRequest(
            f"{label} is already past ({when}): a key made with it would never work; "
            "give a later time, or none for a key that never expires",
            param="expires_at",
        )
    return float(value)


def check_budget_limits(
    value: Any, budgets: Collection[str], label: str = "`budget_limits`"
) -> dict[str, Decimal] | None:
    """A key's own limits of budgets for each key, {budget name: USD}: its plan, above or
    below the config's default. `budgets`: those the config has (`each_key_budgets`).
    None (or {}) for none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"{label} must be an object of budget name: USD, or null", param="budget_limits"
        )
    for name in value:
        if name not in budgets:
            known = ", ".join(sorted(budgets)) or 'none (a budget with scope: key, target: "*")'
            raise InvalidRequest(
                f"{label}: {name!r} is not a budget for each key in the config; those a key "
                f"may set: {known}",
                param="budget_limits",
            )
    try:
        return {name: check_usd(amount) for name, amount in value.items()} or None
    except TeamError:
        raise InvalidRequest(
            f"{label}: a limit is a positive amount of USD below 10^9: a decimal string with "
            'at most 9 decimals ("12.50") or a number',
            param="budget_limits",
        ) from None


RATE_FIELDS = frozenset({"rpm", "tpm"})


def check_rates(body: dict[str, Any]) -> dict[str, int | None]:
    """A key's own `rpm` and `tpm` (integers from 1, or null for the config's), as a
    team's are checked; both, None where absent."""
    try:
        return {name: check_limit(body.get(name), name) for name in ("rpm", "tpm")}
    except TeamError as error:
        raise InvalidRequest(str(error), param=error.field) from None
