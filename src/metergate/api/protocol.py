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
- `idle_timeout_seconds`: a kept-alive connection waiting for its next request is closed;
- bytes that break HTTP's framing (a bad Content-Length or chunk size, a garbled request
  line) get a 400 in the API's error shape, not uvicorn's plain text, and the connection
  closes; bytes left after a whole request (a Content-Length that fell short) are
  refused only once the requests before them are answered;
- `send_timeout_seconds`: a client that takes none of the answer for this long, while
  the write buffer is over its high-water mark (the client reads nothing, or its socket
  is stuck), is cut off, as nginx's `send_timeout` does; else the request (its budget
  hold, its stream, its buffered answer) would live as long as the client's socket. A
  slow client that takes some of it in each period is not.

The common request arrives in one read, headers and body together: it arms no timer
and costs a few attribute writes. Timers are armed only when a read ends mid-headers or
mid-body; the idle deadline is a time written after each answer, watched by one timer per
connection (uvicorn arms and cancels a keep-alive timer for every request).

The per-request path is the gateway's own, uvicorn's parser callbacks rewritten without
what it does not need (one `asyncio.Event` and one timer per request, a scope built in
two steps) and each request served by an `api.cycle.Cycle`; the connection's life
(addresses, flow control, a client gone, graceful shutdown, websocket hand-over) is
uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from metergate.api.cycle import Cycle
from metergate.api.doors.messages import anthropic_error, speaks_anthropic
from metergate.asgi import ON_DEPARTURE, REFUSAL
from metergate.config.model import ServerConfig
from metergate.errors import InvalidRequest, error_body

