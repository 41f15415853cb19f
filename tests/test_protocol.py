"""The gateway's HTTP protocol writes each whole answer in one piece, byte for byte what
uvicorn's own protocol writes, and leaves every unusual answer to uvicorn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from metergate.api import cycle
from metergate.api.protocol import GuardedHttpToolsProtocol

DEFAULT_HEADERS = [(b"date", b"Thu, 03 Dec 2026 12:00:00 GMT"), (b"server", b"uvicorn")]
BODY = b'{"id":"chatcmpl-1","object":"chat.completion"}'
POST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
    b"content-length: 2\r\n\r\n{}"
)


class Transport:
    """What the protocols write, write by write, and whether they closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.closed_by_server = False  # before the test hangs up

    def get_extra_info(self, name: str) -> Any:
        return {"sockname": ("127.0.0.1", 4000), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: bytes) -> None:
        if self.closed:  # as uvloop's transport does
            raise RuntimeError("unable to perform operation on a closed transport")
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return False


def app_answering(*messages: dict[str, Any], scopes: list[Any] | None = None) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scopes is not None:
            scopes.append(scope)
        while (received := await receive()).get("more_body"):
            pass
        if scopes is not None:
            scopes.append(received)
        for message in messages:
            await send(message)

    return app


async def serve(
    protocol_class: type[HttpToolsProtocol],
    app: Any,
    request: bytes,
    transport: Transport | None = None,
) -> Transport:
    config = Config(app=app, http="httptools", lifespan="off", access_log=False)  # as `serve`
    config.load()
    state = ServerState()
    state.default_headers = list(DEFAULT_HEADERS)
    protocol = protocol_class(config=config, server_state=state, app_state={})
    transport = transport or Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(request)
    while state.tasks:  # the request's task, then a pipelined one's
        await asyncio.wait_for(asyncio.gather(*state.tasks), 10)
    transport.closed_by_server = transport.closed
    protocol.connection_lost(None)  # the client goes: timers stop
    return transport


def start(headers: list[tuple[bytes, bytes]], status: int = 200) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


WHOLE = [
    (b"x-request-id", b"req_1"),
    (b"x-metergate-cost-usd", b"0.000025000"),
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(BODY)),
]

CASES = {
    "whole answer": (POST, [start(WHOLE), body(BODY)]),
    "an error answer": (POST, [start(WHOLE, 429), body(BODY)]),
    "the client asks to close": (
        POST.replace(b"host: gw\r\n", b"host: gw\r\nconnection: close\r\n"),
        [start(WHOLE), body(BODY)],
    ),
    "the client expects 100-continue": (
        POST.replace(b"host: gw\r\n", b"host: gw\r\nexpect: 100-continue\r\n"),
        [start(WHOLE), body(BODY)],
    ),
    "a percent-encoded path and a query": (
        POST.replace(b"/v1/chat/completions", b"/v1/chat%2Fcompletions?a=1"),
        [start(WHOLE), body(BODY)],
    ),
    "HTTP/1.0": (POST.replace(b"HTTP/1.1", b"HTTP/1.0"), [start(WHOLE), body(BODY)]),
    "HEAD": (b"HEAD /healthz HTTP/1.1\r\nhost: gw\r\n\r\n", [start(WHOLE), body(b"")]),
    "an uppercase header name": (POST, [start([(b"X-Odd", b"1"), *WHOLE]), body(BODY)]),
    "a tab in a value": (POST, [start([(b"x-odd", b"a\tb"), *WHOLE]), body(BODY)]),
    "the app closes": (POST, [start([(b"connection", b"close"), *WHOLE]), body(BODY)]),
    "a body in two parts": (POST, [start(WHOLE), body(BODY[:10], True), body(BODY[10:])]),
    "a stream": (
        POST,
        [start([(b"content-type", b"text/event-stream")]), body(b"data: 1\n\n", True), body(b"")],
    ),
    "a stream of several chunks, one empty": (
        POST,
        [
            start([(b"content-type", b"text/event-stream")]),
            body(b"data: 1\n\n", True),
            body(b"", True),
            body(b"data: " + b"x" * 5000 + b"\n\n", True),
            body(b"data: [DONE]\n\n"),
        ],
    ),
    "a header smuggled in a value": (POST, [start([(b"x-odd", b"a\r\nb: c"), *WHOLE]), body(BODY)]),
    "a line feed in a value": (POST, [start([(b"x-odd", b"a\nb"), *WHOLE]), body(BODY)]),
    "a space in a name": (POST, [start([(b"x odd", b"1"), *WHOLE]), body(BODY)]),
    "a name that is not ASCII": (POST, [start([(b"x-\xe9", b"1"), *WHOLE]), body(BODY)]),
    "a content-length that lies": (POST, [start(WHOLE), body(BODY + b"!")]),
}


