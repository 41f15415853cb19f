"""Teams: a group of keys with budgets and rate limits of its own, on top of each key's.

A team lives in the ledger database (created and changed with `metergate teams` or the
admin API, live on every process within seconds), and a key names its team. A team's
budgets are ordinary budgets of scope `team` (`team:<name>:<period>`), so they are
reserved before each call and settled after it on the same path as every other budget
(in process, or on Redis for a fleet), and rebuilt from the ledger, whose rows record
each request's team. Its rate limits are buckets of scope `team`, shared by its keys.
Config files can declare team budgets (`scope: team`) and limits (`rate_limits.teams`)
too; they apply the same way.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from pydantic import ValidationError

from metergate.config.model import BudgetConfig, RateLimit
from metergate.config.observe import TAG_NAME

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # whole string: fullmatch
PERIODS = ("day", "month")
BUDGET_PREFIX = "team:"
MAX_TAGS = 16
MAX_TAG_VALUE = 512
MAX_DESCRIPTION = 500
LIMIT_MAX = 2**31 - 1  # rpm and tpm are 32-bit INTEGER columns in PostgreSQL
# USD as a decimal string: nano-USD precision, below a billion (the budget book counts
# integer nano-USD, which the API and the ledger keep in 64 bits: at most ~9.2e9 USD).
USD = re.compile(r"(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,9})?")
USD_ZERO = re.compile(r"0(?:\.0+)?")
USD_MAX = 10**9
NANO = Decimal("1E-9")
BUDGET_FIELDS = ("period", "limit_usd", "hard", "timezone", "alert_at_percent")


class TeamError(ValueError):
    """A team definition that cannot be used; the message says what to write instead."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class TeamBudget:
    period: str  # day | month
    limit_usd: Decimal
    hard: bool = True
    timezone: str = "UTC"
    alert_at_percent: tuple[int, ...] = (50, 80, 100)

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "limit_usd": usd_text(self.limit_usd),
            "hard": self.hard,
            "timezone": self.timezone,
            "alert_at_percent": list(self.alert_at_percent),
        }


