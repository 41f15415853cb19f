"""The gateway's connections to an MCP server under load, reload and large answers.

Real servers behind a real metergate, called with the official `mcp` client: a busy
connection pool is not a dead server, and a call over the server's connection limit
waits, then fails alone as the gateway's own limit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiohttp import web
from mcp.shared.exceptions import MCPError

from metergate.mcp.bounded import BoundedTransport
from metergate.mcp.config import McpConfig
from metergate.mcp.stdio import Lines
from tests.harness import BackgroundLoop, Gateway, free_port, start_gateway
from tests.harness import simulated_config as base_config
from tests.mcp_servers.support import (
    FILES_SERVER,
    LEGACY_SERVER,
    SEARCH_SERVER,
    HttpMcpServer,
    connect,
    eventually,
    eventually_async,
    mcp_url,
    on_the_server,
    registry_samples,
    running,
    value,
)

CLIENT_OP = "mcp_client_operation_duration_seconds_count"
UP = "metergate_mcp_server_up"


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpMcpServer]:
    with running(SEARCH_SERVER, tmp_path_factory.mktemp("s")) as server:
        yield server


def gateway_with(
    bg: BackgroundLoop, workdir: Path, connect_timeout: float = 2, **servers: dict[str, Any]
) -> Gateway:
    config = base_config()
    config["mcp"] = {
        "servers": servers,
        "default_access": {"servers": list(servers)},
        "health_interval_seconds": 0.2,  # probes often, so a call in flight meets one
        "connect_timeout_seconds": connect_timeout,  # also how long a probe waits for the pool
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.3,
    }
    return start_gateway(bg, config, workdir)


def calls(gateway: Gateway, server: str, tool: str, error_type: str) -> float:
    samples = registry_samples(gateway.runtime.metrics.registry)
    labels = {
        "mcp_server_name": server,
        "mcp_method_name": "tools/call",
        "gen_ai_tool_name": tool,
        "error_type": error_type,
    }
    return value(samples, CLIENT_OP, **labels) or 0.0


def outcome(result: BaseException | Any) -> str:
    if isinstance(result, MCPError):
        return f"{result.error.code} {result.error.message}"
    if isinstance(result, BaseException):
        return repr(result)
    return result.content[0].text


async def test_a_full_connection_pool_is_not_taken_for_a_dead_server(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    """100 calls in flight (the HTTP client's default pool) while probes keep running:
    the probes still get through, the server stays up and every call is answered."""
    server = {"url": search.url, "timeout_seconds": 20}
    gateway = gateway_with(bg, tmp_path, connect_timeout=1.5, search=server)
    count = 100  # calls last longer than a probe's wait for a pooled connection
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            results = await asyncio.gather(
                *(client.call_tool("search.slow", {"seconds": 4}) for _ in range(count)),
                return_exceptions=True,
            )
            assert Counter(map(outcome, results)) == {"slept 4.0": count}
            samples = registry_samples(gateway.runtime.metrics.registry)
            assert value(samples, UP, mcp_server_name="search") == 1
            echoed = await client.call_tool("search.echo", {"text": "after"})
            assert echoed.content[0].text == "after"
        assert calls(gateway, "search", "slow", "") == count
        assert calls(gateway, "search", "slow", "transport") == 0
    finally:
        gateway.stop()


async def test_a_call_waiting_for_a_connection_keeps_to_its_timeout(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    """max_connections 1, held by a call until its timeout: a call behind it waits for
    the connection within its own timeout_seconds, not before them, so it fails in
    about that time (not the wait and a whole timeout more), saying how much of it
    went to waiting."""
    server = {"url": search.url, "timeout_seconds": 2, "max_connections": 1}
    gateway = gateway_with(bg, tmp_path, search=server)
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            holder = await on_the_server(client, "search.hold", {"label": "holder"})
            # The next call starts clearly later, so the connection frees before its
            # deadline: it waits, gets the connection and times out on the server.
            await asyncio.sleep(0.3)
            started = time.monotonic()
            with pytest.raises(MCPError) as raised:
                await client.call_tool("search.hold", {"label": "queued"})
            elapsed = time.monotonic() - started
            assert elapsed < 3.0, elapsed  # 1.5 x timeout_seconds; waiting, then 2 s more: ~3.7
            error = raised.value.error
            assert error.code == -32001, outcome(raised.value)
            assert "within 2 s" in error.message
            assert "waited for a free connection" in error.message
            with pytest.raises(MCPError):
                await holder
        assert calls(gateway, "search", "hold", "timeout") == 2
    finally:
        gateway.stop()


async def test_a_call_over_max_connections_waits_then_fails_alone_as_the_gateways(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    """max_connections 1, its one connection taken past a call's deadline (here by the
    test, as a call ending late would): the call waits its timeout_seconds for it, then
    fails alone with an error naming the limit, counted as `gateway_error` (not against
    the server, which stays up)."""
    server = {"url": search.url, "timeout_seconds": 1, "max_connections": 1}
    gateway = gateway_with(bg, tmp_path, search=server)
    mcp = gateway.runtime.mcp
    assert mcp is not None
    slots = mcp.upstreams["search"]._slots
    assert slots is not None
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            await asyncio.wrap_future(bg.submit(slots.acquire()))
            try:
                with pytest.raises(MCPError) as raised:
                    await client.call_tool("search.echo", {"text": "waits"})
            finally:
                bg.loop.call_soon_threadsafe(slots.release)
            busy = raised.value.error
            assert busy.code == -32603, outcome(raised.value)
            assert "max_connections" in busy.message and "1 connection" in busy.message
            echoed = await client.call_tool("search.echo", {"text": "after"})
            assert echoed.content[0].text == "after"
        assert calls(gateway, "search", "echo", "gateway_error") == 1
        assert calls(gateway, "search", "echo", "transport") == 0
        samples = registry_samples(gateway.runtime.metrics.registry)
        assert value(samples, UP, mcp_server_name="search") == 1
    finally:
        gateway.stop()


async def test_a_reload_that_changes_a_server_lets_its_calls_in_flight_finish(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    """A reload changes the server's timeout and rotates its header token while a call
    is on the server: that call finishes on the old connection; new calls use the new
    settings; the old connection closes once it is idle, and the server stays up."""
    before = {"url": search.url, "timeout_seconds": 10, "headers": {"X-Token": "one"}}
    gateway = gateway_with(bg, tmp_path, search=before)
    mcp = gateway.runtime.mcp
    assert mcp is not None
    after = {**before, "timeout_seconds": 12, "headers": {"X-Token": "two"}}
    section = {"servers": {"search": after}, "default_access": {"servers": ["search"]}}
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            call = await on_the_server(client, "search.nap", {"seconds": 2})
            await asyncio.wrap_future(bg.submit(mcp.apply(McpConfig.model_validate(section))))
            assert mcp.upstreams["search"].config.timeout_seconds == 12
            echoed = await client.call_tool("search.echo", {"text": "new"})
            assert echoed.content[0].text == "new"  # served by the new connection
            result = await asyncio.gather(call, return_exceptions=True)
            assert outcome(result[0]) == "napped 2.0"
        assert calls(gateway, "search", "nap", "") == 1
        assert calls(gateway, "search", "nap", "transport") == 0
        await eventually(lambda: not mcp._retiring, within=10)  # the old one closed
        samples = registry_samples(gateway.runtime.metrics.registry)
        assert value(samples, UP, mcp_server_name="search") == 1
    finally:
        gateway.stop()


async def test_an_answer_over_max_response_bytes_is_refused_while_read(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    """A result larger than the server's max_response_bytes, as JSON or as an SSE event
    (after progress), fails alone with an error naming the limit, counted against the
    server; answers within the limit pass, and the server stays up."""
    server = {"url": search.url, "timeout_seconds": 10, "max_response_bytes": 64 * 1024}
    gateway = gateway_with(bg, tmp_path, search=server)
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            small = await client.call_tool("search.big", {"kib": 16})
            assert len(small.content[0].text) == 16 * 1024

            async def on_progress(done: float, total: float | None, note: str | None) -> None:
                pass

            for progress in (False, True):
                with pytest.raises(MCPError) as raised:
                    await client.call_tool(
                        "search.big",
                        {"kib": 256, "progress": progress},
                        progress_callback=on_progress if progress else None,
                    )
                error = raised.value.error
                assert error.code == -32603, outcome(raised.value)
                assert "max_response_bytes" in error.message and "65536" in error.message
            streamed = await client.call_tool(
                "search.big", {"kib": 16, "progress": True}, progress_callback=on_progress
            )
            assert len(streamed.content[0].text) == 16 * 1024
            samples = registry_samples(gateway.runtime.metrics.registry)
            assert value(samples, UP, mcp_server_name="search") == 1
        assert calls(gateway, "search", "big", "-32603") == 2
        assert calls(gateway, "search", "big", "") == 2
    finally:
        gateway.stop()


async def test_answers_are_asked_for_uncompressed_so_the_limit_counts_what_is_relayed() -> None:
    """A compressed answer would be counted before it expands (a small gzip body can
    hold gigabytes), so the bounded transport asks for `identity`."""
    seen: list[str] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["Accept-Encoding"])
        return httpx2.Response(200, json={"jsonrpc": "2.0", "id": 1, "result": {}})

    transport = BoundedTransport(httpx2.MockTransport(answer), "search", 1024)
    async with httpx2.AsyncClient(transport=transport) as http:
        response = await http.post("http://mcp.test/mcp", json={"id": 1})
    assert response.json()["id"] == 1
    assert seen == ["identity"]


async def serve(handle: Any) -> tuple[web.AppRunner, str]:
    """An HTTP 'MCP server' answering every request with `handle`, and its /mcp URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/mcp"


