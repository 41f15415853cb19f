"""The usage ledger writer: rows are queued on the hot path and group-committed off it.

`append` only puts a tuple in a list. A background task commits the list in one
transaction every `flush_seconds` (or sooner once `batch_rows` are waiting). Shutdown
flushes everything; a SIGKILL loses at most the rows of one window, which
`tests/test_ledger_durability.py` measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import NamedTuple

from metergate.storage.database import Database

log = logging.getLogger("metergate.ledger")


class LedgerRow(NamedTuple):
    """One request as the ledger stores it (a tuple: inserted without conversion)."""

    ts: float
    request_id: str
    key_name: str
    model: str
    upstream: str
    attempts: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nano: int
    saved_nano: int
    duration_ms: float
    ttft_ms: float | None
    outcome: str
    status: int
    cache_hit: int  # 0/1: INTEGER in both SQLite and PostgreSQL
    stream: int
    usage_estimated: int = 0  # 1: the tokens are the gateway's bound, not the upstream's count


COLUMNS = LedgerRow._fields
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


class LedgerWriter:
    def __init__(
        self,
        database: Database,
        *,
        flush_seconds: float = 0.2,
        batch_rows: int = 1000,
        on_pending: Callable[[int], None] | None = None,
    ) -> None:
        self.database = database
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self._pending: list[LedgerRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._on_pending = on_pending or (lambda n: None)
        self.committed = 0

    def append(self, row: LedgerRow) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.batch_rows:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Let the background task finish its commit, then commit every row still pending.

        The task is not cancelled: a commit cut off mid-way could be applied by the
        database yet look failed here, and be written twice.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self._pending:
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self.database.executemany(_INSERT, batch)
        except Exception:
            # Keep the rows: they go back in front of newer ones and are retried.
            self._pending[:0] = batch
            raise
        self.committed += len(batch)
        self._on_pending(len(self._pending))

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_seconds)
            self._wake.clear()
            self._on_pending(len(self._pending))
            try:
                await self.flush()
            except Exception:
                log.exception("ledger commit failed; %d rows kept for retry", self.pending)
                await asyncio.sleep(min(5.0, self.flush_seconds * 10))
