"""What the hot path's small optimisations buy, each timed alone (ns per request).

Each pair is the code before and after one change, run on uvloop in this process:

- request id: `"req_" + secrets.token_hex(12)` (a getrandom system call per request)
  against a per-process random prefix plus a counter (metergate.asgi._ids);
- pool checkout: `asyncio.wait_for(semaphore.acquire(), timeout)` (wait_for wraps the
  coroutine in a task) against a plain `await semaphore.acquire()` when a slot is free
  (metergate.providers.h1.HttpClient._checkout);
- a deadline around a read that is already complete: `async with asyncio.timeout(...)`,
  as `h1.HttpClient.post` does for the total deadline, against no context manager.

Best of `rounds` timings of `count` iterations, so machine noise inflates nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator

from benchlib import probe


def _best(rounds: int, count: int, once: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(count):
            once()
        best = min(best, (time.perf_counter_ns() - started) / count)
    return best


async def _best_async(rounds: int, count: int, once: Callable[[], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(count):
            await once()
        best = min(best, (time.perf_counter_ns() - started) / count)
    return best


def _counter_ids() -> Iterator[str]:
    prefix = "req_" + secrets.token_hex(6)
    for number in itertools.count(1):
        yield f"{prefix}{number:012x}"


async def _async_pairs(rounds: int, count: int) -> list[tuple[str, float, float]]:
    semaphore = asyncio.Semaphore(256)

    async def with_wait_for() -> None:
        await asyncio.wait_for(semaphore.acquire(), 5)
        semaphore.release()

    async def plain() -> None:
        await semaphore.acquire()
        semaphore.release()

    loop = asyncio.get_running_loop()

    async def with_timeout() -> None:
        done = loop.create_future()
        done.set_result(None)
        async with asyncio.timeout(600):
            await done

    async def without_timeout() -> None:
        done = loop.create_future()
        done.set_result(None)
        await done

    return [
        (
            "pool checkout: wait_for(acquire()) vs acquire()",
            await _best_async(rounds, count, with_wait_for),
            await _best_async(rounds, count, plain),
        ),
        (
            "asyncio.timeout() around a done future vs none",
            await _best_async(rounds, count, with_timeout),
            await _best_async(rounds, count, without_timeout),
        ),
    ]


def run(rounds: int = 5, count: int = 20_000) -> list[tuple[str, float, float]]:
    """(what, ns before, ns after) per pair."""
    ids = _counter_ids()
    pairs = [
        (
            "request id: token_hex(12) vs prefix + counter",
            _best(rounds, count, lambda: "req_" + secrets.token_hex(12)),
            _best(rounds, count, lambda: next(ids)),
        )
    ]
    return pairs + probe.run(_async_pairs(rounds, count))