async def broken_server() -> tuple[web.AppRunner, str]:
    """An HTTP 'MCP server' whose tool answers are not JSON-RPC (as a proxy's error page,
    a crashed handler or another service on the port would answer)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") == "Bearer revoked":
            return web.json_response({"error": "invalid_token"}, status=401)
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)
        ident, method = message["id"], message.get("method")

        def ok(result: dict[str, Any]) -> web.Response:
            return web.json_response({"jsonrpc": "2.0", "id": ident, "result": result})

        if method == "initialize":
            info = {"name": "broken", "version": "1"}
            return ok(
                {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": info}
            )
        if method == "tools/list":
            schema = {"type": "object", "properties": {}}
            names = ("garbage", "not_jsonrpc", "denied", "bad_gateway")
            return ok({"tools": [{"name": n, "inputSchema": schema} for n in names]})
        if method == "ping":
            return ok({})
        if method == "tools/call" and message["params"]["name"] == "garbage":
            garbage = "{this is not json" + "x" * 3000
            return web.Response(text=garbage, content_type="application/json")
        tool = message["params"]["name"] if method == "tools/call" else None
        if tool == "denied":
            return web.json_response({"error": "invalid_token"}, status=401)
        if tool == "bad_gateway":
            return web.Response(text="<html>\n<h1>502  Bad Gateway</h1>", status=502)
        if method == "tools/call":
            return web.json_response({"hello": "world", "padding": "y" * 3000})
        error = {"code": -32601, "message": f"no {method}"}
        return web.json_response({"jsonrpc": "2.0", "id": ident, "error": error})

    return await serve(handle)


async def failed_call(gateway: Gateway, tool: str) -> Any:
    """The error of a tool call that must fail as an internal error (-32603)."""
    async with connect(mcp_url(gateway), gateway.key) as client:
        with pytest.raises(MCPError) as failed:
            await client.call_tool(tool, {})
    error = failed.value.error
    assert error.code == -32603, error
    return error


@pytest.mark.parametrize("tool", ["garbage", "not_jsonrpc"])
async def test_a_broken_answer_is_the_servers_fault_not_the_callers(
    bg: BackgroundLoop, tmp_path: Path, tool: str
) -> None:
    """The SDK reads an answer it cannot parse as -32700 ("parse error": the caller's
    request was not JSON) and quoted ~3 KB of it; the caller gets -32603 naming the
    server instead, and the call counts against the server's transport."""
    runner, url = bg.run(broken_server())  # on the gateway's loop: this one blocks at start
    gateway = gateway_with(bg, tmp_path, broken={"url": url, "timeout_seconds": 5})
    try:
        error = await failed_call(gateway, f"broken.{tool}")
        assert "MCP server 'broken' sent an answer that is not valid JSON-RPC" in error.message
        assert len(error.message) < 400
        assert calls(gateway, "broken", tool, "transport") == 1
        assert calls(gateway, "broken", tool, "-32700") == 0
    finally:
        gateway.stop()
        bg.run(runner.cleanup())


