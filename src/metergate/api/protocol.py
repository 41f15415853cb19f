"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol, bounded.

uvicorn's httptools protocol puts no limit on a request's header bytes, and no deadline
on a client that trickles its headers or body: one byte a second keeps a connection, and
a task, alive forever (slowloris). This subclass adds, per connection (`server:` in the
config, read when the app is loaded):

- `max_header_bytes`: request line and headers above it get a 431 and the connection
  closes, before more of them is buffered;
- `header_timeout_seconds`: from a connection's start or a request's first byte to the
  end of its headers; past it, a 408 and close;
- `body_timeout_seconds`: from the end of the headers to the end of the body; past it,
  a 408 (or, if the answer has started, a plain close) and the handler sees the client
  gone;
- `idle_timeout_seconds`: a kept-alive connection waiting for its next request is closed
  (uvicorn's own keep-alive timer, set from this value).

The common request arrives in one read, headers and body together: it arms no timer
and costs a few attribute writes. Timers are armed only when a read ends mid-headers or
mid-body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from metergate.config.model import ServerConfig
from metergate.errors import error_body

# Where a connection is: waiting for headers, reading a body, serving, kept alive, or
# refused and closing.
_HEADERS, _BODY, _BUSY, _IDLE, _CLOSING = range(5)
_END_OF_HEADERS = b"\r\n\r\n"
# After a refusal, what the client still sends is read and dropped for this long, so
# that closing with unread data (which resets the connection) cannot destroy the
# answer before the client has read it.
LINGER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_bytes: int
    header_seconds: float
    body_seconds: float
    idle_seconds: float

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            server.max_header_bytes,
            server.header_timeout_seconds,
            server.body_timeout_seconds,
            server.idle_timeout_seconds,
        )


_DEFAULT = ConnectionLimits.of(ServerConfig())
_limits: dict[int, ConnectionLimits] = {}  # id(loaded app) -> its limits


def limits_of(app: Any) -> ConnectionLimits:
    """The limits of the gateway app uvicorn serves, under whatever middleware uvicorn
    wrapped around it (each keeps the wrapped app as `.app`)."""
    found = _limits.get(id(app))
    if found is None:
        inner, found = app, _DEFAULT
        while inner is not None:
            runtime = getattr(inner, "runtime", None)
            if runtime is not None:
                found = ConnectionLimits.of(runtime.plan.config.server)
                break
            inner = getattr(inner, "app", None)
        _limits[id(app)] = found
    return found


