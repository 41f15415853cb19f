"""Where request log records live: the ledger database, or rotated JSONL files.

Both keep one JSON object per request and answer the same questions: write a batch,
find one request (by request id and finish time, as its ledger row has them), list a
period for export, and forget what is past the retention period.

JSONL: each process writes its own file (`requests-<start>-<pid>.jsonl`, so workers
never interleave lines) and starts a new one past `max_file_bytes`; retention deletes
files whose last record is older than the period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson

from metergate.config.observe import RequestLogConfig
from metergate.storage.database import Database

Row = tuple[Any, ...]  # (ts, request_id, key_name, outcome, record JSON)
log = logging.getLogger("metergate.requestlog")
_INSERT = (
    "INSERT INTO request_log (ts, request_id, key_name, outcome, record) VALUES (?, ?, ?, ?, ?)"
)


class Store(Protocol):
    purges: str  # what `purge` counts: "records", or "files" of them

    async def write(self, rows: Sequence[Row]) -> None: ...

    async def find(self, request_id: str, ts: float | None) -> dict[str, Any] | None: ...

    async def export(self, start: float, end: float, limit: int) -> list[str]: ...

    async def purge(self, before: float) -> int: ...


class LedgerStore:
    purges = "records"

    def __init__(self, database: Database) -> None:
        self.database = database

    async def write(self, rows: Sequence[Row]) -> None:
        await self.database.executemany(_INSERT, rows)

    async def find(self, request_id: str, ts: float | None) -> dict[str, Any] | None:
        if ts is None:
            sql = "SELECT record FROM request_log WHERE request_id = ? ORDER BY ts DESC LIMIT 1"
            rows = await self.database.fetch(sql, (request_id,))
        else:
            sql = "SELECT record FROM request_log WHERE request_id = ? AND ts = ? LIMIT 1"
            rows = await self.database.fetch(sql, (request_id, ts))
        return orjson.loads(rows[0][0]) if rows else None

    async def export(self, start: float, end: float, limit: int) -> list[str]:
        rows = await self.database.fetch(
            "SELECT record FROM request_log WHERE ts >= ? AND ts < ? ORDER BY ts LIMIT ?",
            (start, end, limit),
        )
        return [record for (record,) in rows]

    async def purge(self, before: float) -> int:
        old = await self.database.fetch("SELECT COUNT(*) FROM request_log WHERE ts < ?", (before,))
        if old[0][0]:
            await self.database.execute("DELETE FROM request_log WHERE ts < ?", (before,))
        return int(old[0][0])


class JsonlStore:
    purges = "files"

    def __init__(self, directory: str, max_file_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_file_bytes = max_file_bytes
        self._current: Path | None = None
        self._size = 0

    def _new_file(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        unique = f"{os.getpid()}-{time.time_ns() % 10**6:06d}"
        return self.directory / f"requests-{stamp}-{unique}.jsonl"

    def _append(self, rows: Sequence[Row]) -> None:
        """Append the records, starting a new file before one would pass the size limit;
        all of them or none: a write that fails (a full disk) is cut back off, since half
        a line would swallow the next record appended after it."""
        current, size = self._current, self._size
        if current is None or not current.exists():
            current, size = self._new_file(), 0
        touched = [(current, size)]  # each file written to, and its size before
        out = current.open("ab")
        try:
            for row in rows:
                line = row[4].encode() + b"\n"
                if size and size + len(line) > self.max_file_bytes:
                    out.close()
                    current, size = self._new_file(), 0
                    touched.append((current, 0))
                    out = current.open("ab")
                out.write(line)
                size += len(line)
            out.close()
        except BaseException:
            with contextlib.suppress(OSError):
                out.close()  # (what it still held is cut off next)
            for path, before in touched:
                with contextlib.suppress(OSError):
                    os.truncate(path, before)
            raise
        self._current, self._size = current, size

    async def write(self, rows: Sequence[Row]) -> None:
        await asyncio.to_thread(self._append, rows)

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("requests-*.jsonl"), reverse=True)

    def _find(self, request_id: str, ts: float | None) -> dict[str, Any] | None:
        needle = orjson.dumps(request_id)
        best: dict[str, Any] | None = None
        for path in self._files():
            for _, record in _records(path, needle):
                if record.get("request_id") != request_id:
                    continue
                if (ts is None or record.get("ts") == ts) and (
                    best is None or _ts(record) > _ts(best)
                ):
                    best = record
            if best is not None and ts is not None:
                return best
        return best

    async def find(self, request_id: str, ts: float | None) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._find, request_id, ts)

    def _export(self, start: float, end: float, limit: int) -> list[str]:
        found: list[tuple[float, str]] = []
        for path in self._files():
            for line, record in _records(path):
                if start <= _ts(record) < end:
                    found.append((_ts(record), line.decode().rstrip("\n")))
        found.sort()
        return [line for _, line in found[:limit]]

    async def export(self, start: float, end: float, limit: int) -> list[str]:
        return await asyncio.to_thread(self._export, start, end, limit)

    def _purge(self, before: float) -> int:
        removed = 0
        for path in self._files():
            if path != self._current and path.stat().st_mtime < before:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    async def purge(self, before: float) -> int:
        return await asyncio.to_thread(self._purge, before)


def _records(path: Path, needle: bytes = b"") -> Iterator[tuple[bytes, dict[str, Any]]]:
    """The lines of a JSONL file holding `needle` that are records, each with its record.

    A line that is not one is skipped and counted in a warning: what a process killed
    while appending (or a full disk) leaves, a line cut short, must not make the whole
    log unreadable, or the records after it in the file."""
    torn = 0
    with path.open("rb") as lines:
        for line in lines:
            if needle not in line:
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if type(record) is dict:
                yield line, record
            else:
                torn += 1
    if torn:
        log.warning("request log: %d line(s) of %s are not whole records; skipped", torn, path)


def _ts(record: dict[str, Any]) -> float:
    """A record's finish time (0 if a hand-edited line lacks one, or it is not a number)."""
    ts = record.get("ts")
    return float(ts) if isinstance(ts, int | float) else 0.0


def open_store(config: RequestLogConfig, database: Database | None) -> Store:
    if config.store == "jsonl":
        return JsonlStore(config.directory, config.max_file_bytes)
    assert database is not None, "the ledger store needs the ledger database"
    return LedgerStore(database)
