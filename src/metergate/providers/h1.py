"""A small keep-alive HTTP/1.1 client for the hot path: pooled connections to one origin.

Why not aiohttp or httpx: measured on this path (bench/stack/results.md), their request
machinery costs ~100 µs of CPU per request more than a protocol that hands bytes to
httptools (the same C parser uvicorn uses), which is most of the gateway's budget. This
client does only what the gateway needs, and does it the way mature clients do:

- POST a prebuilt request to one origin over HTTP/1.1, with or without TLS, directly or
  through an HTTP proxy (CONNECT tunnel for TLS; see `providers.proxy`);
- pool connections (LIFO, limited; waiting for a free one is bounded by its own `pool`
  deadline and fails as `PoolTimeout`, the gateway's limit, never the upstream's fault);
- never reuse an idle connection the server closed or sent bytes on (the event loop
  reports both); one idle for a second or more is also checked for a close the loop
  has not yet read (its socket readable), where a server's idle timeout makes one
  likely. Under load that saves a system call per request: the loop reads a close as
  soon as it comes, and the one that lands between its last look and the request is
  met by the retry below;
- when a *reused* connection fails before any byte of the answer arrived, send the
  request once more on a fresh connection: the server closed an idle connection as the
  request went out, which is routine and says nothing about the upstream's health;
- read a whole answer at full speed up to `max_body` bytes; pause reading a stream only
  while the caller has not taken what arrived (back-pressure);
- read past interim (1xx) answers, which HTTP/1.1 lets a server send unasked;
- bound what an upstream may send before its body: `MAX_HEADER_BYTES`, `MAX_HEADERS`;
- decode gzip and deflate;
- enforce the timeouts: connect (TCP, proxy tunnel and TLS handshake), pool, first byte
  (also every later gap of a whole answer), total (a whole answer, or a whole stream when
  one is given), stream idle (the gap between chunks once a stream's first chunk arrived).

A connection that timed out, failed or was abandoned half way is closed, never reused.
Errors are this module's own kinds (like httpcore's); `providers.http` maps them to the
gateway's error kinds.
"""

from __future__ import annotations

import asyncio
import collections
import select
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from metergate.providers.proxy import Proxy, ProxyError, open_tunnel

MAX_BODY = 64 * 1024 * 1024  # default bound of one answer's body (decoded)
MAX_HEADER_BYTES = 64 * 1024  # status line and headers of one answer
MAX_HEADERS = 128
_BUFFER_HIGH = 1024 * 1024  # stop reading a stream the caller does not keep up with
_TRUSTED_IDLE = 1.0  # seconds idle under which the event loop's view of a socket is trusted


class _StopParsing(Exception):
    """Raised in a parser callback that has closed the connection: read no further."""


class H1Error(Exception):
    """A failed exchange; `partial` says whether any of the answer had arrived."""

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


class ConnectError(H1Error):
    """The connection (TCP, proxy tunnel or TLS) could not be opened."""


class ConnectTimeout(ConnectError):
    """Opening the connection took longer than the connect deadline."""


class PoolTimeout(H1Error):
    """Every connection the pool may open is busy, for longer than the pool deadline."""


class Disconnected(H1Error):
    """The server closed the connection before the answer was complete."""


class ReadTimeout(H1Error):
    """The answer (or its next part) did not arrive in time; `setting` names the deadline
    that ran out, as the `timeouts` setting that sets it is called."""

    def __init__(self, message: str, partial: bool, setting: str) -> None:
        super().__init__(message, partial)
        self.setting = setting


class ProtocolError(H1Error):
    """The answer broke HTTP/1.1, or a limit of this client (headers, body size)."""


class TooLarge(ProtocolError):
    """The answer's body passed the client's `max_body`."""


@dataclass(frozen=True, slots=True)
class Deadlines:
    connect: float
    first_byte: float
    total: float | None  # a whole answer, or a whole stream (None: a stream without one)
    idle: float | None  # streams: gap allowed between chunks after the first one
    pool: float = 10.0  # waiting for a free connection when all are busy