class _Capture:
    """Stands in for the transport while uvicorn composes an answer's bytes."""

    __slots__ = ("closing", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closing = True


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle, writing a whole answer (one with a content-length) in one
    system call: its status line and headers wait for its body instead of going out
    alone. A streamed answer (no content-length: an SSE stream may wait long for its
    first event) still gets its headers at once.

    The usual whole answer (lowercase header names, printable values, a content-length
    equal to the body's length, no `connection` or `transfer-encoding` header, no access
    log, not HEAD) is composed here: C-level joins of the header lines, names and values
    and one byte filter over each, where uvicorn's `send` runs two regular expressions
    and a few comparisons per header, twice through its state machine. Anything else takes
    uvicorn's own path (`_composed`), which decides and raises exactly as uvicorn does."""

    _start: Any = None  # the held `http.response.start` of a whole answer

    async def send(self, message: Any) -> None:
        if not self.disconnected and self.transport.is_closing():
            # Closed under this answer by the connection's own limits (a pipelined
            # request's timer, say): uvloop raises on a write to it; drop the answer as
            # for a client gone.
            self.disconnected = True
        start = self._start
        if start is None:
            if (
                message["type"] == "http.response.start"
                and not self.response_started
                and type(headers := message.get("headers")) in (list, tuple)
                and b"content-length" in map(_NAME, headers)
            ):
                self._start = message
                return
            await _cycle_send(self, message)
            return
        self._start = None
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        whole = None
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            whole = self._whole_answer(start, message.get("body", b""))
        if whole is None:
            await self._uvicorn_send(start, message)
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        self.chunked_encoding = False
        self.expected_content_length = 0
        self.response_complete = True
        self.transport.write(whole)
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def _whole_answer(self, start: Any, body: bytes) -> bytes | None:
        """The bytes of the answer, as uvicorn would write them; None where uvicorn's own
        path must decide (see the class docstring)."""
        status_line = STATUS_LINE.get(start["status"])
        if status_line is None or self.access_log or self.scope["method"] == "HEAD":
            return None
        pairs = (*self.default_headers, *start["headers"])
        # Every name a lowercase token, every value free of control characters but tab
        # (so no value can end its line early): deleting the allowed bytes leaves none.
        names, values = b"".join(map(_NAME, pairs)), b"".join(map(_VALUE, pairs))
        if names.translate(None, _NAME_BYTES) or values.translate(None, _VALUE_BYTES):
            return None
        lines = b"".join(map(_HEADER_LINE, pairs))
        marked = b"\r\n" + lines  # every header line now starts after a CRLF
        at = marked.find(_LENGTH)
        if at < 0 or marked.find(_LENGTH, at + 1) >= 0:
            return None
        # find(), not `in`: bytes' `in` first tries its operand as an integer and formats
        # (then drops) a TypeError for every bytes needle.
        if marked.find(b"\r\nconnection: ") >= 0 or marked.find(b"\r\ntransfer-encoding: ") >= 0:
            return None
        at += len(_LENGTH)
        if marked[at : marked.index(b"\r\n", at)] != b"%d" % len(body):
            return None
        close = b"" if self.keep_alive else b"connection: close\r\n"
        return b"".join((status_line, lines, close, b"\r\n", body))

    async def _uvicorn_send(self, start: Any, message: Any) -> None:
        """uvicorn's `send` for the held start and this message, written at once."""
        held, _ = await self._composed(start)
        body, closing = await self._composed(message)
        transport = self.transport
        if not self.disconnected:
            transport.write(held + body)
        if closing:
            transport.close()

    async def _composed(self, message: Any) -> tuple[bytes, bool]:
        """The bytes uvicorn would write for `message`, and whether it would then close."""
        transport = self.transport
        capture = _Capture()
        self.transport = capture  # type: ignore[assignment]
        try:
            await _cycle_send(self, message)
        finally:
            self.transport = transport
        return b"".join(capture.parts), capture.closing


# A header line as uvicorn writes it, from a (name, value) pair, in C.
_HEADER_LINE = b"%s: %s\r\n".__mod__
_NAME, _VALUE = itemgetter(0), itemgetter(1)
# What uvicorn's per-header checks accept, names in lowercase only (an uppercase name
# goes to uvicorn, which lowercases it).
_NAME_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_VALUE_BYTES = bytes(b for b in range(256) if b == 9 or 0x20 <= b != 0x7F)
_LENGTH = b"\r\ncontent-length: "


_cycle_send = RequestResponseCycle.send

# The parent's methods, called directly on the per-request path (cheaper than super()).
_data_received = HttpToolsProtocol.data_received
_headers_complete = HttpToolsProtocol.on_headers_complete
_message_complete = HttpToolsProtocol.on_message_complete
_response_complete = HttpToolsProtocol.on_response_complete
_start_task = HttpToolsProtocol._start_asgi_task


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size and slow-client limits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits_of(self.app)
        self._max_header_bytes = self.limits.header_bytes
        self.timeout_keep_alive = self.limits.idle_seconds  # type: ignore[assignment]
        self._phase = _HEADERS
        self._header_bytes = 0
        self._tail = b""  # the last bytes of a read that ended mid-headers
        self._timer: asyncio.TimerHandle | None = None
        self._timed = _IDLE  # the phase the timer is for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(_HEADERS, self.limits.header_seconds)  # a new client must speak soon

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _CLOSING:
            return
        if phase == _IDLE:
            self._phase = phase = _HEADERS
            self._header_bytes = 0
        if phase == _HEADERS:
            total = self._header_bytes + len(data)
            if total > self._max_header_bytes and self._headers_too_large(data, total):
                return
            self._header_bytes = total
        _data_received(self, data)
        phase = self._phase
        if phase == _HEADERS:
            self._tail = data[-3:]
            if self._timed != _HEADERS:
                self._arm(_HEADERS, self.limits.header_seconds)
        elif phase == _BODY:
            if self._timed != _BODY:
                self._arm(_BODY, self.limits.body_seconds)
        elif self._timer is not None:
            self._disarm()

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        _headers_complete(self)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.__class__ = OneWriteCycle  # uvicorn builds the cycle; we only change `send`
        _start_task(self, cycle, app)

    def on_message_complete(self) -> None:
        self._phase = _BUSY
        _message_complete(self)

    def on_response_complete(self) -> None:
        if self._phase == _BUSY and not self.pipeline:
            self._phase = _IDLE  # uvicorn's keep-alive timer takes over
        _response_complete(self)

    # -- limits -------------------------------------------------------------------

    def _headers_too_large(self, data: bytes, total: int) -> bool:
        """Refuse the request if its headers pass the limit (`total`: bytes of this
        message so far, this read included, which may hold body bytes too)."""
        end = (self._tail + data).find(_END_OF_HEADERS)
        size = total if end < 0 else self._header_bytes - len(self._tail) + end + 4
        if size <= self.limits.header_bytes:
            return False
        self._refuse(
            431,
            f"request headers are larger than the gateway's limit of "
            f"{self.limits.header_bytes} bytes (server.max_header_bytes)",
            "request_header_fields_too_large",
        )
        return True

    def _arm(self, phase: int, seconds: float) -> None:
        self._disarm()
        self._timed = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timed = _IDLE

    def _expired(self, phase: int) -> None:
        self._timer, self._timed = None, _IDLE
        if self._phase != phase or self.transport.is_closing():
            return
        if phase == _HEADERS:
            what = "headers", self.limits.header_seconds, "server.header_timeout_seconds"
        else:
            what = "body", self.limits.body_seconds, "server.body_timeout_seconds"
        self._refuse(
            408,
            f"the request {what[0]} did not arrive within {what[1]:g} s ({what[2]})",
            "request_timeout",
        )

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` unless this request has been answered (or a pipelined one
        before it is being answered), and close the connection; the request's handler,
        if one runs, sees its client gone."""
        cycle = self.cycle
        if self._phase == _HEADERS:  # `cycle` is a previous request's, if any
            speak = cycle is None or cycle.response_complete
        else:
            speak = cycle is not None and not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._phase = _CLOSING
        if not speak:
            self.transport.close()
            return
        body = error_body(message, "invalid_request_error", code)
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then end of stream; keep reading
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