@pytest.mark.parametrize("case", CASES)
async def test_answers_are_the_bytes_uvicorn_writes(case: str) -> None:
    request, messages = CASES[case]
    our_view: list[Any] = []
    their_view: list[Any] = []
    ours = await serve(GuardedHttpToolsProtocol, app_answering(*messages, scopes=our_view), request)
    theirs = await serve(HttpToolsProtocol, app_answering(*messages, scopes=their_view), request)
    # The app sees the same scope and the same last request message as under uvicorn.
    assert our_view == their_view
    if case == "a content-length that lies":
        # uvicorn has written the head when the body turns out too long; the gateway
        # holds the head until the body and writes neither. Either way no answer.
        assert ours.writes == [] and ours.closed_by_server and theirs.closed_by_server
        return
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert ours.closed_by_server == theirs.closed_by_server


async def test_a_stream_to_an_http_1_0_client_ends_with_the_connection() -> None:
    """HTTP/1.0 has no chunked framing (uvicorn sends it anyway): a streamed answer goes
    out as it is, and the connection's close ends it."""
    events = (b"data: 1\n\n", b"data: 2\n\n")
    messages = [start([(b"content-type", b"text/event-stream")])]
    messages += [body(event, True) for event in events] + [body(b"")]
    request = POST.replace(b"HTTP/1.1", b"HTTP/1.0")
    transport = await serve(GuardedHttpToolsProtocol, app_answering(*messages), request)
    head, _, rest = b"".join(transport.writes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head and b"\r\nconnection: close" in head
    assert rest == b"".join(events)
    assert transport.closed_by_server


async def test_a_whole_answer_is_one_write() -> None:
    transport = await serve(GuardedHttpToolsProtocol, app_answering(start(WHOLE), body(BODY)), POST)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n" + BODY)
    assert not transport.closed_by_server


async def test_a_kept_alive_connection_serves_the_next_request() -> None:
    app = app_answering(start(WHOLE), body(BODY))
    transport = await serve(GuardedHttpToolsProtocol, app, POST + POST)
    assert b"".join(transport.writes).count(b"HTTP/1.1 200 OK\r\n") == 2


async def test_the_usual_answer_skips_uvicorns_send(monkeypatch: pytest.MonkeyPatch) -> None:
    async def not_here(self: Any, message: Any) -> None:
        raise AssertionError("the usual whole answer went through uvicorn's send")

    monkeypatch.setattr(cycle.Cycle, "_composed", not_here)
    transport = await serve(GuardedHttpToolsProtocol, app_answering(start(WHOLE), body(BODY)), POST)
    assert transport.writes and transport.writes[0].endswith(BODY)


@pytest.mark.parametrize("case", ["whole answer", "a stream"])
async def test_an_answer_on_a_connection_closed_under_it_is_dropped(case: str) -> None:
    """The connection's own limits may close it while an earlier, pipelined request is
    still answered: that answer is dropped as for a client gone, not an error."""
    _, messages = CASES[case]
    failures: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        transport.close()  # what GuardedHttpToolsProtocol._refuse does
        try:
            for message in messages:
                await send(message)
        except BaseException as error:
            failures.append(error)
            raise

    transport = Transport()
    await serve(GuardedHttpToolsProtocol, app, POST, transport)
    assert failures == [] and transport.writes == []


@pytest.mark.parametrize("fails", ["raises", "returns"])
async def test_an_app_that_fails_between_head_and_body_gets_a_500(fails: str) -> None:
    """The head of a whole answer waits for its body; if the app raises (or returns)
    before the body, nothing was written and the client gets uvicorn's 500, whole."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send(start(WHOLE))
        if fails == "raises":
            raise RuntimeError("failed after its head")

    transport = await serve(GuardedHttpToolsProtocol, app, POST)
    written = b"".join(transport.writes)
    assert written.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), written[:80]
    assert written.endswith(b"\r\n\r\nInternal Server Error")
    assert transport.closed_by_server