def header_fields(block: bytes) -> dict[bytes, bytes]:
    """The header lines of an answer's head by lower-case name (a repeated name: its last
    value). `block` runs from the CRLF that ends the status line to the blank line; the
    parser has checked every line's syntax by the time it is complete."""
    fields: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            fields[name.lower()] = value.strip(b" \t")
    return fields


@dataclass(slots=True)
class Response:
    status: int
    head: bytes  # the header lines, as `header_fields` reads them
    body: bytes

    @property
    def headers(self) -> dict[bytes, bytes]:
        return header_fields(self.head)


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self.loop = loop
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.exchanges = 0  # requests sent on this connection
        self.idle_since = time.monotonic()
        # One timer per connection, not per answer: an answer that ends leaves it armed,
        # and when it fires with nothing in flight it just stops (see _timed_out).
        self.timer: asyncio.TimerHandle | None = None
        self._reset(streaming=False)

    def _reset(self, streaming: bool) -> None:
        self.streaming = streaming
        self.status = 0
        # What arrived before the head was complete, and then its header lines, read
        # when needed (`header_fields`): a success's are not, and a parser callback per
        # header line cost more than the rest of reading the answer.
        self.head = b""
        self.head_start = 0  # where the final answer's head begins, past interim ones
        self.head_block = b""
        self.got_bytes = False
        self.got_headers = False
        self.interim = False  # reading a 1xx answer, which the final one follows
        self.done: asyncio.Future[None] = self.loop.create_future()
        # A stream is read as it arrives: it needs these two; a whole answer does not.
        # `waiter` is made only when the stream's reader has taken everything and waits
        # for more (a future a wait: an asyncio.Event cost ~40 bytecodes more per read).
        self.headers_done: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False  # reading paused until the stream's reader takes what came
        if streaming:
            self.headers_done = self.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.received = 0
        self.keep_alive = False
        self.delimited = False
        self.decoder: zlib._Decompress | None = None
        self.gap = 0.0  # seconds allowed without a byte (first byte, then between reads)
        self.last_read = 0.0  # loop time of the last read (or of sending the request)
        self.finish_by: float | None = None  # loop time the whole answer must end by
        self.error: H1Error | None = None

    # asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        if self.idle_since:  # bytes on an idle connection: it cannot be trusted with a request
            self.close()
            return
        self.got_bytes = True
        if self.timer is not None:
            self.last_read = self.loop.time()  # the timer checks it when it fires
        if not self.got_headers:
            self.head += data  # no copy while it is empty
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.closed:  # a callback closed it and stopped the parser (_StopParsing)
                return
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}", partial=True))
            return
        if not self.got_headers and len(self.head) > MAX_HEADER_BYTES:
            self._fail(
                ProtocolError(
                    f"the upstream sent more than {MAX_HEADER_BYTES // 1024} KiB of "
                    "status line and headers",
                    partial=True,
                )
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done.done():
            return
        if self.got_headers and not self.delimited:
            self._finish(False)  # a body delimited by the connection closing
            return
        state = "in the middle of the answer" if self.got_bytes else "before answering"
        self._fail(Disconnected(f"the upstream closed the connection {state}", self.got_bytes))

    # httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done.done():  # a second answer after the one asked for: nobody's
            self.close()
            raise _StopParsing  # not into the body the caller is about to take

    # No on_header: the head is read whole once complete (see `head` in _reset).
    def on_headers_complete(self) -> None:
        head = self.head  # only CR and LF may come before the status line
        line_end = head.find(b"\r\n", head.find(b"HTTP/", self.head_start))
        end = head.find(b"\r\n\r\n", line_end)
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:  # never asked for: what follows would not be HTTP
                problem = "the upstream switched protocols (101), which the gateway never asks"
                self._fail(ProtocolError(problem, partial=True))
                raise _StopParsing
            # Interim (100 Continue, 103 Early Hints): the final answer follows. Read on,
            # without these headers (kept, to count in MAX_HEADER_BYTES).
            self.interim = True
            self.head_start = end + 4
            return
        block = head[line_end:end]
        self.head = b""  # not kept: it may hold the first read of the body
        self.head_block = block
        lowered = block.lower()
        if lowered.count(b"\r\n") > MAX_HEADERS:
            self._fail(ProtocolError(f"the upstream sent more than {MAX_HEADERS} headers", True))
            raise _StopParsing
        framed = b"\r\ncontent-length:" in lowered
        coded = b"\r\ntransfer-encoding:" in lowered or b"\r\ncontent-encoding:" in lowered
        fields = header_fields(lowered) if coded else {}  # the usual answer: neither
        self.delimited = framed or b"chunked" in fields.get(b"transfer-encoding", b"")
        if fields.get(b"content-encoding") in (b"gzip", b"deflate"):
            self.decoder = zlib.decompressobj(47)  # gzip or zlib header, auto-detected
        self.status = status
        self.got_headers = True
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.decoder is not None:  # never more than one byte past the maximum: a
            # small gzip answer can inflate a thousandfold
            body = self.decoder.decompress(body, max(1, self.max_body - self.received + 1))
        if not body:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        self.received += len(body)
        if self.waiter is not None:
            self._wake()
        if self.received > self.max_body:
            limit = self.max_body
            size = f"{limit >> 20} MiB" if limit & 0xFFFFF == 0 else f"{limit:,} bytes"
            self._fail(TooLarge(f"the upstream answer is larger than {size}", True))
        elif self.streaming and self.buffered > _BUFFER_HIGH and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self._finish(self.parser.should_keep_alive())

    # own --------------------------------------------------------------------------
    def _finish(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.got_headers = True
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_result(None)
        if not self.done.done():
            self.done.set_result(None)
        if self.waiter is not None:
            self._wake()

    def _fail(self, error: H1Error) -> None:
        self.error = error
        # Nobody reads a failed answer's body (up to max_response_bytes): it goes now,
        # not with the connection, which the error's traceback keeps in a cycle.
        self.chunks.clear()
        self.buffered = 0
        self.decoder = None
        for future in (self.headers_done, self.done):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: it is re-raised where awaited
        if self.waiter is not None:
            self._wake()
        self.close()

    def _wake(self) -> None:
        """Something for the stream's reader waiting in `StreamResponse`: more, the end,
        or a failure."""
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():  # (cancelled with its reader)
            waiter.set_result(None)

    def _arm(self, gap: float, setting: str = "first_byte") -> None:
        """Allow `gap` seconds without a byte from now on (and keep the total deadline);
        `setting` is the gap's name in a timeout's message.

        One timer handle per connection: a read only notes its time, and the timer, when
        it fires, sleeps on if a byte came meanwhile (a timer per read cost more than the
        read); one still armed from an earlier answer is kept if it is due no later."""
        self.gap = gap
        self.gap_setting = setting
        self.last_read = now = self.loop.time()
        due = now + gap if self.finish_by is None else min(now + gap, self.finish_by)
        timer = self.timer
        if timer is None or timer.when() > due:  # a shorter gap than before: sooner
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(due, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.done.done():
            return  # armed for an answer that has ended; the next one arms again
        now = self.loop.time()
        if self.finish_by is not None and now >= self.finish_by:
            what = "its stream" if self.streaming else "its answer"
            self._fail(
                ReadTimeout(
                    f"the upstream did not finish {what} within {self.total:g} s",
                    self.got_bytes,
                    "stream_total" if self.streaming else "total",
                )
            )
            return
        quiet_until = self.last_read + self.gap
        if self.paused:  # the stream's reader is behind, not the upstream: `take` starts
            quiet_until = now + self.gap  # the gap afresh when it reads on
        if now < quiet_until:  # a byte came since: wait for the rest of the gap
            due = quiet_until if self.finish_by is None else min(quiet_until, self.finish_by)
            self.timer = self.loop.call_at(due, self._timed_out)
            return
        if self.got_bytes:
            message = f"the upstream sent nothing more for {self.gap:g} s"
        else:
            message = f"the upstream did not answer within {self.gap:g} s"
        self._fail(ReadTimeout(message, self.got_bytes, self.gap_setting))

    def looks_dead(self, now: float | None = None) -> bool:
        """An idle keep-alive socket has nothing to say: readable means the server closed
        it (or sent garbage), even if the event loop has not noticed yet. Given `now`
        (time.monotonic()), one idle for less than `_TRUSTED_IDLE` is taken on the loop's
        word, without asking the socket."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return True
        if self.fd < 0 or (now is not None and now - self.idle_since < _TRUSTED_IDLE):
            return False
        try:
            readable, _, _ = select.select((self.fd,), (), (), 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        self._disarm()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def send(
        self, request: bytes, first_byte: float, streaming: bool, total: float | None = None
    ) -> None:
        self._reset(streaming)
        self.exchanges += 1
        self.idle_since = 0.0
        assert self.transport is not None
        self.transport.write(request)
        self.total = total
        self.sent_at = now = self.loop.time()
        self.finish_by = None if total is None else now + total
        self._arm(first_byte)

    def take(self) -> bytes:
        """Everything buffered so far (and let a paused stream read on)."""
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.last_read = self.loop.time()  # the upstream's gap counts from here
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class StreamResponse:
    """An answer whose body is read as it arrives. Iterate it; `close()` when done."""

    def __init__(
        self, client: HttpClient, conn: _Connection, idle: float, first_byte: float
    ) -> None:
        self._client = client
        self._conn = conn
        self._idle = idle
        self._first_byte = first_byte
        self.status = conn.status
        self.head = conn.head_block
        self._first = True
        self._released = False

    @property
    def headers(self) -> dict[bytes, bytes]:
        return header_fields(self.head)

    async def read(self) -> bytes:
        """The whole remaining body (for error answers)."""
        await self._conn.done
        return self._conn.take()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    def no_event_yet(self) -> None:
        """Told by a reader that what came so far holds no event: past `first_byte` from
        the request, that is a timeout. (Bytes alone, keep-alive comments or an answer
        dribbled a byte at a time, keep the byte timers content for ever.)"""
        conn = self._conn
        if conn.loop.time() - conn.sent_at > self._first_byte:
            raise ReadTimeout(
                f"the upstream sent no stream event within {self._first_byte:g} s, only "
                "keep-alive comments or part of one",
                partial=True,
                setting="first_byte",
            )

    async def _chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if not conn.chunks and not conn.done.done():
                conn.waiter = waiter = conn.loop.create_future()
                await waiter
            if conn.error is not None:
                raise conn.error
            if conn.chunks:
                if self._first:
                    self._first = False
                    if not conn.done.done():
                        conn._arm(self._idle, "stream_idle")  # after the first chunk
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

    def __init__(
        self,
        base_url: str,
        max_connections: int,
        idle_seconds: float = 15.0,
        *,
        max_body: int = MAX_BODY,
        proxy: Proxy | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc.rpartition("@")[2]  # never user:password (config refuses it)
        self.base_path = parts.path.rstrip("/")
        self.idle_seconds = idle_seconds
        self.max_body = max_body
        self.proxy = proxy
        # Plain HTTP through a proxy: the request line names the whole URL (absolute form).
        self._target = f"http://{self.netloc}" if proxy is not None and not self.tls else ""
        self._proxy_head = proxy.authorization if proxy is not None and not self.tls else b""
        self._ssl = ssl.create_default_context() if self.tls else None
        self._idle: collections.deque[_Connection] = collections.deque()
        self._max = max_connections
        self._busy = 0  # connections checked out (open or being opened)
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def _checkout(self, deadlines: Deadlines, fresh: bool = False) -> _Connection:
        """A connection to use: the most recently idle one that is still alive, or a new
        one (`fresh`: always a new one)."""
        if self._busy >= self._max:  # only then wait, under a deadline
            await self._wait_for_slot(deadlines.pool)
        self._busy += 1
        if not fresh:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self.idle_seconds and not conn.looks_dead(now):
                    return conn
                conn.close()
        try:
            return await self._connect(deadlines.connect)
        except BaseException:
            self._free_slot()
            raise

    async def _wait_for_slot(self, seconds: float) -> None:
        """Wait until a connection is given back (FIFO), at most `seconds` in all.

        A plain counter and a queue of futures: asyncio.Semaphore's `locked()` walks its
        waiters on every call, which cost several percent of the hot path."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._busy >= self._max:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PoolTimeout(
                    f"all {self._max} connections to {self.netloc} stayed busy for {seconds:g}s"
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append(waiter)
            timer = loop.call_later(remaining, _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                continue  # the loop says so, unless a connection came free meanwhile
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_next()  # woken, then cancelled: pass the turn on
                raise
            finally:
                timer.cancel()
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _free_slot(self) -> None:
        self._busy -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, seconds: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self.max_body)
        try:
            async with asyncio.timeout(seconds):
                if self.proxy is None:
                    await loop.create_connection(
                        lambda: conn,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self.tls else None,
                    )
                elif self.tls:
                    sock = await open_tunnel(self.proxy, self.host, self.port)
                    await loop.create_connection(
                        lambda: conn, sock=sock, ssl=self._ssl, server_hostname=self.host
                    )
                else:
                    await loop.create_connection(lambda: conn, self.proxy.host, self.proxy.port)
        except TimeoutError:
            via = f" through proxy {self.proxy.netloc}" if self.proxy else ""
            raise ConnectTimeout(
                f"connecting to {self.netloc}{via} took longer than {seconds:g}s"
            ) from None
        except (OSError, ssl.SSLError, ProxyError) as exc:
            via = f" through proxy {self.proxy.netloc}" if self.proxy else ""
            raise ConnectError(f"cannot connect to {self.netloc}{via}: {exc}") from exc
        return conn

    def _release(self, conn: _Connection, reuse: bool) -> None:
        if reuse and not conn.closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._free_slot()

    def _request_bytes(self, path: str, head: bytes, body: bytes) -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
            (self._target + self.base_path + path).encode(),
            self.netloc.encode(),
            self._proxy_head,
            head,
            len(body),
            body,
        )

    async def post(self, path: str, head: bytes, body: bytes, deadlines: Deadlines) -> Response:
        """POST and read the whole answer. `head`: prebuilt header lines, CRLF-terminated."""
        request = self._request_bytes(path, head, body)
        assert deadlines.total is not None
        fresh = False
        while True:
            conn = await self._checkout(deadlines, fresh)
            reuse = False
            try:
                conn.send(request, deadlines.first_byte, streaming=False, total=deadlines.total)
                await conn.done
                reuse = conn.keep_alive
                return Response(conn.status, conn.head_block, conn.take())
            except Disconnected as exc:
                if fresh or exc.partial or conn.exchanges < 2:
                    raise
                fresh = True  # a reused connection the server had closed: once more, anew
            finally:
                self._release(conn, reuse)

    async def stream(
        self, path: str, head: bytes, body: bytes, deadlines: Deadlines
    ) -> StreamResponse:
        """POST and return once the answer's headers arrived; iterate the body."""
        request = self._request_bytes(path, head, body)
        fresh = False
        while True:
            conn = await self._checkout(deadlines, fresh)
            try:
                conn.send(request, deadlines.first_byte, streaming=True, total=deadlines.total)
                assert conn.headers_done is not None
                await conn.headers_done
            except Disconnected as exc:
                self._release(conn, reuse=False)
                if fresh or exc.partial or conn.exchanges < 2:
                    raise
                fresh = True
                continue
            except BaseException:
                self._release(conn, reuse=False)
                raise
            idle = deadlines.idle or deadlines.first_byte
            return StreamResponse(self, conn, idle, deadlines.first_byte)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
