"""Stored responses the database refused while unreachable, saved again once it answers.

A response answered during a ledger outage has an id its caller will use: without this,
a later `previous_response_id` or GET would find nothing. Refused saves wait in memory,
oldest first, up to `max_bytes` (beyond that the oldest are dropped, and logged), and one
task writes them in order once the database answers. A save is idempotent (`ON CONFLICT
DO NOTHING`), so one written twice across a lost answer is harmless. At shutdown they
get one last try; unlike ledger rows they are not spooled to disk: losing one breaks a
conversation, not an account.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, NamedTuple

import orjson

from metergate.storage.database import unreachable
from metergate.storage.responses import ResponseStore

log = logging.getLogger("metergate.responses")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
RETRY_SECONDS = 1.0


class Save(NamedTuple):
    """The arguments of one `ResponseStore.save`."""

    key_id: str
    response: dict[str, Any]
    items: list[Any]
    previous_id: str | None
    now: float
    retention_seconds: float


class RetriedSaves:
    def __init__(self, store: ResponseStore, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self._waiting: deque[tuple[Save, int]] = deque()
        self._bytes = 0
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    async def save(self, save: Save) -> None:
        """Save now; when the database does not answer, keep it to save again. Any other
        failure is logged, not raised: the answer was paid for and goes out regardless."""
        try:
            await self.store.save(*save)
        except Exception as error:
            if not unreachable(error):
                log.exception("could not store response %s", save.response.get("id"))
                return
            log.warning(
                "ledger unreachable: response %s kept to store later", save.response.get("id")
            )
            self._add(save, len(orjson.dumps(save.response)) + len(orjson.dumps(save.items)))

    def _add(self, save: Save, size: int) -> None:
        self._waiting.append((save, size))
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._waiting) > 1:
            dropped, dropped_size = self._waiting.popleft()
            self._bytes -= dropped_size
            log.error(
                "response %s not stored: more than %d bytes of responses wait for the ledger",
                dropped.response.get("id"),
                self.max_bytes,
            )
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry(), name="responses-retry")

    async def _retry(self) -> None:
        while self._waiting:
            await asyncio.sleep(RETRY_SECONDS)
            await self._write_waiting()

    async def _write_waiting(self) -> None:
        """Write what waits, oldest first; stop at the first refusal (the database is
        still away) and leave the rest in order."""
        while self._waiting:
            save, size = self._waiting[0]
            try:
                await self.store.save(*save)
            except Exception as error:
                if unreachable(error):
                    return
                log.exception("could not store response %s", save.response.get("id"))
            self._waiting.popleft()
            self._bytes -= size

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._write_waiting()
        if self._waiting:
            log.error("%d stored responses lost: the ledger is unreachable", len(self._waiting))
