"""Per-model time series from the ledger: request rate, error %, p95 latency and TTFT.

Buckets end at `now`, so every bucket is complete and a rate is count / bucket width.
Percentiles are nearest-rank over the bucket's rows, computed in SQL with the same
window functions as `metering.report`, so the console and `metergate usage` agree.

A chart tells at most MAX_SERIES lines apart (the console's palette has that many
distinct colours): with more models in the window, the MAX_SERIES - 1 with the most
requests keep their own line and the rest share one, "N other models", whose numbers
are those of all their rows together (requests summed, error % and percentiles over
the rows of every model in it).
"""

from __future__ import annotations

from typing import Any

from metergate.console.windows import Window
from metergate.metering.report import ERROR_OUTCOMES, REFUSED_OUTCOMES
from metergate.storage.database import Database


def _bucket(database: Database) -> str:
    """Index of a row's bucket; SQLite's CAST truncates, PostgreSQL's would round."""
    if database.dialect == "postgresql":
        return "CAST(FLOOR((ts - ?) / ?) AS BIGINT)"
    return "CAST((ts - ?) / ? AS INTEGER)"


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


MAX_SERIES = 10
Line = dict[str, list[float | None]]  # a model's (or the shared) line: metric -> buckets

_COUNTS_SQL = """WITH bucketed AS (
  SELECT {label} AS model, {bucket} AS bucket, outcome, duration_ms FROM requests
  WHERE ts >= ? AND ts < ?
), ranked AS (
  SELECT model, bucket, outcome, duration_ms,
    ROW_NUMBER() OVER (PARTITION BY model, bucket ORDER BY duration_ms) AS rn,
    COUNT(*) OVER (PARTITION BY model, bucket) AS n
  FROM bucketed
)
SELECT model, bucket, COUNT(*),
  SUM(CASE WHEN outcome IN ({errors}) THEN 1 ELSE 0 END),
  SUM(CASE WHEN outcome IN ({refused}) THEN 1 ELSE 0 END),
  MAX(CASE WHEN rn = (95 * n + 99) / 100 THEN duration_ms END)
FROM ranked GROUP BY model, bucket"""

_TTFT_SQL = """WITH bucketed AS (
  SELECT {label} AS model, {bucket} AS bucket, ttft_ms FROM requests
  WHERE ts >= ? AND ts < ? AND ttft_ms IS NOT NULL
), ranked AS (
  SELECT model, bucket, ttft_ms,
    ROW_NUMBER() OVER (PARTITION BY model, bucket ORDER BY ttft_ms) AS rn,
    COUNT(*) OVER (PARTITION BY model, bucket) AS n
  FROM bucketed
)
SELECT model, bucket, MAX(CASE WHEN rn = (95 * n + 99) / 100 THEN ttft_ms END)
FROM ranked GROUP BY model, bucket"""


async def model_series(database: Database, window: Window, now: float) -> dict[str, Any]:
    """`{"start", "step", "timestamps", "models": {model: {metric: [value | None]}}}`.

    Error % is of the requests the gateway tried to serve (refused ones left out, as in
    `metergate usage`); None where a bucket has nothing to measure, so charts show gaps.
    """
    start = now - window.seconds
    step = float(window.step)
    bucket = _bucket(database)
    label, label_params, group = await _labels(database, start, now)
    params = (*label_params, start, step, start, now)
    counts = await database.fetch(
        _COUNTS_SQL.format(
            label=label,
            bucket=bucket,
            errors=_quoted(ERROR_OUTCOMES),
            refused=_quoted(REFUSED_OUTCOMES),
        ),
        params,
    )
    ttfts = await database.fetch(_TTFT_SQL.format(label=label, bucket=bucket), params)
    size = window.buckets
    models: dict[str, Line] = {}

    def lines(model: str) -> Line:
        if model not in models:
            models[model] = empty_line(size)
        return models[model]

    for model, index, requests, errors, refused, p95 in counts:
        i = min(int(index), size - 1)  # a row at exactly `now` - epsilon rounding
        line = lines(str(model))
        served = int(requests) - int(refused or 0)
        line["requests_per_second"][i] = round(int(requests) / step, 6)
        line["error_percent"][i] = round(100 * int(errors or 0) / served, 3) if served else None
        line["p95_ms"][i] = None if p95 is None else round(float(p95), 3)
    for model, index, p95 in ttfts:
        i = min(int(index), size - 1)
        lines(str(model))["ttft_p95_ms"][i] = None if p95 is None else round(float(p95), 3)
    return {
        "start": start,
        "step": window.step,
        "timestamps": [start + i * window.step for i in range(size)],
        "models": shared_line_last(models, group),
    }


def empty_line(size: int) -> Line:
    """A line before its buckets are read: no requests, nothing measured."""
    return {
        "requests_per_second": [0.0] * size,
        "error_percent": [None] * size,
        "p95_ms": [None] * size,
        "ttft_p95_ms": [None] * size,
    }


def shared_line_last(lines: dict[str, Line], group: str) -> dict[str, Line]:
    """The models' lines by name, then the shared one (`group`, "" for none)."""
    ordered = dict(sorted((name, line) for name, line in lines.items() if name != group))
    if group in lines:
        ordered[group] = lines[group]
    return ordered


async def _labels(database: Database, start: float, end: float) -> tuple[str, tuple[str, ...], str]:
    """The SQL that names each row's line (with its parameters), and the shared line's
    name ("" when every model has its own line)."""
    rows = await database.fetch(
        "SELECT model, COUNT(*) FROM requests WHERE ts >= ? AND ts < ? GROUP BY model",
        (start, end),
    )
    if len(rows) <= MAX_SERIES:
        return "model", (), ""
    busiest = sorted(rows, key=lambda row: (-int(row[1]), str(row[0])))
    own = tuple(str(row[0]) for row in busiest[: MAX_SERIES - 1])
    group = f"{len(rows) - len(own)} other models"
    marks = ", ".join("?" for _ in own)
    return f"CASE WHEN model IN ({marks}) THEN model ELSE ? END", (*own, group), group
