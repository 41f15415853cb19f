"""One request and its answer on an HTTP/1.1 connection: the ASGI `receive` and `send`.

The gateway's protocol (`api/protocol.py`) builds one `Cycle` per request. It keeps the
attributes, the messages and the errors of uvicorn's `RequestResponseCycle`, so that
uvicorn's connection code (a client gone, a graceful shutdown) and uvicorn's own `send`
work on it unchanged; what it changes is the cost of the usual request:

- a request whose body has arrived is handed to the app at once, without a wait on an
  `asyncio.Event` (a `Wakeup` stands in for it: a flag, and futures only when someone
  waits);
- its fields are slots (uvicorn's cycle keeps a dict per request; class defaults for
  the rarely changed ones measured 1 % more instructions than slots, as a dict grown
  after `__init__` loses CPython's shared-key layout);
- a whole answer (one with a content-length) goes out in one write: its status line and
  headers wait for its body. The usual one (lowercase header names, printable values, a
  content-length equal to the body's length, no `connection` or `transfer-encoding`
  header, no access log, not HEAD) is composed here in C-level joins; anything else takes
  uvicorn's own `send` (`_composed`), which decides and raises exactly as uvicorn does.
  A streamed answer (no content-length: an SSE stream may wait long for its first event)
  still gets its headers at once;
- a streamed answer's chunks are framed here, as uvicorn frames them, its end by
  uvicorn's `send`;
- a streamed answer to an HTTP/1.0 request goes out without the chunked framing uvicorn
  would give it (1.0 has none): the connection's close ends it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

# uvicorn's own handling, for what the usual path leaves to it (a function taking the
# cycle as `self`: it reads and writes only the attributes a Cycle has).
_uvicorn_send: Any = RequestResponseCycle.send
_uvicorn_send_500: Any = RequestResponseCycle.send_500_response

_DISCONNECT = {"type": "http.disconnect"}


def _nothing() -> None:
    """`on_response` once the cycle is over (breaks the cycle -> protocol reference)."""


class Wakeup:
    """The part of `asyncio.Event` the cycle and uvicorn's connection and `send` code use:
    `set` (data, the end of the body, a client gone, an answer complete) and `wait`
    (`receive`, which also lowers `flag` itself). Setting it when nobody waits, the usual
    case, is a flag write."""

    # Class defaults (no __init__): most wakeups are set once and never waited on.
    flag = False
    waiters: list[asyncio.Future[None]] | None = None

    def set(self) -> None:
        self.flag = True
        waiters = self.waiters
        if waiters:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> bool:
        if self.flag:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if self.waiters is not None and waiter in self.waiters:
                self.waiters.remove(waiter)
        return True


class Cycle:
    """One request's ASGI cycle (see the module docstring)."""

    __slots__ = (
        "_start",
        "access_log",
        "body",
        "chunked_encoding",
        "default_headers",
        "disconnected",
        "expected_content_length",
        "flow",
        "keep_alive",
        "message_event",
        "more_body",
        "on_response",
        "response_complete",
        "response_started",
        "scope",
        "transport",
        "until_close",
        "waiting_for_100_continue",
    )
    # What uvicorn's send reads and never changes.
    logger = logging.getLogger("uvicorn.error")
    access_logger = logging.getLogger("uvicorn.access")

    def __init__(
        self,
        scope: Any,
        transport: asyncio.Transport,
        flow: FlowControl,
        default_headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        expect_100_continue: bool,
        access_log: bool,
        on_response: Callable[[], None],
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.default_headers = default_headers
        self.keep_alive = keep_alive
        self.on_response = on_response
        self.message_event = Wakeup()
        self.body = b""
        self.waiting_for_100_continue = expect_100_continue
        self.access_log = access_log
        self.disconnected = False
        self.response_started = self.response_complete = False
        self.more_body = True
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0
        self._start: Any = None  # the held `http.response.start` of a whole answer
        self.until_close = False  # a streamed answer to HTTP/1.0: it ends with the connection

    async def run_asgi(self, app: Any) -> None:
        """Run the app for this request; what it leaves undone, done as uvicorn does
        (uvicorn's protocol starts each request's task with this name)."""
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def _send_500(self) -> None:
        """uvicorn's 500, instead of a whole answer's head that is held and unsent (the
        app failed between its start and its body): nothing of it was written."""
        self._start = None
        await _uvicorn_send_500(self)

    async def receive(self) -> Any:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            event = self.message_event
            if not event.flag:
                await event.wait()
            event.flag = False
        if self.disconnected or self.response_complete:
            return _DISCONNECT.copy()
        message = {"type": "http.request", "body": self.body, "more_body": self.more_body}
        self.body = b""
        return message

    async def send(self, message: Any) -> None:
        if not self.disconnected and self.transport.is_closing():
            # Closed under this answer by the connection's own limits (a pipelined
            # request's timer, say): uvloop raises on a write to it; drop the answer as
            # for a client gone.
            self.disconnected = True
        start = self._start
        if start is None:
            kind = message["type"]
            if kind == "http.response.start" and not self.response_started:
                headers = message.get("headers")
                if type(headers) in (list, tuple) and b"content-length" in map(_NAME, headers):
                    self._start = message
                    return
                if self.scope["http_version"] == "1.0":
                    self._end_by_closing()
            elif (
                self.chunked_encoding
                and kind == "http.response.body"
                and message.get("more_body", False)
                and not self.response_complete
            ):
                # A stream's chunk, framed as uvicorn's `send` frames it, without a second
                # coroutine per chunk; its last message (the end) goes to uvicorn's.
                if self.flow.write_paused and not self.disconnected:
                    await self.flow.drain()
                if not self.disconnected and (body := message.get("body", b"")):
                    self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
                return
            elif self.until_close and not message.get("more_body", False):
                # uvicorn checks a length-delimited body's end; this one's is the close
                self.expected_content_length = len(message.get("body", b""))
            await _uvicorn_send(self, message)
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
            await self._uvicorn_send_both(start, message)
            return
        self.response_started = self.response_complete = True
        self.waiting_for_100_continue = False
        self.transport.write(whole)
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def _end_by_closing(self) -> None:
        """An HTTP/1.0 client knows no chunked framing, which uvicorn gives every answer
        without a length (RFC 9112 forbids it for 1.0): the answer is sent as it is and
        ends when the connection closes, as it does after every HTTP/1.0 answer here."""
        self.chunked_encoding = False
        self.expected_content_length = _UNTIL_CLOSE
        self.until_close = True

    def _whole_answer(self, start: Any, body: bytes) -> bytes | None:
        """The bytes of the answer, as uvicorn would write them; None where uvicorn's own
        path must decide (see the module docstring)."""
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

    async def _uvicorn_send_both(self, start: Any, message: Any) -> None:
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
            await _uvicorn_send(self, message)
        finally:
            self.transport = transport
        return b"".join(capture.parts), capture.closing


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


# A header line as uvicorn writes it, from a (name, value) pair, in C.
_HEADER_LINE = b"%s: %s\r\n".__mod__
_NAME, _VALUE = itemgetter(0), itemgetter(1)
# What uvicorn's per-header checks accept, names in lowercase only (an uppercase name
# goes to uvicorn, which lowercases it).
_NAME_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_VALUE_BYTES = bytes(b for b in range(256) if b == 9 or 0x20 <= b != 0x7F)
_LENGTH = b"\r\ncontent-length: "
_UNTIL_CLOSE = 1 << 62  # what uvicorn may count down from while the answer streams