# A stdio MCP server that answers every tool call with JSON that is not JSON-RPC: an
# error without its message, or with a code that is no integer.
_MALFORMED_STDIO = """
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    ident, method = message.get("id"), message.get("method")
    if ident is None:
        continue
    if method == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"], "capabilities":
                  {"tools": {}}, "serverInfo": {"name": "raw", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": name, "inputSchema": {"type": "object"}}
                            for name in ("no_message", "text_code")]}
    elif method == "tools/call":
        error = {"code": -32050} if message["params"]["name"] == "no_message" else {
            "code": "abc", "message": "a code that is text"}
        print(json.dumps({"jsonrpc": "2.0", "id": ident, "error": error}), flush=True)
        continue
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": ident, "result": result}), flush=True)
"""


@pytest.mark.parametrize("tool", ["no_message", "text_code"])
async def test_a_stdio_answer_that_is_no_json_rpc_fails_its_call_at_once(
    bg: BackgroundLoop, tmp_path: Path, tool: str
) -> None:
    """Over HTTP such an answer fails its call at once; over stdio the call used to wait
    for its timeout (here a minute), counted as one, with nothing logged. It fails at
    once now, as the server's fault (-32603, `transport`)."""
    server = {"command": sys.executable, "args": ["-c", _MALFORMED_STDIO], "timeout_seconds": 60}
    gateway = gateway_with(bg, tmp_path, raw=server)
    try:
        error = await failed_call(gateway, f"raw.{tool}")
        assert "MCP server 'raw' sent an answer that is not valid JSON-RPC" in error.message
        assert calls(gateway, "raw", tool, "transport") == 1
        assert calls(gateway, "raw", tool, "timeout") == 0
    finally:
        gateway.stop()


