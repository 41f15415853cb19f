"""Budget periods: the current day or calendar month in the budget's time zone."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo


def period_bounds(now: float, period: str, timezone: str) -> tuple[float, float]:
    """Start and end (epoch seconds) of the day or month that contains `now`.

    Arithmetic on zoneinfo datetimes is wall-clock arithmetic, and the UTC offset is
    recomputed by `timestamp()`, so a DST change inside the period is handled.
    """
    local = dt.datetime.fromtimestamp(now, ZoneInfo(timezone))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = midnight, midnight + dt.timedelta(days=1)
    else:
        start = midnight.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