# Where a connection is: waiting for headers, reading a body, serving, kept alive, or
# refused and closing.
_HEADERS, _BODY, _BUSY, _IDLE, _CLOSING = range(5)
_UNTIMED = -1  # no timer armed
_END_OF_HEADERS = b"\r\n\r\n"
_KEPT_READ = 4096  # bytes kept of a read that ended mid-headers (a connection's, idle too)
# After a refusal, what the client still sends is read and dropped for this long, so
# that closing with unread data (which resets the connection) cannot destroy the
# answer before the client has read it.
LINGER_SECONDS = 2.0
_OUTQ = struct.Struct("i")  # the kernel's count of a socket's unsent bytes (TIOCOUTQ)
_EMPTY = bytes(_OUTQ.size)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_bytes: int
    header_seconds: float
    body_seconds: float
    idle_seconds: float
    send_seconds: float

    @classmethod
    def of(cls, server: ServerConfig) -> ConnectionLimits:
        return cls(
            server.max_header_bytes,
            server.header_timeout_seconds,
            server.body_timeout_seconds,
            server.idle_timeout_seconds,
            server.send_timeout_seconds,
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


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size and slow-client limits, serving each
    request with a `Cycle` (see the module docstring for what it keeps of uvicorn)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits_of(self.app)
        self._max_header_bytes = self.limits.header_bytes
        self._phase = _HEADERS
        self._header_bytes = 0
        # A read that ended mid-headers (its last `_KEPT_READ` bytes): its end joins the
        # next read's in the size check, and a refusal reads it for the header line the
        # parser still holds back.
        self._last_read = b""
        self._timer: asyncio.TimerHandle | None = None
        self._timed = _UNTIMED  # the phase the timer is for
        self._idle_since = 0.0
        self._stalled: asyncio.TimerHandle | None = None  # while writing is paused
        self._unsent = 0  # bytes the client had not taken when that timer was armed
        self._root_path_bytes = self.root_path.encode("ascii")
        self.url = b""  # the parser's, from a request's first bytes (uvicorn sets it then)
        # A refusal of bytes that broke the framing after requests still being answered:
        # sent once they are (`_malformed`).
        self._deferred: tuple[int, str, str, bytes, bytes] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(_HEADERS, self.limits.header_seconds)  # a new client must speak soon

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        super().connection_lost(exc)
        if self.cycle is not None:
            _tell_departed(self.cycle)

    def pause_writing(self) -> None:
        """The client is not taking the answer as fast as it comes: it must take some
        within `send_seconds`."""
        super().pause_writing()
        if self._stalled is None:
            self._unsent = self._untaken()
            self._stalled = self.loop.call_later(self.limits.send_seconds, self._cut_off)

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        super().resume_writing()

    def _cut_off(self) -> None:
        """Nothing of the answer taken for `send_seconds`: the connection goes, and the
        request's handler sees its client gone. Some taken: another period."""
        untaken = self._untaken()
        if untaken < self._unsent:
            self._unsent = untaken
            self._stalled = self.loop.call_later(self.limits.send_seconds, self._cut_off)
            return
        self._stalled = None
        self.transport.abort()

    def _untaken(self) -> int:
        """Bytes of the answer the client has not taken: in the write buffer, and in the
        kernel's send queue (which the kernel refills from the buffer only once much of
        it has drained, so that the buffer alone shows a slow reader no progress)."""
        queued = 0
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                queued = _OUTQ.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _EMPTY))[0]
        return self.transport.get_write_buffer_size() + queued

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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._malformed(exc, data)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        phase = self._phase
        if phase == _HEADERS:
            self._last_read = data[-_KEPT_READ:]  # the whole of a usual read: no copy
            if self._timed != _HEADERS:
                self._arm(_HEADERS, self.limits.header_seconds)
        elif phase == _BODY:
            if self._timed != _BODY:
                self._arm(_BODY, self.limits.body_seconds)
        elif self._timed == _HEADERS or self._timed == _BODY:
            self._disarm()  # the request is in; an idle timer stays (see _expired)

    # -- parser callbacks: one request ----------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        parser = self.parser
        http_version = parser.get_http_version()
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope = self.scope = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "method": parser.get_method().decode("ascii"),
            "root_path": self.root_path,
            "path": self.root_path + path,
            "raw_path": self._root_path_bytes + raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        if parser.should_upgrade() and self._should_upgrade():
            return  # uvicorn's websocket protocol takes the connection over
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        previous = self.cycle
        cycle = self.cycle = Cycle(  # type: ignore[assignment]
            scope,
            self.transport,
            self.flow,
            self.server_state.default_headers,
            http_version != "1.0" and parser.should_keep_alive(),
            self.expect_100_continue,
            self.access_log,
            self.on_response_complete,
        )
        if previous is None or previous.response_complete:
            self._start_asgi_task(cycle, app)  # type: ignore[arg-type]
        else:  # pipelined: it waits for the answers before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))  # type: ignore[arg-type]

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._phase = _BUSY
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.more_body = False
        cycle.message_event.set()

    def on_response_complete(self) -> None:
        """An answer is out: start a pipelined request, or wait for the next one (or, if
        bytes after these requests broke the framing, refuse them and close)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self._deferred is not None and not self.pipeline:
            refusal, self._deferred = self._deferred, None
            self._phase = _HEADERS  # (the refused bytes start a message)
            self._refuse(*refusal)
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._phase == _BUSY:
            self._phase = _IDLE
        # The idle deadline is kept as a time, not a timer per request: one timer runs
        # per connection and, when it fires early, waits out the rest (see _expired).
        self._idle_since = self.loop.time()
        if self._timer is None:
            self._arm(_IDLE, self.limits.idle_seconds)

    # -- limits -------------------------------------------------------------------

    def _malformed(self, exc: httptools.HttpParserError, data: bytes) -> None:
        """The bytes broke HTTP's framing (a bad Content-Length or chunk size, a garbled
        request line or header): a 400 in the API's error shape, then close, since what
        follows cannot be told apart. Bytes that break a message's body are that
        request's fault, answered at once (its handler records the refusal). Bytes after
        a whole request (a Content-Length that fell short) begin a message of their
        own: the requests before it are answered first, then it is refused."""
        detail = str(exc).strip().rstrip(".") or type(exc).__name__
        message = f"malformed HTTP request: {detail}"
        self.logger.warning("%s (from %s)", message, self.client)
        head = recent = b""  # its head, for the shape of the answer (`_error_body`)
        if self._phase == _HEADERS:
            limit = self.limits.header_bytes
            if self._header_bytes == len(data):  # this message's first read
                head = data[:limit]
            else:
                recent = self._last_read + data[:limit]
        refusal = (400, message, "invalid_http_request", head, recent)
        self._disarm()
        if self._phase == _BODY:
            self._refuse(*refusal)
            return
        cycle = self.cycle
        if self.pipeline or (cycle is not None and not cycle.response_complete):
            self._phase = _CLOSING  # nothing more is read; it is refused once they are out
            self._deferred = refusal
            self.flow.pause_reading()
            return
        self._phase = _HEADERS
        self._refuse(*refusal)

    def _headers_too_large(self, data: bytes, total: int) -> bool:
        """Refuse the request if its headers pass the limit (`total`: bytes of this
        message so far, this read included, which may hold body bytes too)."""
        later = self._header_bytes > 0  # not this message's first read
        tail = self._last_read[-3:] if later else b""
        end = (tail + data).find(_END_OF_HEADERS)
        size = total if end < 0 else self._header_bytes - len(tail) + end + 4
        if size <= self.limits.header_bytes:
            return False
        limit = self.limits.header_bytes
        self._refuse(
            431,
            f"request headers are larger than the gateway's limit of {limit} bytes "
            "(server.max_header_bytes)",
            "request_header_fields_too_large",
            head=b"" if later else data[:limit],
            recent=self._last_read + data[:limit] if later else b"",
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
        self._timed = _UNTIMED

    def _expired(self, phase: int) -> None:
        self._timer, self._timed = None, _UNTIMED
        if self._phase != phase or self.transport.is_closing():
            return  # an idle timer that fires while a request is served is re-armed after
        if phase == _IDLE:
            left = self._idle_since + self.limits.idle_seconds - self.loop.time()
            if left > 0:
                self._arm(_IDLE, left)  # answered meanwhile: the rest of the new deadline
            else:
                self.transport.close()
            return
        recent = b""
        if phase == _HEADERS:
            what = "headers", self.limits.header_seconds, "server.header_timeout_seconds"
            recent = self._last_read
        else:
            what = "body", self.limits.body_seconds, "server.body_timeout_seconds"
        self._refuse(
            408,
            f"the request {what[0]} did not arrive within {what[1]:g} s ({what[2]})",
            "request_timeout",
            recent=recent,
        )

    def _refuse(
        self, status: int, message: str, code: str, head: bytes = b"", recent: bytes = b""
    ) -> None:
        """Answer `status` unless this request has been answered (or a pipelined one
        before it is being answered), and close the connection; the request's handler,
        if one runs, sees its client gone (and the answer sent, `asgi.REFUSAL`). `head`:
        the request's first bytes when the parser has not been fed them; `recent`: the
        last bytes of its head that arrived, whose header lines the parser may not have
        passed on yet (it holds a line back until the next one starts)."""
        cycle = self.cycle
        if self._phase == _HEADERS:  # `cycle` is a previous request's, if any
            speak = cycle is None or cycle.response_complete
        else:
            speak = cycle is not None and not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            if speak:  # its handler records this answer, not a caller that left
                scope: Any = cycle.scope  # (uvicorn types it as its own TypedDict)
                scope[REFUSAL] = (status, message, code)
            cycle.disconnected = True
            cycle.message_event.set()
            _tell_departed(cycle)
        self._phase = _CLOSING
        if not speak:
            self.transport.close()
            return
        body = self._error_body(status, message, code, head, recent)
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

    def _error_body(
        self, status: int, message: str, code: str, head: bytes, recent: bytes
    ) -> bytes:
        """The refusal in the shape its caller reads: Anthropic's for the Messages door
        and Anthropic's SDK, OpenAI's for everyone else, judged from what has arrived of
        the request (its target and the headers so far: parsed, in `head` or `recent`).
        A request whose target is still incomplete gets OpenAI's."""
        if head:
            request_line, _, rest = head.partition(b"\r\n")
            target = [*request_line.split(b" "), b"", b""][1]
            names = _header_names(rest)
        else:
            target = self.url
            names = {name for name, _ in self.headers or ()} | _header_names(recent)
        if not target.startswith(b"/"):  # the absolute form: http://host/path
            target = b"/" + target.partition(b"://")[2].partition(b"/")[2]
        path = target.partition(b"?")[0].decode("latin-1")
        if speaks_anthropic(path, names):
            return anthropic_error(InvalidRequest(message, status=status, code=code))[1]
        return error_body(message, "invalid_request_error", code)


def _header_names(lines: bytes) -> set[bytes]:
    """The names of the header lines in `lines` (the first may be a line's end)."""
    return {line.partition(b":")[0].strip().lower() for line in lines.split(b"\r\n")}


def _tell_departed(cycle: Cycle | RequestResponseCycle) -> None:
    """Tell the handler of a request whose caller left before its answer was complete
    (`asgi.ON_DEPARTURE`), once."""
    if cycle.disconnected:
        scope: Any = cycle.scope  # (uvicorn types it as its own TypedDict)
        departed = scope.pop(ON_DEPARTURE, None)
        if departed is not None:
            departed()
