"""Timings taken in several spawned processes let go at one instant (a barrier), so that
they overlap for the whole of their loops, however long each takes to start."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
from collections.abc import Callable, Sequence
from typing import Any


def slowest_at_once(function: Callable[..., float], argsets: Sequence[tuple[Any, ...]]) -> float:
    """`function(*args, start=barrier)` in a spawned process per `args` (as uvicorn starts
    its workers); it waits on the barrier before it starts its clock. The slowest time."""
    spawn = multiprocessing.get_context("spawn")
    start, times = spawn.Barrier(len(argsets)), spawn.Queue()
    processes = [
        spawn.Process(target=_timed, args=(function, times, start, *args)) for args in argsets
    ]
    for process in processes:
        process.start()
    slowest = max(times.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(30)
    return float(slowest)


def _timed(
    function: Callable[..., float],
    times: multiprocessing.queues.Queue[float],
    start: multiprocessing.synchronize.Barrier,
    *args: Any,
) -> None:
    times.put(function(*args, start=start))
