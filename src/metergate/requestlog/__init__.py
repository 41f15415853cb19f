"""The opt-in request log (`request_log:`): what was sent and answered, kept for a while.

Per request, the hot path decides only whether to keep the answer's body (`wants`: all
requests, only failed ones, or a sample) and, when it ends, puts its `RequestLog` in a
bounded queue (`finish`). A background task takes the queue in batches, builds each
record in a worker thread (redaction, JSON encoding, size caps: `record`), writes them
to the ledger database or JSONL files (`store`), and deletes what is older than the
retention period. A full queue or a store that keeps failing drops records, counted in
`metergate_request_log_records_total{result="dropped"}`; requests never wait for it.

The queue is full at `max_pending` records or at `max_pending_mb` of the bodies they
hold, whichever comes first: while a store stalls (a frozen database host) big requests
would otherwise pile up in memory for as long as it does. A lone record is always
taken, however big, so a large request is never refused a record by the bound alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any

from metergate.config.observe import RequestLogConfig
from metergate.metering.meter import RequestLog
from metergate.metering.metrics import Metrics
from metergate.requestlog.record import Pending, build
from metergate.requestlog.redact import Redactor
from metergate.requestlog.store import Store, open_store
from metergate.storage.database import Database

log = logging.getLogger("metergate.requestlog")

_BATCH = 200
_FLUSH_SECONDS = 0.5
_PURGE_EVERY = 3600.0
_WRITE_TRIES = 3


class RequestRecorder:
    def __init__(
        self, config: RequestLogConfig, metrics: Metrics, database: Database | None
    ) -> None:
        self.config = config
        self.store: Store = open_store(config, database)
        self.redactor = Redactor(config.redact)
        self._queue: deque[Pending] = deque()
        self._held = 0  # bytes of the bodies the queued records hold
        self._max_held = int(config.max_pending_mb * 1024 * 1024)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._written = metrics.request_log_records.labels("written")
        self._dropped = metrics.request_log_records.labels("dropped")
        self._sample = config.sample_rate if config.capture == "sample" else 1.0
        self._errors_only = config.capture == "errors"

    def wants(self) -> bool:
        """Whether a request that just arrived keeps its answer's body for the log."""
        return self._sample >= 1.0 or random.random() < self._sample

    def finish(self, record: RequestLog, ts: float, duration: float, tags: dict[str, str]) -> None:
        if not record.capture or (self._errors_only and record.outcome == "success"):
            return
        size = record.body_bytes + len(record.response or b"")
        if self._queue and (
            len(self._queue) >= self.config.max_pending or self._held + size > self._max_held
        ):
            self._dropped.inc()
            return
        self._queue.append(Pending(record, ts, duration, tags, size))
        self._held += size
        if len(self._queue) >= _BATCH:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request-log")

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None

    async def flush(self) -> None:
        """Write every queued record now (tests, the console's fresh view)."""
        while self._queue:
            await self._write_batch()

    async def _run(self) -> None:
        next_purge = 0.0  # at start, then hourly
        while not self._closing:
            try:
                await self.flush()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + _PURGE_EVERY
                    cutoff = time.time() - self.config.retention_days * 86_400
                    removed = await self.store.purge(cutoff)
                    if removed:
                        log.info(
                            "request log: %d %s past retention removed", removed, self.store.purges
                        )
            except Exception:
                log.exception("request log writer failed; retrying")
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _FLUSH_SECONDS)
            self._wake.clear()
        await self.flush()

    async def _write_batch(self) -> None:
        items = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
        self._held -= sum(item.size for item in items)
        cap = self.config.max_body_bytes
        rows = await asyncio.to_thread(_build_all, items, self.redactor, cap)
        if not rows:
            return
        for attempt in range(_WRITE_TRIES):
            try:
                await self.store.write(rows)
            except Exception:
                if attempt == _WRITE_TRIES - 1:
                    log.exception("request log: %d records could not be written", len(rows))
                    self._dropped.inc(len(rows))
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
            else:
                self._written.inc(len(rows))
                return


def _build_all(items: list[Pending], redactor: Redactor, cap: int) -> list[tuple[Any, ...]]:
    rows = []
    for item in items:
        try:
            rows.append(build(item, redactor, cap))
        except Exception:  # one odd request must not lose the batch
            log.exception("request log: could not build the record of %s", item.log.request_id)
    return rows
