"""The link to Redis: one connection pool, its health, and this process's liveness.

Redis calls sit on the hot path, so they use short socket timeouts and no client-side
retries (a retried script could hold a budget twice). Any failed call marks the link
down at once: callers fall back to this process's counters or refuse, per
`redis.on_failure`. A background task then reconnects with backoff and runs the
recovery hook (re-seed budgets from the ledger, re-assert this process's holds) before
marking the link up again, so no request sees a half-recovered state. Every transition
is logged and exported as `metergate_redis_up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from metergate.config.model import RedisConfig
from metergate.config.secrets import without_password
from metergate.metering.metrics import Metrics
from metergate.shared import scripts
from metergate.shared.errors import Unavailable
from metergate.shared.pipe import Command, RedisPipe, Settings

log = logging.getLogger("metergate.redis")
T = TypeVar("T")
# queued for the next batch: the command, its script if it runs one, whether it may go
# only while the link is up (all but the recovery's own), who waits for the reply
Call = tuple[Command, AsyncScript | None, bool, "asyncio.Future[Any]"]

# What "Redis is unreachable" looks like: refused or reset connections, timeouts, a
# server still loading or out of memory. All of them degrade; none become a 500.
ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)


class RedisLink:
    heartbeat_seconds = 2.0
    liveness_ttl_ms = 10_000  # a crashed process's holds stop counting after this
    backoff_first, backoff_max = 0.05, 2.0

    def __init__(self, config: RedisConfig, metrics: Metrics) -> None:
        self.config = config
        self.prefix = config.key_prefix
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.live_prefix = f"{self.prefix}live:"
        self.fence_key = f"{self.prefix}fence:{self.holder}"
        self._numbers = itertools.count(1)
        self.last_number = 0  # of the calls numbered so far (`number`)
        self.where = without_password(config.url)
        pool = BlockingConnectionPool.from_url(
            config.url,
            max_connections=64,
            timeout=config.timeout_seconds,  # waiting for a free connection
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )
        self.client = Redis(connection_pool=pool)
        self._pipe_settings = Settings.of(pool, config.timeout_seconds)
        self._pipe: RedisPipe | None = None  # the sender's own connection (`shared.pipe`)
        self.admit = self.client.register_script(scripts.ADMIT)
        self.settle = self.client.register_script(scripts.SETTLE)
        self.sync = self.client.register_script(scripts.SYNC)
        self.held = self.client.register_script(scripts.HELD)
        self.fence = self.client.register_script(scripts.FENCE)
        self._heartbeat = self.client.register_script(scripts.HEARTBEAT)
        self.up = False
        self.on_recover: Callable[[], Awaitable[None]] | None = None
        self._gauge = metrics.redis_up()
        self._gauge.set(0)
        self._down_since = time.monotonic()
        self._queue: list[Call] = []
        self._sender: asyncio.Task[None] | None = None
        self._calls = 0  # commands in flight
        self._idle = asyncio.Event()  # set while none is
        self._idle.set()
        self._reconnecting: asyncio.Task[None] | None = None
        self._beating: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def live_key(self) -> str:
        return self.live_prefix + self.holder

    async def start(self) -> None:
        """Connect and recover; a Redis that is down at start only degrades the gateway."""
        try:
            await self._recover()
        except Exception as error:  # unreachable, or seeding failed: recover later
            self.mark_down(error)
        else:
            self._mark_up(first=True)
        self._beating = asyncio.create_task(self._beat(), name="redis-heartbeat")

    def number(self) -> int:
        """The next number of a fenced call (`scripts`: ADMIT, SETTLE), in sending order:
        take it right before `submit`, with no await between."""
        self.last_number = next(self._numbers)
        return self.last_number

    async def call(
        self, script: AsyncScript, keys: list[str], args: list[Any], recovery: bool = False
    ) -> Any:
        """Run a script; any failure marks the link down and raises `Unavailable`."""
        return await self.submit(script, keys, args, recovery)

    def submit(
        self, script: AsyncScript, keys: list[str], args: list[Any], recovery: bool = False
    ) -> asyncio.Future[Any]:
        """Queue a script call; calls queued while a round trip is in flight go together
        in the next batch (each script is still atomic on its own), sent on a connection
        of its own (`shared.pipe`: ~45 us of CPU for a lone call, ~5 us per call in a
        batch, where redis-py's pipeline took ~100 and ~25). While the link is down only
        `recovery` calls go out: the rest fail unsent, so that every call of an up
        period goes on its one connection, in order (the fence relies on it)."""
        command = (b"EVALSHA", script.sha, len(keys), *keys, *args)
        return self._enqueue(command, script, not recovery)

    def send(self, *command: str | bytes | int | float) -> asyncio.Future[Any]:
        """Queue a plain command (the shared cache's GET and SET) for the next batch."""
        return self._enqueue(command, None, True)

    def _enqueue(
        self, command: Command, script: AsyncScript | None, needs_up: bool
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, script, needs_up, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="redis-sender")
        return future

    async def _send(self) -> None:
        await asyncio.sleep(0)  # one loop turn: handlers ready now join this round trip
        while self._queue:
            batch, self._queue = self._queue, []
            if not self.up:  # down, recovering: only the recovery's calls go out
                batch = _recovery_calls(batch)
                if not batch:
                    continue
            try:
                replies = await self.run(self._batch(batch))
            except Unavailable as error:  # sent (or not): the outcome is unknown
                error.uncertain = True
                replies = [error] * len(batch)
            for (*_, future), reply in zip(batch, replies, strict=True):
                if future.done():  # the caller was cancelled (it handles that itself)
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(_unavailable(self, reply))
                else:
                    future.set_result(reply)

    async def _batch(self, batch: list[Call]) -> list[Any]:
        pipe = self._pipe
        if pipe is None or pipe.closed:
            pipe = self._pipe = await RedisPipe.open(self._pipe_settings)
        commands = [command for command, *_ in batch]
        replies = await pipe.execute(commands)
        missing = [i for i, reply in enumerate(replies) if _no_script(reply)]
        if missing:  # a restarted Redis forgot the scripts: load them, run those again
            for script in {batch[i][1] for i in missing}:
                if script is not None:
                    await self.client.script_load(script.script)
            again = await pipe.execute([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def _drop_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    async def run(self, command: Awaitable[T]) -> T:
        """Await one Redis command; any failure marks the link down, raises `Unavailable`."""
        self._calls += 1
        self._idle.clear()
        try:
            return await command
        except ERRORS as error:
            self.mark_down(error)
            raise Unavailable(f"{type(error).__name__}: {error}") from error
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    def mark_down(self, error: BaseException) -> None:
        if self._closed or (self._reconnecting is not None and not self._reconnecting.done()):
            return  # closing, or already down and reconnecting
        was_up, self.up = self.up, False
        self._gauge.set(0)
        if was_up:
            self._down_since = time.monotonic()
        degraded = (
            "budgets and rate limits now count in this process only, the cache is local"
            if self.config.on_failure == "open"
            else "requests under budgets or rate limits are refused (503) until it returns"
        )
        log.warning(
            "redis at %s unreachable (%s: %s); on_failure=%s: %s",
            self.where,
            type(error).__name__,
            error or "no answer",
            self.config.on_failure,
            degraded,
        )
        self._reconnecting = asyncio.create_task(self._reconnect(), name="redis-reconnect")

    def _mark_up(self, first: bool = False) -> None:
        self.up = True
        self._gauge.set(1)
        if first:
            log.info(
                "shared state in redis at %s (this process holds as %s)", self.where, self.holder
            )
        else:
            log.warning(
                "redis at %s reachable again after %.1f s; shared budgets (re-seeded from "
                "the ledger), rate limits and cache resumed",
                self.where,
                time.monotonic() - self._down_since,
            )

    async def _reconnect(self) -> None:
        """Retry with exponential backoff and jitter until Redis answers and recovery ran."""
        delay = self.backoff_first
        while True:
            await self.client.connection_pool.disconnect()  # drop connections to the old server
            self._drop_pipe()
            try:
                await self._recover()
            except Exception as error:  # Redis still down, or the ledger for re-seeding
                log.debug("redis recovery failed (%s); next try in %.2f s", error, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.backoff_max)
                continue
            self._mark_up()
            return

    async def _recover(self) -> None:
        # Let calls sent before the outage finish (each within the socket timeout), so
        # the holds re-asserted below are not changed by a late one behind our back.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 2 * self.config.timeout_seconds + 1)
        await self._heartbeat(keys=[self.live_key], args=[self.liveness_ttl_ms])
        if self.on_recover is not None:
            await self.on_recover()

    async def _beat(self) -> None:
        """Keep this process's liveness key alive; notice an outage even when idle."""
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            if not self.up:
                continue
            try:
                existed = await self._heartbeat(keys=[self.live_key], args=[self.liveness_ttl_ms])
            except ERRORS as error:
                self.mark_down(error)
                continue
            if not existed:  # lapsed: others may have dropped our holds; re-assert them
                self.mark_down(TimeoutError("liveness key had expired"))

    async def close(self) -> None:
        self._closed = True
        for task in (self._beating, self._reconnecting, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for *_, future in self._queue:
            if not future.done():
                future.set_exception(Unavailable("the redis link is closing"))
        self._queue = []
        if self.up:
            with contextlib.suppress(*ERRORS):
                await self.client.delete(self.live_key)  # our holds stop counting now
        self.up = False
        self._drop_pipe()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


def _unavailable(link: RedisLink, error: Exception) -> Unavailable:
    """A failed call: connection trouble (already reported) or an error reply, such as
    Redis refusing writes when out of memory, which degrades the link just the same."""
    if not isinstance(error, Unavailable):
        link.mark_down(error)
        return Unavailable(f"{type(error).__name__}: {error}")
    return error


def _recovery_calls(batch: list[Call]) -> list[Call]:
    """The recovery's calls of `batch`; the others fail unsent (the link is down)."""
    kept = []
    for call in batch:
        future = call[3]
        if not call[2]:
            kept.append(call)
        elif not future.done():
            future.set_exception(Unavailable("redis is unreachable; the call was not sent"))
    return kept


def _no_script(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")
