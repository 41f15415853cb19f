"""A small keep-alive HTTP/1.1 client for the hot path: pooled connections to one origin.

Why not aiohttp: measured on this path (bench/stack/results.md), aiohttp's request
machinery costs ~100 µs of CPU per request more than a protocol that hands bytes to
httptools (the same C parser uvicorn uses), which is most of the gateway's budget. This
client does only what the gateway needs: POST a prebuilt request to one origin over
HTTP/1.1 with or without TLS, pool connections (LIFO, limited, idle ones expire), read a
whole answer or stream one, decode gzip, and enforce the gateway's timeouts:

- connect: opening the connection (and the TLS handshake);
- first byte: from sending the request to the first byte of the answer, and also bounds
  every later gap while reading a non-streamed answer;
- total: a whole non-streamed answer;
- stream idle: the gap between chunks once a stream's first chunk has arrived.

A connection that timed out, failed or was abandoned half way is closed, never reused.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

MAX_BODY = 64 * 1024 * 1024
_BUFFER_HIGH = 1024 * 1024  # stop reading a stream the caller does not keep up with


class H1Error(Exception):
    """A failed exchange; `partial` says whether any of the answer had arrived."""

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


class ConnectFailed(H1Error):
    pass


class Disconnected(H1Error):
    pass


class ReadTimeout(H1Error):
    pass


class ProtocolError(H1Error):
    pass


@dataclass(frozen=True, slots=True)
class Deadlines:
    connect: float
    first_byte: float
    total: float | None  # None for streams
    idle: float | None  # streams: gap allowed between chunks after the first one


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.got_bytes = False
        self.headers_done: asyncio.Future[None] = self.loop.create_future()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.readable = asyncio.Event()
        self.keep_alive = False
        self.delimited = False
        self.decoder: zlib._Decompress | None = None  # type: ignore[name-defined]
        self.timer: asyncio.TimerHandle | None = None
        self.gap = 0.0
        self.error: H1Error | None = None

    # asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.timer is not None:
            self._arm(self.gap)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}", partial=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done.done():
            return
        if self.headers_done.done() and not self.delimited:
            self._finish(False)  # a body delimited by the connection closing
            return
        state = "in the middle of the answer" if self.got_bytes else "before answering"
        self._fail(Disconnected(f"the upstream closed the connection {state}", self.got_bytes))

    # httptools callbacks ----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        self.headers[key] = value
        if key == b"content-length" or (key == b"transfer-encoding" and b"chunked" in value):
            self.delimited = True
        elif key == b"content-encoding" and value.lower() in (b"gzip", b"deflate"):
            self.decoder = zlib.decompressobj(47)  # gzip or zlib header, auto-detected

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.decoder is not None:
            body = self.decoder.decompress(body)
        if not body:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        self.readable.set()
        if self.buffered > MAX_BODY:
            self._fail(ProtocolError("the upstream answer is larger than 64 MiB", True))
        elif self.buffered > _BUFFER_HIGH and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self._finish(self.parser.should_keep_alive())

    # own --------------------------------------------------------------------------
    def _finish(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self._disarm()
        if not self.headers_done.done():
            self.headers_done.set_result(None)
        if not self.done.done():
            self.done.set_result(None)
        self.readable.set()

    def _fail(self, error: H1Error) -> None:
        self.error = error
        for future in (self.headers_done, self.done):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: it is re-raised where awaited
        self.readable.set()
        self.close()

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.gap = seconds
        self.timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        self._fail(ReadTimeout("the upstream did not answer in time", self.got_bytes))

    def expire(self) -> None:
        """The whole answer took longer than its total deadline."""
        if not self.done.done():
            self._fail(
                ReadTimeout("the upstream did not finish its answer in time", self.got_bytes)
            )

    def close(self) -> None:
        self._disarm()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(self, request: bytes, first_byte: float) -> None:
        self._reset()
        self.idle_since = 0.0
        assert self.transport is not None
        self.transport.write(request)
        self._arm(first_byte)

    def take(self) -> bytes:
        """Everything buffered so far (and let a paused stream read on)."""
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        self.readable.clear()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        return data


class StreamResponse:
    """An answer whose body is read as it arrives. Iterate it; `close()` when done."""

    def __init__(self, client: HttpClient, conn: _Connection, idle: float) -> None:
        self._client = client
        self._conn = conn
        self._idle = idle
        self.status = conn.status
        self.headers = conn.headers
        self._first = True
        self._released = False

    async def read(self) -> bytes:
        """The whole remaining body (for error answers)."""
        await self._conn.done
        return self._conn.take()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if not conn.chunks and not conn.done.done():
                conn.readable.clear()
                await conn.readable.wait()
            if conn.error is not None:
                raise conn.error
            if conn.chunks:
                if self._first:
                    self._first = False
                    if not conn.done.done():
                        conn._arm(self._idle)  # after the first chunk: the idle gap
                yield conn.take()
            elif conn.done.done():
                return

    def close(self) -> None:
        """Give the connection back if the answer was read to its end, else drop it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        complete = conn.done.done() and conn.error is None and not conn.chunks
        self._client._release(conn, reuse=complete and conn.keep_alive)


