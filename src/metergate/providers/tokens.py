"""Short-lived credentials (Entra and Google access tokens, AWS role credentials) kept
fresh off the request path.

A request reads the cached value: one clock comparison. Some minutes before the value
expires, the first request to notice starts one background refresh and goes on with the
still-valid value; only when nothing valid is left (at start, or after the source failed
for a while) do requests wait, all of them on that one fetch. A failed fetch is remembered
for a second so that a dead token endpoint is not hammered by every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("metergate.providers")

REFRESH_AHEAD = 300.0  # seconds before expiry that a refresh starts (at most half the lifetime)
SAFETY = 30.0  # seconds before expiry that a value stops being used (at most a tenth)
RETRY_AFTER_FAILURE = 1.0

# A fetch returns the value and how many seconds it stays valid (None: it never expires).
Fetch = Callable[[], Awaitable[tuple[T, float | None]]]


class Refreshing(Generic[T]):
    """One credential, fetched by `fetch` at most once at a time."""

    def __init__(self, fetch: Fetch[T], what: str) -> None:
        self._fetch = fetch
        self.what = what
        # told every new value (its adapter hides it from upstream text)
        self.fetched: Callable[[T], None] | None = None
        self._value: T | None = None
        self._refresh_at = 0.0  # monotonic times
        self._expires_at = 0.0
        self._task: asyncio.Task[T] | None = None
        self._failure: BaseException | None = None
        self._failed_until = 0.0
        self.fetches = 0

    async def get(self) -> T:
        now = time.monotonic()
        value = self._value
        if value is not None and now < self._refresh_at:
            return value
        if value is not None and now < self._expires_at:
            self._start()  # still valid: refresh behind the request
            return value
        if self._failure is not None and now < self._failed_until:
            raise self._failure
        return await asyncio.shield(self._start())

    def close(self) -> None:
        """Stop a refresh in progress (the adapter is being closed)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _start(self) -> asyncio.Task[T]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh())
            self._task.add_done_callback(_retrieve)
        return self._task

    async def _refresh(self) -> T:
        self.fetches += 1
        try:
            value, lifetime = await self._fetch()
        except Exception as exc:
            self._failure = exc
            self._failed_until = time.monotonic() + RETRY_AFTER_FAILURE
            if self._value is not None and time.monotonic() < self._expires_at:
                log.warning(
                    "refreshing %s failed (the current one is still valid): %s", self.what, exc
                )
            raise
        now = time.monotonic()
        self._value, self._failure = value, None
        if self.fetched is not None:
            self.fetched(value)
        if lifetime is None:
            self._refresh_at = self._expires_at = float("inf")
        else:
            self._refresh_at = now + lifetime - min(REFRESH_AHEAD, lifetime / 2)
            self._expires_at = now + lifetime - min(SAFETY, lifetime / 10)
        return value


def _retrieve(task: asyncio.Task[T]) -> None:
    """A background refresh nobody awaited must not log 'exception never retrieved'."""
    if not task.cancelled():
        task.exception()
