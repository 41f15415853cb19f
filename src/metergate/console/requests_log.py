"""The latest ledger rows, filtered by key, model and outcome, as JSON or CSV.

Newest first, paged by id (`before`): ids only grow, so a page never shifts while new
requests arrive. CSV cells that a spreadsheet would run as a formula (`=`, `+`, `-`,
`@`, tab, CR first) are prefixed with `'`: `request_id` is whatever the caller sent.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from dataclasses import dataclass
from typing import Any

import orjson

from metergate.errors import InvalidRequest
from metergate.metering.metrics import OUTCOMES
from metergate.metering.report import csv_text
from metergate.storage.database import Database

COLUMNS = (
    "id",
    "ts",
    "request_id",
    "key_name",
    "model",
    "upstream",
    "attempts",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_nano",
    "saved_nano",
    "duration_ms",
    "ttft_ms",
    "outcome",
    "status",
    "cache_hit",
    "stream",
    "usage_estimated",
    "team",
    "tags",
)
PAGE_MAX = 1_000
CSV_MAX = 100_000
KEY_CHOICES_MAX = 1_000  # key names offered in the filter menu


@dataclass(frozen=True, slots=True)
class Filters:
    key: str | None = None
    model: str | None = None
    outcome: str | None = None
    team: str | None = None
    before: int | None = None
    limit: int = 100


FILTERS = ("key", "model", "team", "outcome", "before", "limit")
_INTEGER = re.compile(r"-?[0-9]+")
_ROW_ID_MAX = 2**63 - 1  # ids are 64-bit: a larger `before` means every row


def query_value(query: dict[str, list[str]], name: str) -> str | None:
    """A query parameter given at most once; empty is an error, not "left out"."""
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"`{name}` is given {len(values)} times; give it once", param=name)
    if values[0] == "":
        raise InvalidRequest(f"`{name}` is empty; give a value or leave it out", param=name)
    return values[0]


def check_query(query: dict[str, list[str]], known: tuple[str, ...]) -> None:
    """Refuse query parameters the endpoint does not take (a typo would be ignored)."""
    unknown = sorted(name for name in query if name not in known)
    if unknown:
        takes = ", ".join(known) or "no parameters"
        raise InvalidRequest(
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this takes: {takes}",
            param=unknown[0],
        )


def int_value(query: dict[str, list[str]], name: str, low: int, high: int | None) -> int | None:
    raw = query_value(query, name)
    if raw is None:
        return None
    if not _INTEGER.fullmatch(raw):
        raise InvalidRequest(f"`{name}` must be an integer", param=name)
    # Far beyond any bound, a number's digits need not be read (nor its size limit met).
    value = int(raw) if len(raw) <= 40 else -(10**40) if raw[0] == "-" else 10**40
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequest(f"`{name}` must be {bound}", param=name)
    return value


def parse_filters(query: dict[str, list[str]], default: int, most: int) -> Filters:
    check_query(query, FILTERS)
    outcome = query_value(query, "outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidRequest(
            f"unknown outcome {outcome!r}; one of: {', '.join(OUTCOMES)}", param="outcome"
        )
    before = int_value(query, "before", 1, None)
    return Filters(
        key=query_value(query, "key"),
        model=query_value(query, "model"),
        outcome=outcome,
        team=query_value(query, "team"),
        before=None if before is None else min(before, _ROW_ID_MAX),
        limit=int_value(query, "limit", 1, most) or default,
    )


async def latest(database: Database, filters: Filters) -> list[dict[str, Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("key_name", filters.key),
        ("model", filters.model),
        ("outcome", filters.outcome),
        ("team", filters.team),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if filters.before is not None:
        where.append("id < ?")
        params.append(filters.before)
    sql = f"SELECT {', '.join(COLUMNS)} FROM requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = await database.fetch(f"{sql} ORDER BY id DESC LIMIT ?", (*params, filters.limit))
    return [row_json(row) for row in rows]


def row_json(row: tuple[Any, ...]) -> dict[str, Any]:
    item = dict(zip(COLUMNS, row, strict=True))
    for name in ("cost_nano", "saved_nano", "id"):
        item[name] = int(item[name])  # PostgreSQL BIGINT sums come back as Decimal
    item["cache_hit"] = bool(item["cache_hit"])
    item["stream"] = bool(item["stream"])
    item["usage_estimated"] = bool(item["usage_estimated"])
    item["tags"] = orjson.loads(item["tags"]) if item["tags"] else {}
    return item


async def filter_choices(database: Database, models: list[str]) -> dict[str, Any]:
    """What the filter menus offer: key names (the first KEY_CHOICES_MAX; `keys_complete`
    false when there are more, and the console asks for a name instead), models, and
    every outcome."""
    keys = await database.fetch(
        "SELECT DISTINCT name FROM keys ORDER BY name LIMIT ?", (KEY_CHOICES_MAX + 1,)
    )
    return {
        "keys": [k for (k,) in keys[:KEY_CHOICES_MAX]],
        "keys_complete": len(keys) <= KEY_CHOICES_MAX,
        "models": models,
        "outcomes": list(OUTCOMES),
    }


def _cell(value: Any) -> Any:
    if isinstance(value, dict):  # tags
        value = ",".join(f"{k}={v}" for k, v in value.items())
    return csv_text(value) if isinstance(value, str) else value


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    """One header line, then one line per row; `time` is ISO 8601 UTC, cost also in USD."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["time", *COLUMNS, "cost_usd"])
    for row in rows:
        when = dt.datetime.fromtimestamp(row["ts"], dt.UTC).isoformat(timespec="milliseconds")
        writer.writerow(
            [
                when.replace("+00:00", "Z"),
                *(_cell(row[c]) for c in COLUMNS),
                f"{row['cost_nano'] / 1e9:.9f}",
            ]
        )
    return out.getvalue().encode()