class HttpClient:
    """Pooled HTTP/1.1 connections to one origin (`http://` or `https://` host:port)."""

    def __init__(self, base_url: str, max_connections: int, idle_seconds: float = 15.0) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc
        self.base_path = parts.path.rstrip("/")
        self.idle_seconds = idle_seconds
        self._ssl = ssl.create_default_context() if self.tls else None
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._max = max_connections

    async def _checkout(self, deadlines: Deadlines) -> _Connection:
        if self._slots.locked():  # only then wait, under a deadline (wait_for costs a task)
            try:
                await asyncio.wait_for(self._slots.acquire(), deadlines.connect)
            except TimeoutError:
                busy = f"all {self._max} connections to {self.netloc} are busy"
                raise ConnectFailed(busy) from None
        else:
            await self._slots.acquire()
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.idle_seconds:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                ),
                deadlines.connect,
            )
        except TimeoutError:
            self._slots.release()
            raise ReadTimeout(f"connecting to {self.netloc} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self._slots.release()
            raise ConnectFailed(f"cannot connect to {self.netloc}: {exc}") from exc
        except BaseException:
            self._slots.release()
            raise
        return conn

    def _release(self, conn: _Connection, reuse: bool) -> None:
        if reuse and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    def _request_bytes(self, path: str, head: bytes, body: bytes) -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            (self.base_path + path).encode(),
            self.netloc.encode(),
            head,
            len(body),
            body,
        )

    async def post(self, path: str, head: bytes, body: bytes, deadlines: Deadlines) -> Response:
        """POST and read the whole answer. `head`: prebuilt header lines, CRLF-terminated."""
        conn = await self._checkout(deadlines)
        reuse = False
        assert deadlines.total is not None
        # One timer handle for the whole answer: asyncio.timeout() cost ~8% of the hot path.
        total = conn.loop.call_later(deadlines.total, conn.expire)
        try:
            conn.send(self._request_bytes(path, head, body), deadlines.first_byte)
            await conn.done
            reuse = conn.keep_alive
            return Response(conn.status, conn.headers, conn.take())
        finally:
            total.cancel()
            self._release(conn, reuse)

    async def stream(
        self, path: str, head: bytes, body: bytes, deadlines: Deadlines
    ) -> StreamResponse:
        """POST and return once the answer's headers arrived; iterate the body."""
        conn = await self._checkout(deadlines)
        try:
            conn.send(self._request_bytes(path, head, body), deadlines.first_byte)
            await conn.headers_done
        except BaseException:
            self._release(conn, reuse=False)
            raise
        return StreamResponse(self, conn, deadlines.idle or deadlines.first_byte)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
