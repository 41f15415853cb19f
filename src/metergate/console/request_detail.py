"""One request, opened from the console's Requests page: its ledger row (timings, cost,
tokens, team, tags) and, when the request log kept it, its record (headers and bodies,
redacted; every attempt with its timing and error; the trace id). Also the request log
as JSON Lines, for export.

A ledger row and its record are written by the same `Meter.finish` with the same finish
time, so the record is found by request id and that time, even when callers reuse ids.
"""

from __future__ import annotations

import re
import time
from typing import Any

from metergate.console.requests_log import COLUMNS, row_json
from metergate.errors import InvalidRequest, NotFound
from metergate.requestlog.store import open_store
from metergate.runtime import Runtime
from metergate.storage.database import Database

EXPORT_MAX = 100_000
_ROW_ID = re.compile(r"[0-9]{1,19}")
_ROW_ID_MAX = 2**63 - 1  # ids are 64-bit
# `since`: a whole number of minutes, hours or days; the OpenAPI document says the same.
SINCE = re.compile(r"[1-9][0-9]{0,5}[mhd]")
_UNITS = {"m": 60, "h": 3_600, "d": 86_400}


async def request_detail(runtime: Runtime, database: Database, row_id: str) -> dict[str, Any]:
    """The row with this id; an id that is no row's (not even a number) is a 404."""
    rows = []
    if _ROW_ID.fullmatch(row_id) and int(row_id) <= _ROW_ID_MAX:
        rows = await database.fetch(
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE id = ?", (int(row_id),)
        )
    if not rows:
        raise NotFound(f"no request with id {row_id!r} in the ledger", code="request_not_found")
    row = row_json(rows[0])
    settings = runtime.plan.config.request_log
    recorder = runtime.observers.recorder
    if recorder is not None:
        await recorder.flush()
    store = recorder.store if recorder is not None else open_store(settings, database)
    record = await store.find(row["request_id"], row["ts"])
    return {
        "request": row,
        "log": record,
        "request_log": {
            "enabled": settings.enabled,
            "capture": settings.capture,
            "store": settings.store,
        },
    }


async def export_records(
    runtime: Runtime, database: Database, start: float, end: float, limit: int
) -> bytes:
    """Request log records finished in `[start, end)`, oldest first, one JSON per line."""
    recorder = runtime.observers.recorder
    if recorder is not None:
        await recorder.flush()
    store = (
        recorder.store
        if recorder is not None
        else open_store(runtime.plan.config.request_log, database)
    )
    lines = await store.export(start, end, min(limit, EXPORT_MAX))
    return "".join(line + "\n" for line in lines).encode()


def export_period(since: str | None) -> tuple[float, float]:
    """`since`: 30m, 24h, 7d (default 24h), ending now."""
    text = since or "24h"
    if not SINCE.fullmatch(text):
        raise InvalidRequest(
            f"`since` takes a whole number (1-999999) and a unit: 30m, 24h, 7d (got {text!r})",
            param="since",
        )
    now = time.time()
    return now - int(text[:-1]) * _UNITS[text[-1]], now + 1