def test_a_stdio_line_is_read_whole_across_reads_and_refused_past_the_limit() -> None:
    lines = Lines(limit=8)
    assert lines.feed(b'{"a"') == []
    assert lines.feed(b":1}\n{") == [b'{"a":1}']
    assert lines.feed(b"}\n12345678\n") == [b"{}", b"12345678"]  # the limit itself passes
    assert not lines.overflowed
    assert lines.feed(b"123456789") == [] and lines.overflowed  # no newline yet: too long
    assert lines.feed(b"\n{}\n") == []  # nothing is read after a line too long


async def test_a_stdio_answer_over_max_response_bytes_restarts_the_server_not_the_gateway(
    bg: BackgroundLoop, tmp_path: Path
) -> None:
    """A stdio server's line over its max_response_bytes is not read (nor held: it is
    refused before its end arrives): the call in flight with it fails naming the limit,
    so does any other call in flight to that server (nothing in an unread line says
    which call it answers), and the server is started again for the next calls."""
    server = {
        "command": sys.executable,
        "args": [str(FILES_SERVER), str(free_port())],
        "timeout_seconds": 30,
        "max_response_bytes": 64 * 1024,
    }
    gateway = gateway_with(bg, tmp_path, files=server)
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            small = await client.call_tool("files.big", {"kib": 16})
            assert len(small.content[0].text) == 16 * 1024
            first = (await client.call_tool("files.pid", {})).content[0].text
            waiting = await on_the_server(client, "files.slow", {"seconds": 20})
            with pytest.raises(MCPError) as refused:
                await client.call_tool("files.big", {"kib": 1024})
            with pytest.raises(MCPError) as bystander:
                await waiting
            for error in (refused.value.error, bystander.value.error):
                assert error.code == -32603, error
                assert "max_response_bytes" in error.message and "65536" in error.message

            async def restarted() -> bool:
                try:
                    now = (await client.call_tool("files.pid", {})).content[0].text
                except MCPError:
                    return False  # not up again yet
                return now != first

            await eventually_async(restarted, within=30)
            again = await client.call_tool("files.big", {"kib": 16})
            assert len(again.content[0].text) == 16 * 1024
        assert calls(gateway, "files", "big", "-32603") == 1
        assert calls(gateway, "files", "slow", "-32603") == 1
    finally:
        gateway.stop()