@dataclass(frozen=True, slots=True)
class TeamRecord:
    name: str
    description: str = ""
    tags: tuple[tuple[str, str], ...] = ()  # default tags of its keys' requests
    budgets: tuple[TeamBudget, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    def budget_configs(self) -> dict[str, BudgetConfig]:
        """Its budgets as the budget book takes them, named `team:<name>:<period>`."""
        return {
            budget_name(self.name, b.period): BudgetConfig(
                scope="team",
                target=self.name,
                period=b.period,  # type: ignore[arg-type]
                timezone=b.timezone,
                limit_usd=b.limit_usd,
                hard=b.hard,
                alert_at_percent=list(b.alert_at_percent),
            )
            for b in self.budgets
        }

    def rate_limit(self) -> RateLimit | None:
        """Its rate limits as a named `rate_limits.teams` entry (fields left out inherit `*`)."""
        fields = {k: v for k, v in (("rpm", self.rpm), ("tpm", self.tpm)) if v is not None}
        return RateLimit(**fields) if fields else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "tags": dict(self.tags),
            "budgets": [b.to_json() for b in self.budgets],
            "rpm": self.rpm,
            "tpm": self.tpm,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def budget_name(team: str, period: str) -> str:
    return f"{BUDGET_PREFIX}{team}:{period}"


def check_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise TeamError(
            "a team name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (it becomes a metric label)",
            field,
        )
    return value


def check_tags(value: Any, field: str = "tags") -> tuple[tuple[str, str], ...]:
    """Default tags: an object of up to 16 printable string values under valid tag names
    (the rules of a request's own tags); `{}` is none."""
    if not isinstance(value, dict) or len(value) > MAX_TAGS:
        raise TeamError(
            f"`{field}` must be an object of at most {MAX_TAGS} name: value strings", field
        )
    for name, tag in value.items():
        if not TAG_NAME.fullmatch(name):
            raise TeamError(f"tag name {name!r}: 1-64 letters, digits, '.', '_' or '-'", field)
        if not isinstance(tag, str) or not 1 <= len(tag) <= MAX_TAG_VALUE or not tag.isprintable():
            raise TeamError(
                f"tag {name!r} needs a printable value of 1-{MAX_TAG_VALUE} characters", field
            )
    return tuple(sorted(value.items()))


def whole_number(value: Any) -> int | None:
    """An integer, or a float with no fraction (JSON does not tell 5 and 5.0 apart); else
    None. Booleans are not numbers here."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value if type(value) is int else None


def check_limit(value: Any, field: str) -> int | None:
    if value is None:
        return None
    number = whole_number(value)
    if number is None or not 1 <= number <= LIMIT_MAX:
        raise TeamError(f"`{field}` must be an integer from 1 to {LIMIT_MAX}, or null", field)
    return number


@functools.cache
def time_zones() -> frozenset[str]:
    """The IANA time zones a team budget may use: those of this system's tz database."""
    return frozenset(zoneinfo.available_timezones())


def usd_text(amount: Decimal) -> str:
    """USD as a plain decimal string ("0.0000001", never "1E-7"), which `check_usd` takes
    back: what the API answers can be sent again as it is."""
    return format(amount, "f")


def check_usd(value: Any) -> Decimal:
    """A positive amount of USD below a billion, held to the budget book's precision of
    one nano-USD: a decimal string ("12.50", at most nine decimals, exact) or a JSON
    number, which is binary floating point and so is rounded to nine decimals (half to
    even); a number that rounds to 0 is refused, since a zero limit refuses everything."""
    if isinstance(value, str):
        if USD.fullmatch(value) and not USD_ZERO.fullmatch(value):
            return Decimal(value)
    elif type(value) in (int, float) and 0 < value < USD_MAX:
        amount = Decimal(repr(value)).quantize(NANO, ROUND_HALF_EVEN)
        if amount > 0:
            return amount.normalize() if amount % 1 else amount.to_integral_value()
    raise TeamError(
        "a budget's `limit_usd` is a positive amount of USD below 10^9: a decimal string "
        'with at most 9 decimals ("12.50") or a number (rounded to 9 decimals, not to 0)',
        "budgets",
    )


def _check_percents(value: Any) -> tuple[int, ...]:
    numbers = [whole_number(p) for p in value] if isinstance(value, list) else [None]
    if any(p is None or not 1 <= p <= 1000 for p in numbers):
        raise TeamError("a budget's `alert_at_percent` is a list of integers 1-1000", "budgets")
    return tuple(p for p in numbers if p is not None)


def _check_budget(item: Any) -> TeamBudget:
    if not isinstance(item, dict):
        raise TeamError("each budget is an object {period, limit_usd, ...}", "budgets")
    unknown = set(item) - set(BUDGET_FIELDS)
    if unknown:
        raise TeamError(f"unknown budget field(s): {', '.join(sorted(unknown))}", "budgets")
    period = item.get("period")
    if period not in PERIODS:
        raise TeamError("a budget's `period` is day or month", "budgets")
    hard = item.get("hard", True)
    if not isinstance(hard, bool):
        raise TeamError("a budget's `hard` is true or false", "budgets")
    timezone = item.get("timezone", "UTC")
    if not isinstance(timezone, str) or timezone not in time_zones():
        raise TeamError(
            f"a budget's `timezone` is an IANA time zone name, e.g. Europe/Berlin "
            f"(got {timezone!r})",
            "budgets",
        )
    budget = TeamBudget(
        period,
        check_usd(item.get("limit_usd")),
        hard,
        timezone,
        _check_percents(item.get("alert_at_percent", [50, 80, 100])),
    )
    _validate(budget)
    return budget


def check_budgets(value: Any) -> tuple[TeamBudget, ...]:
    """A list of {period, limit_usd, hard?, timezone?, alert_at_percent?}, one per period;
    `[]` is none."""
    if not isinstance(value, list):
        raise TeamError("`budgets` must be a list of {period, limit_usd, ...}", "budgets")
    budgets: dict[str, TeamBudget] = {}
    for item in value:
        budget = _check_budget(item)
        if budget.period in budgets:
            raise TeamError(f"one budget per period: two for {budget.period}", "budgets")
        budgets[budget.period] = budget
    return tuple(budgets[p] for p in PERIODS if p in budgets)


def _validate(budget: TeamBudget) -> None:
    """The budget book's own rules (limit > 0, a real time zone, 1-1000 percents)."""
    try:
        BudgetConfig(
            scope="team",
            target="t",
            period=budget.period,  # type: ignore[arg-type]
            timezone=budget.timezone,
            limit_usd=budget.limit_usd,
            hard=budget.hard,
            alert_at_percent=list(budget.alert_at_percent),
        )
    except (ValidationError, TypeError) as error:
        problems = error.errors() if isinstance(error, ValidationError) else []
        text = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems
        ) or str(error)
        raise TeamError(f"invalid budget: {text}", "budgets") from None


def parse_budget_option(text: str) -> dict[str, Any]:
    """The CLI's `--budget PERIOD:USD[:soft]`, e.g. `month:200` or `day:10:soft`."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("soft", "hard")):
        raise TeamError(f"--budget takes PERIOD:USD[:soft], e.g. month:200 (got {text!r})")
    return {
        "period": parts[0],
        "limit_usd": parts[1],
        "hard": len(parts) == 2 or parts[2] == "hard",
    }


def check_change(body: dict[str, Any], creating: bool) -> dict[str, Any]:
    """Validate an admin API / CLI body; return the fields to store (those sent, and
    when creating, the defaults of the others). Only rpm and tpm take null (no limit)."""
    allowed = {"name", "description", "tags", "budgets", "rpm", "tpm"}
    unknown = set(body) - allowed
    if unknown:
        raise TeamError(f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
    values: dict[str, Any] = {}
    if creating:
        values["name"] = check_name(body.get("name"))
    elif "name" in body:
        raise TeamError("a team cannot be renamed; create another and move its keys", "name")
    description = body.get("description", "")
    # printable, as tag values: a NUL fails PostgreSQL's text, a bidi override (U+202E)
    # shows the console "evil" as "live", a newline forges a line of `teams list`
    if (
        not isinstance(description, str)
        or len(description) > MAX_DESCRIPTION
        or not description.isprintable()
    ):
        raise TeamError(
            f"`description` is printable text of at most {MAX_DESCRIPTION} characters "
            "(no control, format or bidi-override characters)",
            "description",
        )
    if "description" in body or creating:
        values["description"] = description
    if "tags" in body or creating:
        values["tags"] = check_tags(body.get("tags", {}))
    if "budgets" in body or creating:
        values["budgets"] = check_budgets(body.get("budgets", []))
    for name in ("rpm", "tpm"):
        if name in body or creating:
            values[name] = check_limit(body.get(name), name)
    return values
