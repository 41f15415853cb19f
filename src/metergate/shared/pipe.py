"""The hot path's own Redis connection: a batch of commands out, their replies back.

Admission and settling are one script call each per request (and the shared cache, when
on, a GET and on a miss a SET). Through redis-py they cost ~100 µs of CPU for a lone call
and ~25 µs per call in a pipeline (pool checkout, the pipeline object, retry and timeout
wrappers, a parse per reply in Python): with budgets in Redis, a third of a worker's CPU
(docs/performance.md, "Budgets in Redis"). This connection does only what those calls
need: it writes a whole batch in one write and reads the replies with hiredis's C
parser, ~45 µs for a lone call (about what the loopback round trip itself costs) and
~5 µs per call in a batch.

The URL means what it means to redis-py, which reads it (`Settings.of`): host and port
or a unix socket, database, user and password, and for `rediss://` the same TLS context
with its `ssl_*` parameters. One task sends on it, one batch at a time, so replies come
back in the order they were asked for. Any failure (refused, reset, closed, a reply
later than the timeout, a reply that is not RESP) closes the connection and raises an
`OSError` or a `RedisError`; whoever calls opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, ResponseError

Command = tuple[str | bytes | int | float, ...]
_pack = cast(Callable[[Command], bytes], hiredis.pack_command)  # its stub types a 1-tuple


@dataclass(frozen=True, slots=True)
class Settings:
    """Where and how to connect, as redis-py's pool would."""

    host: str
    port: int
    path: str | None  # a unix socket instead of host and port
    tls: Callable[[], ssl.SSLContext] | None  # made on first connect: a bad CA file degrades
    username: str | None
    password: str | None
    db: int
    timeout: float

    @classmethod
    def of(cls, pool: BlockingConnectionPool, timeout: float) -> Settings:
        """Read the settings off a connection the pool would make (it does not connect)."""
        conn = pool.connection_class(**pool.connection_kwargs)
        return cls(
            host=getattr(conn, "host", ""),
            port=int(getattr(conn, "port", 0) or 0),
            path=conn.path if isinstance(conn, UnixDomainSocketConnection) else None,
            tls=conn.ssl_context.get if isinstance(conn, SSLConnection) else None,
            username=conn.username,
            password=conn.password,
            db=int(conn.db or 0),
            timeout=timeout,
        )

    def hello(self) -> list[Command]:
        """What a new connection sends first: AUTH and SELECT, as the URL asks."""
        commands: list[Command] = []
        if self.password:
            user = [self.username] if self.username else []
            commands.append(("AUTH", *user, self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


class _Replies(asyncio.Protocol):
    """Feeds what arrives to hiredis and wakes the batch once all its replies are in."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.replies: list[Any] = []
        self.wanted = 0
        self.waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader, replies = self.reader, self.replies
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as error:
            self._fail(ConnectionError(f"redis sent something that is not RESP: {error}"))
            return
        if len(replies) > self.wanted:  # a reply nobody asked for: the order is lost
            extra = replies[-1]  # e.g. "max number of clients reached", sent on connect
            said = f": {extra}" if isinstance(extra, ResponseError) else ""
            self._fail(ConnectionError(f"redis sent a reply that was not asked for{said}"))
        elif len(replies) == self.wanted and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis closed the connection ({exc or 'end of stream'})"))

    def _fail(self, error: Exception) -> None:
        if self.lost is None:
            self.lost = error
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)


class RedisPipe:
    """One connection to Redis for batches of commands, each batch sent in one write."""

    def __init__(self, protocol: _Replies, timeout: float) -> None:
        self._protocol = protocol
        self._timeout = timeout

    @classmethod
    async def open(cls, settings: Settings) -> RedisPipe:
        """Connect, authenticate and select the database, within the timeout."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(settings.timeout):
            if settings.path is not None:
                _, protocol = await loop.create_unix_connection(_Replies, settings.path)
            else:
                tls = settings.tls() if settings.tls is not None else None
                _, protocol = await loop.create_connection(
                    _Replies, settings.host, settings.port, ssl=tls
                )
        pipe = cls(protocol, settings.timeout)
        hello = settings.hello()
        if hello:
            try:
                refused = [r for r in await pipe.execute(hello) if isinstance(r, Exception)]
            except BaseException:
                pipe.close()
                raise
            if refused:
                pipe.close()
                raise AuthenticationError(f"redis refused the connection's set-up: {refused[0]}")
        return pipe

    @property
    def closed(self) -> bool:
        return self._protocol.lost is not None

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send the commands in one write and return their replies in order; an error
        reply is returned in its place as a `ResponseError`, not raised."""
        protocol = self._protocol
        if protocol.lost is not None:
            raise ConnectionError(f"the connection is gone: {protocol.lost}")
        assert protocol.transport is not None and commands
        protocol.replies = []
        protocol.wanted = len(commands)
        loop = asyncio.get_running_loop()
        waiter = protocol.waiter = loop.create_future()
        protocol.transport.write(b"".join([_pack(c) for c in commands]))
        timer = loop.call_later(self._timeout, _expire, waiter, self._timeout)
        try:
            await waiter
        except BaseException:  # late, lost, or the caller was cancelled: the order is lost
            self.close()
            raise
        finally:
            timer.cancel()
            protocol.waiter = None
        replies, protocol.replies = protocol.replies, []
        protocol.wanted = 0
        return replies

    def close(self) -> None:
        self._protocol._fail(ConnectionError("the connection was closed"))


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    """The batch's time is up (a timer, cheaper than a timeout context per batch)."""
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"redis did not answer within {timeout:g} s"))