async def test_a_stdio_command_that_cannot_start_is_named_in_the_log(
    bg: BackgroundLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-mcp-server")
    gateway = gateway_with(bg, tmp_path, gone={"command": missing})
    try:
        await eventually(
            lambda: any(
                f"cannot start {missing!r}: No such file or directory" in record.getMessage()
                for record in caplog.records
            ),
            within=10,
        )
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    ("tool", "said"),
    [
        ("denied", 'HTTP 401 Unauthorized: {"error": "invalid_token"}'),
        ("bad_gateway", "HTTP 502 Bad Gateway: <html> <h1>502 Bad Gateway</h1>"),
    ],
)
async def test_an_http_error_answer_says_what_the_server_said(
    bg: BackgroundLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture, tool: str, said: str
) -> None:
    """The SDK turns an HTTP error answer without a JSON-RPC error into "Server returned
    an error response", for the caller and in the log (a rejected token read like any
    fault); both now name the status and quote the answer."""
    runner, url = bg.run(broken_server())
    revoked = {"url": url, "headers": {"Authorization": "Bearer revoked"}}
    gateway = gateway_with(bg, tmp_path, broken={"url": url}, revoked=revoked)
    try:
        error = await failed_call(gateway, f"broken.{tool}")
        assert error.message == f"MCP server 'broken' answered {said}"
        assert calls(gateway, "broken", tool, "-32603") == 1
        await eventually(
            lambda: any(
                "MCP server 'revoked' answered HTTP 401 Unauthorized" in record.getMessage()
                for record in caplog.records
            ),
            within=10,
        )
    finally:
        gateway.stop()
        bg.run(runner.cleanup())


_REPORT_SOCKETS = """
import json, os, socket, sys
names = []
for name in os.listdir("/proc/self/fd"):
    try:
        found = socket.socket(fileno=os.dup(int(name)))
    except OSError:
        continue
    try:
        names.append(list(found.getsockname()))
    except OSError:
        pass
    found.detach()
open(sys.argv[1], "w").write(json.dumps(names))
print('{"jsonrpc": "2.0", "method": "notifications/looked"}', flush=True)
sys.stdin.read()
"""


def test_a_stdio_server_inherits_none_of_the_gateways_sockets(tmp_path: Path) -> None:
    """Served under uvloop, a child keeps every inheritable descriptor, and uvicorn makes
    its listening socket inheritable for its workers: a stdio MCP server holding it
    could accept the gateway's callers and read their keys. It must hold none."""
    import socket

    import uvloop

    from metergate.mcp.config import McpServerConfig
    from metergate.mcp.stdio import bounded_stdio

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    listening.set_inheritable(True)  # as uvicorn's bind_socket leaves it
    report = tmp_path / "sockets.json"
    config = McpServerConfig(command=sys.executable, args=["-c", _REPORT_SOCKETS, str(report)])

    async def start_and_look() -> None:
        async with bounded_stdio("probe", config) as (read, _):
            await asyncio.wait_for(read.receive(), 30)  # it has looked

    try:
        uvloop.run(start_and_look())
        held = [tuple(name) for name in json.loads(report.read_text())]
        assert listening.getsockname() not in held, held
    finally:
        listening.close()


