"""A small asyncio HTTP/1.1 client that times what wrk cannot: when each byte of an answer
arrives. Used for time to first chunk, chunk pacing, many open streams, and for sending
a fixed list of requests (the /metrics label set) as fast as a few connections allow.

It is a protocol on the event loop (uvloop when installed) that hands bytes to httptools,
the parser uvicorn uses, and stamps every read with `time.perf_counter()` the moment the
loop delivers it. The same client measures the direct upstream and the gateways, so its
own cost cancels out of "gateway - direct".
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httptools

T = TypeVar("T")


@dataclass
class Exchange:
    """One request and its answer; times are seconds after the request was written."""

    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    first_event: float | None = None  # the first body bytes (a stream's first event)
    events: list[float] = field(default_factory=list)  # arrival of each complete SSE event
    done: float | None = None
    reads: int = 0  # body reads: 1 means the whole body came at once
    error: str | None = None
    started_at: float = 0.0  # perf_counter() when it was sent (absolute, for overlap)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current: Exchange | None = None
        self.finished: asyncio.Future[Exchange] | None = None
        self.now = 0.0
        self.lost = False
        self._pending_separators = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(f"malformed answer: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(f"connection closed: {exc}")

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self.current
        assert exchange is not None
        elapsed = self.now - exchange.started_at
        exchange.reads += 1
        tail = bytes(exchange.body[-1:])
        exchange.body += body
        if exchange.first_event is None:
            exchange.first_event = elapsed
        # Complete SSE events end with a blank line; count separators that arrived now.
        separators = (tail + body).count(b"\n\n")
        exchange.events.extend([elapsed] * separators)

    def on_message_complete(self) -> None:
        exchange = self.current
        assert exchange is not None
        exchange.done = self.now - exchange.started_at
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(exchange)

    def _fail(self, reason: str) -> None:
        if self.current is not None and self.current.done is None:
            self.current.error = reason
        if self.finished is not None and not self.finished.done():
            assert self.current is not None
            self.finished.set_result(self.current)

    async def exchange(self, request: bytes) -> Exchange:
        assert self.transport is not None
        if self.lost:
            return Exchange(error="connection closed before sending")
        self.current = Exchange()
        self.finished = asyncio.get_running_loop().create_future()
        self.current.started_at = time.perf_counter()
        self.transport.write(request)
        return await self.finished

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, host, port)
    return conn


def build_request(
    url: str, body: bytes, token: str, headers: Sequence[str] = ()
) -> tuple[str, int, bytes]:
    """(host, port, raw POST) of a JSON request with a bearer token, keep-alive, and
    `headers` ("Name: value") besides."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = "".join(f"{line}\r\n" for line in headers)
    raw = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return host, port, raw


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is, in the project's venv)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def sequential(
    url: str, body: bytes, token: str, count: int, headers: Sequence[str] = ()
) -> list[Exchange]:
    """`count` requests one after the other on one keep-alive connection."""
    host, port, raw = build_request(url, body, token, headers)
    conn = await connect(host, port)
    try:
        results = []
        for _ in range(count):
            results.append(await conn.exchange(raw))
            if conn.lost:
                conn = await connect(host, port)
        return results
    finally:
        conn.close()


async def concurrent(
    url: str,
    body: bytes,
    token: str,
    count: int,
    seconds: float,
    while_open: Callable[[], Awaitable[None]] | None = None,
    headers: Sequence[str] = (),
) -> list[Exchange]:
    """Open `count` connections, send one request on each at once, wait for every answer
    (at most `seconds`: the unfinished ones come back with an error).

    `while_open` runs alongside (e.g. sampling the gateway's memory) and is cancelled
    when the last answer ends.
    """
    host, port, raw = build_request(url, body, token, headers)
    conns: list[_Connection] = []
    for start in range(0, count, 200):  # in batches: stay under the listen backlog
        conns += await asyncio.gather(
            *(connect(host, port) for _ in range(start, min(count, start + 200)))
        )
    sampler = asyncio.ensure_future(while_open()) if while_open else None
    tasks = [asyncio.ensure_future(conn.exchange(raw)) for conn in conns]
    try:
        await asyncio.wait(tasks, timeout=seconds)
        results = []
        for task in tasks:
            if task.done():
                results.append(task.result())
            else:  # still streaming when time ran out: counted, not waited for
                task.cancel()
                results.append(Exchange(error=f"not finished after {seconds:.0f} s"))
        return results
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        for conn in conns:
            conn.close()


async def spray(host: str, port: int, requests: Sequence[bytes], connections: int) -> list[int]:
    """Send every request once over `connections` keep-alive connections; return statuses."""
    statuses: list[int] = [0] * len(requests)
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        conn = await connect(host, port)
        try:
            for index in next_index:
                answer = await conn.exchange(requests[index])
                statuses[index] = answer.status
                if conn.lost:
                    conn.close()
                    conn = await connect(host, port)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def peak_open(exchanges: Sequence[Exchange]) -> int:
    """The largest number of exchanges that were in flight at the same moment."""
    points: list[tuple[float, int]] = []
    for e in exchanges:
        if e.done is not None:
            points += [(e.started_at, 1), (e.started_at + e.done, -1)]
    open_now = peak = 0
    for _, step in sorted(points):
        open_now += step
        peak = max(peak, open_now)
    return peak


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
