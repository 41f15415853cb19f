"""The long windows (7 and 30 days) of the Overview and the Upstreams page, read from
the ledger's sums by hour.

Ranking every row of a month for its percentiles took the Overview 47 s at 200,000
requests a day (the Upstreams page 25 s). These windows read the hours' sums and
latency bins instead
(`metering.hourly`), and the rows of the hour under way only. Their buckets are whole
UTC hours (four of them at 30 days), the last the one under way, so far (its rate is
over the time it has run); the window so starts up to a bucket later than
`now - window`. Requests, errors, tokens and money are exact; a p95 is the middle of
the bin that holds the nearest rank, within 4.5 % of the rows' own. Models beyond the
chart's colours share a line, as in `console.series`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metergate.console.series import MAX_SERIES, Line, empty_line, shared_line_last
from metergate.console.windows import Window
from metergate.metering.hourly import DURATION, HOUR, USAGE_SUMS, HourSums, nearest_rank
from metergate.metering.ledger import COLUMNS, LedgerRow
from metergate.metering.report import (
    ERROR_OUTCOMES,
    REFUSED_OUTCOMES,
    UsageGroup,
    costliest_first,
)
from metergate.storage.database import Database

_ERRORS = frozenset(ERROR_OUTCOMES)
_REFUSED = frozenset(REFUSED_OUTCOMES)


@dataclass(slots=True)
class Counts:
    """Requests of one model or upstream (or of all) in one bucket (or the window)."""

    requests: int = 0
    errors: int = 0
    refused: int = 0
    sums: list[int] = field(default_factory=lambda: [0] * (len(USAGE_SUMS) - 1))  # the rest
    latency: dict[int, int] = field(default_factory=dict)
    ttft: dict[int, int] = field(default_factory=dict)

    def add_usage(self, outcome: str, values: list[int]) -> None:
        requests = values[0]
        self.requests += requests
        self.errors += requests if outcome in _ERRORS else 0
        self.refused += requests if outcome in _REFUSED else 0
        for index, value in enumerate(values[1:]):
            self.sums[index] += value

    def add_latency(self, kind: int, bin_: int, count: int) -> None:
        bins = self.latency if kind == DURATION else self.ttft
        bins[bin_] = bins.get(bin_, 0) + count

    def merge(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.refused += other.refused
        self.sums = [mine + theirs for mine, theirs in zip(self.sums, other.sums, strict=True)]
        for mine, theirs in ((self.latency, other.latency), (self.ttft, other.ttft)):
            for bin_, count in theirs.items():
                mine[bin_] = mine.get(bin_, 0) + count

    def group(self, name: str | None) -> UsageGroup:
        tokens_in, cached, tokens_out, cost, saved, _ = self.sums
        p95 = nearest_rank(self.latency)
        return UsageGroup(
            name,
            requests=self.requests,
            input_tokens=tokens_in,
            cached_input_tokens=cached,
            output_tokens=tokens_out,
            cost_nano=cost,
            saved_nano=saved,
            errors=self.errors,
            refused=self.refused,
            p95_ms=None if p95 is None else round(p95, 3),
        )


def window_start(window: Window, now: float) -> int:
    """Where a long window's first bucket starts: whole buckets, the last under way."""
    return (int(now // window.step) - (window.buckets - 1)) * window.step


async def read_hours(
    database: Database, first: int, now: float
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """From `first` (an hour's start) to `now`: usage as `(hour, model, upstream, outcome,
    *USAGE_SUMS)` and latencies as `(hour, model, upstream, kind, bin, requests)`, from
    the sums of whole hours and the rows of the hour under way (a group can come twice)."""
    this_hour = int(now // HOUR)
    hours = (first // HOUR, this_hour)
    sums = ", ".join(f"SUM({name})" for name in USAGE_SUMS)
    usage = [
        (int(hour), str(model), str(upstream), str(outcome), *(int(v) for v in values))
        for hour, model, upstream, outcome, *values in await database.fetch(
            f"SELECT hour, model, upstream, outcome, {sums} FROM usage_hours "
            "WHERE hour >= ? AND hour < ? GROUP BY hour, model, upstream, outcome",
            hours,
        )
    ]
    latency = [
        (int(hour), str(model), str(upstream), int(kind), int(bin_), int(count))
        for hour, model, upstream, kind, bin_, count in await database.fetch(
            "SELECT hour, model, upstream, kind, bin, SUM(requests) FROM latency_hours "
            "WHERE hour >= ? AND hour < ? GROUP BY hour, model, upstream, kind, bin",
            hours,
        )
    ]
    rows = await database.fetch(
        f"SELECT {', '.join(COLUMNS)} FROM requests WHERE ts >= ? AND ts < ?",
        (float(this_hour * HOUR), now),
    )
    recent = HourSums(LedgerRow(*row) for row in rows)  # the hour under way
    usage += [(*group[:1], *group[2:], *values) for group, values in recent.usage.items()]
    latency += [(*group, count) for group, count in recent.latency.items()]
    return usage, latency


async def long_window(
    database: Database, window: Window, now: float
) -> tuple[list[UsageGroup], dict[str, Any]]:
    """The models' totals (costliest first, then the total of all, as
    `metering.report.usage_summary`) and the charts' series (as `console.series`)."""
    first = window_start(window, now)
    usage, latency = await read_hours(database, first, now)
    buckets: dict[tuple[str, int], Counts] = {}
    models: dict[str, Counts] = {}

    def counts(hour: int, model: str) -> tuple[Counts, Counts]:
        index = (hour * HOUR - first) // window.step
        return buckets.setdefault((model, index), Counts()), models.setdefault(model, Counts())

    for hour, model, _, outcome, *values in usage:
        for found in counts(hour, model):
            found.add_usage(outcome, values)
    for hour, model, _, kind, bin_, count in latency:
        for found in counts(hour, model):
            found.add_latency(kind, bin_, count)
    total = Counts()
    for found in models.values():
        total.merge(found)
    groups = costliest_first(found.group(model) for model, found in models.items())
    series = _series(buckets, models, window, first, now)
    return [*groups, total.group(None)], series


def _series(
    buckets: dict[tuple[str, int], Counts],
    models: dict[str, Counts],
    window: Window,
    first: int,
    now: float,
) -> dict[str, Any]:
    step, size = window.step, window.buckets
    line_of = {model: model for model in models}
    group = ""
    if len(models) > MAX_SERIES:
        busiest = sorted(models, key=lambda m: (-models[m].requests, m))
        group = f"{len(models) - (MAX_SERIES - 1)} other models"
        for model in busiest[MAX_SERIES - 1 :]:
            line_of[model] = group
    merged: dict[tuple[str, int], Counts] = {}
    for (model, index), found in buckets.items():
        merged.setdefault((line_of[model], index), Counts()).merge(found)
    lines: dict[str, Line] = {}
    last_seconds = max(now - (first + (size - 1) * step), 1e-3)  # the bucket under way
    for (name, index), found in merged.items():
        line = lines.get(name)
        if line is None:
            line = lines[name] = empty_line(size)
        seconds = last_seconds if index == size - 1 else step
        served = found.requests - found.refused
        p95, ttft = nearest_rank(found.latency), nearest_rank(found.ttft)
        line["requests_per_second"][index] = round(found.requests / seconds, 6)
        line["error_percent"][index] = round(100 * found.errors / served, 3) if served else None
        line["p95_ms"][index] = None if p95 is None else round(p95, 3)
        line["ttft_p95_ms"][index] = None if ttft is None else round(ttft, 3)
    return {
        "start": float(first),
        "step": step,
        "timestamps": [float(first + i * step) for i in range(size)],
        "models": shared_line_last(lines, group),
    }