async def test_a_session_the_server_forgot_is_opened_again_and_the_call_sent_once_more(
    bg: BackgroundLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handshake-era server that forgets the gateway's session (a restart; the SDK's
    session_idle_timeout does the same) answers its requests 404. Per the spec the
    gateway opens a new session and sends the request again, which the server never
    took: the call succeeds, counted once, and the server is not taken for down."""
    memos = HttpMcpServer(LEGACY_SERVER, free_port(), tmp_path / "memos.log")
    memos.start()
    config = base_config()
    config["mcp"] = {
        "servers": {"memos": {"url": memos.url, "timeout_seconds": 10}},
        "default_access": {"servers": ["memos"]},
        "health_interval_seconds": 600,  # no probe meets the forgotten session first
    }
    gateway = start_gateway(bg, config, tmp_path / "gw")
    mcp = gateway.runtime.mcp
    assert mcp is not None
    touch = {"uri": "memo://a"}
    try:
        assert mcp.upstreams["memos"].modern is False
        async with connect(mcp_url(gateway), gateway.key) as client:
            assert (await client.call_tool("memos.touch", touch)).content[0].text == "touched"
            memos.stop()
            memos.start()  # with no session of anybody's
            assert (await client.call_tool("memos.touch", touch)).content[0].text == "touched"
        assert calls(gateway, "memos", "touch", "") == 2
        assert calls(gateway, "memos", "touch", "transport") == 0
        samples = registry_samples(gateway.runtime.metrics.registry)
        assert value(samples, UP, mcp_server_name="memos") == 1
        assert not [r.getMessage() for r in caplog.records if "is down" in r.getMessage()]
    finally:
        gateway.stop()
        memos.stop()


async def forgetful_server() -> tuple[web.AppRunner, str, list[str]]:
    """A handshake-era HTTP 'MCP server' that answers every tool call 404 "Session not
    found", as the SDK's servers do for a session they ended; and the methods it got."""
    got: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.Response(status=405)
        message = await request.json()
        got.append(message.get("method"))
        if "id" not in message:
            return web.Response(status=202)
        ident, method = message["id"], message.get("method")
        if method == "tools/call":
            error = {"code": -32600, "message": "Session not found"}
            return web.json_response({"jsonrpc": "2.0", "id": None, "error": error}, status=404)
        if method == "initialize":
            info = {"name": "forgetful", "version": "1"}
            result: dict[str, Any] = {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": info,
            }
        elif method == "tools/list":
            result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
        else:
            error = {"code": -32601, "message": f"no {method}"}
            return web.json_response({"jsonrpc": "2.0", "id": ident, "error": error})
        headers = {"Mcp-Session-Id": f"session-{got.count('initialize')}"}
        return web.json_response({"jsonrpc": "2.0", "id": ident, "result": result}, headers=headers)

    runner, url = await serve(handle)
    return runner, url, got


async def test_a_call_whose_new_session_is_ended_too_fails_naming_the_server_and_why(
    bg: BackgroundLoop, tmp_path: Path
) -> None:
    """The request is sent again once, on one new session: when that session is ended
    too, the call fails with an error that names the server and the cause."""
    runner, url, got = bg.run(forgetful_server())
    config = base_config()
    config["mcp"] = {
        "servers": {"forgetful": {"url": url, "timeout_seconds": 10}},
        "default_access": {"servers": ["forgetful"]},
        "health_interval_seconds": 600,
    }
    gateway = start_gateway(bg, config, tmp_path / "gw")
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            with pytest.raises(MCPError) as raised:
                await client.call_tool("forgetful.echo", {})
        error = raised.value.error
        assert error.code == -32000, outcome(raised.value)
        assert error.message == (
            "MCP server 'forgetful' ended metergate's session (HTTP 404 Not Found: "
            "Session not found)"
        )
        assert error.data is None
        assert got.count("tools/call") == 2 and got.count("initialize") == 2
        assert calls(gateway, "forgetful", "echo", "transport") == 1
    finally:
        gateway.stop()
        bg.run(runner.cleanup())
