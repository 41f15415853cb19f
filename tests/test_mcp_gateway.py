"""The metered MCP gateway, end to end: real MCP servers behind a real metergate.

A streamable-HTTP server (`search`, its own process) and a stdio server (`files`, spawned
by the gateway) sit behind metergate's `/mcp`; the official `mcp` client calls it with
gateway keys. Checked: namespacing, key auth, per-key allow-lists, per-server timeouts,
health and reconnection, metergate's own tools, and the exact metric samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from metergate.console.mcp import McpView
from metergate.mcp.config import McpConfig
from metergate.mcp.gateway import McpGateway
from tests.harness import BackgroundLoop, Gateway, free_port, simulated_config, start_gateway
from tests.mcp_servers.support import (
    FILES_SERVER,
    SEARCH_SERVER,
    HttpMcpServer,
    Samples,
    buckets,
    connect,
    delta,
    eventually,
    mcp_url,
    names,
    on_the_server,
    registry_samples,
    running,
    scrape,
    value,
)

CLIENT_OP = "mcp_client_operation_duration_seconds"
SERVER_OP = "mcp_server_operation_duration_seconds"
UP = "metergate_mcp_server_up"
BUILTINS = {"chat", "list_models", "usage"}
SEARCH_TOOLS = {
    f"search.{tool}"
    for tool in (
        *("query", "slow", "nap", "big", "fail"),
        *("echo", "steps", "hold", "cancelled", "link"),
    )
}
FILES_TOOLS = {"files.read", "files.list", "files.slow", "files.pid", "files.write", "files.big"}


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpMcpServer]:
    with running(SEARCH_SERVER, tmp_path_factory.mktemp("s")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, McpGateway, dict[str, str]]]:
    """metergate with the MCP gateway wired in, and keys: test (all), two restricted ones."""
    config = simulated_config()
    config["budgets"] = {
        "test-daily": {"scope": "key", "target": "test", "period": "day", "limit_usd": 5},
        "each-key": {"scope": "key", "target": "*", "limit_usd": 50, "hard": False},
    }
    config["mcp"] = {
        "servers": {
            "search": {"url": search.url, "timeout_seconds": 0.5},
            "files": {
                "command": sys.executable,
                "args": [str(FILES_SERVER), str(free_port())],
                "timeout_seconds": 5,
            },
        },
        "access": {
            "test": {"servers": ["search", "files"]},
            "search-agent": {"tools": ["search.*"]},
            "reader": {"tools": ["files.read"]},
        },
        "health_interval_seconds": 0.2,
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.4,
    }
    gateway = start_gateway(bg, config, tmp_path_factory.mktemp("gw"))
    mcp = gateway.runtime.mcp
    assert mcp is not None
    keys = {
        "test": gateway.key,
        "search-agent": gateway.new_key("search-agent"),
        "reader": gateway.new_key("reader"),
        "nobody": gateway.new_key("nobody"),
    }
    yield gateway, mcp, keys
    gateway.stop()


def open_to_all(
    bg: BackgroundLoop, workdir: Path, **servers: dict[str, Any]
) -> tuple[Gateway, McpGateway]:
    """metergate with `servers` behind its /mcp, all of them open to every key."""
    config = simulated_config()
    config["mcp"] = {"servers": servers, "default_access": {"servers": list(servers)}}
    gateway = start_gateway(bg, config, workdir / "gw")
    mcp = gateway.runtime.mcp
    assert mcp is not None
    return gateway, mcp


def console_servers(gateway: Gateway) -> dict[str, bool]:
    """The console's MCP page (`/admin/api/mcp`): each server listed and whether it is up."""
    page = McpView().read(gateway.runtime.metrics.registry)
    return {server["name"]: server["up"] for server in page["servers"]}


def samples_of(gateway: Gateway) -> Samples:
    return registry_samples(gateway.runtime.metrics.registry)


def client_count(samples: Samples, server: str, tool: str, error_type: str) -> float:
    labels = {
        "mcp_server_name": server,
        "mcp_method_name": "tools/call",
        "gen_ai_tool_name": tool,
        "error_type": error_type,
    }
    return value(samples, f"{CLIENT_OP}_count", **labels) or 0.0


def front_count(samples: Samples, tool: str, error_type: str) -> float:
    labels = {"mcp_method_name": "tools/call", "gen_ai_tool_name": tool, "error_type": error_type}
    return value(samples, f"{SERVER_OP}_count", **labels) or 0.0


def text(result: Any) -> str:
    return result.content[0].text


async def test_upstream_tools_are_namespaced_proxied_and_metered(stack: Any) -> None:
    gateway, _, keys = stack
    before = samples_of(gateway)
    async with connect(mcp_url(gateway), keys["test"]) as client:
        assert names((await client.list_tools()).tools) == BUILTINS | SEARCH_TOOLS | FILES_TOOLS
        for word in ("a", "b"):
            answer = await client.call_tool("search.query", {"text": word})
            assert not answer.is_error and answer.content[0].text == f"3 results for {word!r}"
        assert text(await client.call_tool("files.read", {"path": "readme.md"})) == "# hello"
        failed = await client.call_tool("search.fail", {"reason": "offline"})
        assert failed.is_error and failed.content[0].text.endswith("offline")
        # the answer is metergate's, not stamped with the upstream's identity
        assert answer.meta["io.modelcontextprotocol/serverInfo"]["name"] == "metergate"
    after = samples_of(gateway)
    assert delta(client_count, before, after, "search", "query", "") == 2
    assert delta(client_count, before, after, "files", "read", "") == 1
    assert delta(client_count, before, after, "search", "fail", "tool_error") == 1
    assert delta(front_count, before, after, "search.query", "") == 2
    assert delta(front_count, before, after, "search.fail", "tool_error") == 1
    assert value(after, UP, mcp_server_name="search") == 1
    assert value(after, UP, mcp_server_name="files") == 1
    labels = {"mcp_server_name": "search", "mcp_method_name": "tools/call"}
    series = buckets(after, CLIENT_OP, **labels, gen_ai_tool_name="query", error_type="")
    assert series["+Inf"] == client_count(after, "search", "query", "")
    assert series["0.5"] == series["+Inf"]  # loopback calls are fast
    # health probes are upstream operations too
    listing = {"mcp_server_name": "files", "mcp_method_name": "tools/list", "gen_ai_tool_name": ""}
    assert (value(after, f"{CLIENT_OP}_count", **listing, error_type="") or 0) >= 1


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "missing_api_key"),
        ("mgk_" + "x" * 43, "invalid_api_key"),
        ("sk-123", "malformed_api_key"),
    ],
)
async def test_calls_without_a_valid_gateway_key_get_401(
    stack: Any, key: str | None, code: str
) -> None:
    gateway, _, _ = stack
    before = samples_of(gateway)
    with pytest.raises((MCPError, ExceptionGroup)) as raised:
        async with connect(mcp_url(gateway), key) as client:
            await client.list_tools()
    error = _mcp_error(raised.value)
    assert error.error.data == {"status": 401, "code": code}
    assert "HTTP 401" in error.error.message

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers["Accept"] = "application/json, text/event-stream"
    async with httpx2.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        response = await http.post(mcp_url(gateway), json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="metergate"'
    assert orjson.loads(response.content)["error"]["data"]["code"] == code
    # refused before the MCP layer: nothing was served or proxied
    after = samples_of(gateway)
    assert {
        k: v for k, v in after.items() if k[0].startswith("mcp_") and "tools/call" in str(k)
    } == {k: v for k, v in before.items() if k[0].startswith("mcp_") and "tools/call" in str(k)}


@pytest.mark.parametrize(
    ("arguments", "status", "code"),
    [
        ({"query": "x" * (4 * 1024 * 1024)}, 413, "request_too_large"),  # server.max_body_bytes
        (
            {"query": "deep", "nested": functools.reduce(lambda v, _: [v], range(150), 0)},
            400,
            "json_too_deep",
        ),  # server.max_json_depth
    ],
    ids=["too-large", "too-deep"],
)
async def test_a_body_past_the_gateways_limits_is_refused_before_any_server(
    stack: Any, arguments: dict[str, Any], status: int, code: str
) -> None:
    """The limits every door applies hold for /mcp too, and the refusal is the caller's:
    a server that never saw the call is not counted as failing it."""
    gateway, _, keys = stack
    before = samples_of(gateway)
    headers = {**_bearer(keys["test"]), "Accept": "application/json, text/event-stream"}
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "search.search", "arguments": arguments},
    }
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await http.post(mcp_url(gateway), content=orjson.dumps(body), headers=headers)
    assert response.status_code == status
    error = orjson.loads(response.content)["error"]
    assert error["data"] == {"status": status, "code": code}
    assert "server.max_" in error["message"]
    after = samples_of(gateway)  # (health probes list tools meanwhile: calls only)
    assert {k: v for k, v in after.items() if "tools/call" in str(k)} == {
        k: v for k, v in before.items() if "tools/call" in str(k)
    }


async def test_a_session_belongs_to_the_key_that_opened_it(stack: Any) -> None:
    """A handshake-era session id is no bearer token: another key gets 404 for it."""
    gateway, _, keys = stack
    accept = {"Accept": "application/json, text/event-stream"}
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    async with httpx2.AsyncClient(timeout=10) as http:
        opened = await http.post(
            mcp_url(gateway), json=initialize, headers={**accept, **_bearer(keys["test"])}
        )
        assert opened.status_code == 200
        session = {
            "mcp-session-id": opened.headers["mcp-session-id"],
            "mcp-protocol-version": "2025-11-25",
        }
        other = await http.post(
            mcp_url(gateway), json=listing, headers={**accept, **session, **_bearer(keys["reader"])}
        )
        assert other.status_code == 404
        ended = await http.delete(mcp_url(gateway), headers={**session, **_bearer(keys["test"])})
        assert ended.status_code in (200, 204)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _mcp_error(exc: BaseException) -> MCPError:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, MCPError), repr(exc)
    return exc


async def test_keys_see_and_call_only_what_their_allow_list_names(stack: Any) -> None:
    gateway, _, keys = stack
    before = samples_of(gateway)
    async with connect(mcp_url(gateway), keys["search-agent"]) as client:
        assert names((await client.list_tools()).tools) == BUILTINS | SEARCH_TOOLS
        assert text(await client.call_tool("search.echo", {"text": "ok"})) == "ok"
        refusals = []
        for name in ("files.read", "files.nonexistent", "nothing.here", "files"):
            with pytest.raises(MCPError) as raised:
                await client.call_tool(name, {"path": "readme.md"})
            refusals.append((raised.value.error.code, raised.value.error.message))
        # refused exactly like tools that do not exist: nothing is learnt about other tools
        assert refusals == [
            (-32602, f"Unknown tool: {n}")
            for n in ("files.read", "files.nonexistent", "nothing.here", "files")
        ]
    async with connect(mcp_url(gateway), keys["reader"]) as client:
        assert names((await client.list_tools()).tools) == BUILTINS | {"files.read"}
        assert text(await client.call_tool("files.read", {"path": "notes.txt"})) == "buy milk"
        with pytest.raises(MCPError) as raised:
            await client.call_tool("files.list", {})
        assert raised.value.error.message == "Unknown tool: files.list"
    async with connect(mcp_url(gateway), keys["nobody"]) as client:
        assert names((await client.list_tools()).tools) == BUILTINS
    after = samples_of(gateway)
    assert delta(client_count, before, after, "files", "read", "") == 1
    assert delta(client_count, before, after, "files", "list", "") == 0
    # refusals are labelled by tool only when the tool exists; other names are "unknown"
    for tool, refused in (("unknown", 3), ("files.read", 1), ("files.list", 1)):
        assert delta(front_count, before, after, tool, "-32602") == refused


async def test_a_tool_slower_than_the_server_timeout_fails_as_timeout(
    stack: Any, search: HttpMcpServer
) -> None:
    gateway, _, keys = stack
    before = samples_of(gateway)
    upstream_before = scrape(search.metrics_url)
    async with connect(mcp_url(gateway), keys["test"]) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("search.slow", {"seconds": 5})
        assert raised.value.error.code == -32001
        assert "within 0.5 s" in raised.value.error.message
        # the connection is still good afterwards
        assert text(await client.call_tool("search.echo", {"text": "again"})) == "again"
    after = samples_of(gateway)
    assert delta(client_count, before, after, "search", "slow", "timeout") == 1
    assert delta(front_count, before, after, "search.slow", "timeout") == 1
    labels = {
        "mcp_server_name": "search",
        "mcp_method_name": "tools/call",
        "gen_ai_tool_name": "slow",
    }
    series = buckets(after, CLIENT_OP, **labels, error_type="timeout")
    assert series["0.2"] == 0 and series["2.0"] == series["+Inf"] >= 1  # about 0.5 s each
    # the server behind saw its caller (the gateway) give up, and says so in its own
    # metrics: cancelled, for the deadline was the gateway's, not the server's
    key = {"mcp_method_name": "tools/call", "gen_ai_tool_name": "slow", "error_type": "cancelled"}
    old = value(upstream_before, f"{SERVER_OP}_count", **key) or 0
    await eventually(
        lambda: (value(scrape(search.metrics_url), f"{SERVER_OP}_count", **key) or 0) > old, 5
    )


async def test_metergate_tools_chat_list_models_and_usage(stack: Any) -> None:
    gateway, _, keys = stack
    requests_before = gateway.metric("metergate_requests_total", key="test", outcome="success")
    async with connect(mcp_url(gateway), keys["test"]) as client:
        models = await client.call_tool("list_models", {})
        assert models.structured_content == {"models": [{"id": "sim", "description": ""}]}
        reply = await client.call_tool("chat", {"model": "sim", "prompt": "Hello there"})
        assert not reply.is_error and reply.content[0].text
        data = reply.structured_content
        assert data["upstream"] == "sim-up" and data["cost_usd"] > 0
        assert data["usage"]["prompt_tokens"] > 0
        refused = await client.call_tool("chat", {"model": "gpt-nope", "prompt": "hi"})
        assert refused.is_error and refused.structured_content["status"] == 404
        usage = (await client.call_tool("usage", {})).structured_content
    # metered like any request: metrics and the ledger
    assert (
        gateway.metric("metergate_requests_total", key="test", outcome="success")
        == requests_before + 1
    )
    rows = gateway.ledger_rows("key_name = 'test'")
    chat_row, refused_row = rows[-2:]  # the ledger keeps refused requests too
    assert chat_row["request_id"].startswith("mcp_") and chat_row["model"] == "sim"
    assert chat_row["outcome"] == "success" and chat_row["cost_nano"] > 0
    assert refused_row["status"] == 404 and refused_row["cost_nano"] == 0
    spent = sum(row["cost_nano"] for row in rows) / 1e9
    assert usage["key"] == "test"
    assert usage["today"]["cost_usd"] == pytest.approx(spent)
    assert usage["today"]["requests"] == len(rows)
    assert usage["this_month"]["requests"] >= len(rows)
    budget, own_share = usage["budgets"]
    assert budget["name"] == "test-daily" and budget["limit_usd"] == 5
    assert budget["spent_usd"] == pytest.approx(spent)
    # a budget for each key: the caller's own share, not all keys' spend
    assert (own_share["name"], own_share["target"], own_share["limit_usd"]) == (
        "each-key",
        "test",
        50,
    )
    assert own_share["spent_usd"] == pytest.approx(spent)


async def test_a_crashed_stdio_server_is_started_again(stack: Any) -> None:
    gateway, _, keys = stack
    async with connect(mcp_url(gateway), keys["test"]) as client:
        first = int(text(await client.call_tool("files.pid", {})))
        os.kill(first, signal.SIGKILL)
        second = None
        for _ in range(100):  # at most about 5 s
            with contextlib.suppress(MCPError):
                result = await client.call_tool("files.pid", {})
                second = None if result.is_error else int(text(result))
            if second and second != first:
                break
            await asyncio.sleep(0.05)
        assert second and second != first
        assert text(await client.call_tool("files.read", {"path": "readme.md"})) == "# hello"


async def test_a_server_that_never_answers_its_handshake_does_not_hold_a_shutdown(
    tmp_path: Path,
) -> None:
    """A stdio server that starts but never answers `initialize`: closing (a shutdown or
    a reload) abandons the attempt at once instead of waiting out the connect timeout,
    and the server's process is gone afterwards."""
    from prometheus_client import CollectorRegistry

    from metergate.mcp.metrics import ClientMetrics
    from metergate.mcp.upstream import Upstream

    pid_file = tmp_path / "pid"
    script = tmp_path / "mute.py"
    script.write_text(
        "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
    )
    settings = McpConfig.model_validate(
        {
            "servers": {"mute": {"command": sys.executable, "args": [str(script), str(pid_file)]}},
            "connect_timeout_seconds": 120,
        }
    )
    upstream = Upstream(
        "mute", settings.servers["mute"], settings, ClientMetrics(CollectorRegistry())
    )
    await upstream.start()
    await eventually(lambda: pid_file.exists() and pid_file.read_text(), within=30)
    pid = int(pid_file.read_text())
    started = time.monotonic()
    await upstream.close()
    # Before: the close waited for the handshake (here 120 s), at most its own 10 s cap.
    assert time.monotonic() - started < 8
    assert not upstream.up

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await eventually(gone, within=10)


async def test_a_server_that_goes_down_is_reported_and_reconnected(
    bg: BackgroundLoop, tmp_path: Path
) -> None:
    flaky = HttpMcpServer(SEARCH_SERVER, free_port(), tmp_path / "flaky.log")
    flaky.start()
    config = simulated_config()
    config["mcp"] = {
        "servers": {"flaky": {"url": flaky.url, "timeout_seconds": 2}},
        "default_access": {"servers": ["flaky"]},
        "health_interval_seconds": 0.2,
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.3,
    }
    gateway = start_gateway(bg, config, tmp_path / "gw")
    try:

        def up() -> float | None:
            return value(samples_of(gateway), UP, mcp_server_name="flaky")

        async with connect(mcp_url(gateway), gateway.key) as client:
            assert up() == 1
            assert text(await client.call_tool("flaky.echo", {"text": "1"})) == "1"
            flaky.kill()
            await eventually(lambda: up() == 0, within=5)
            with pytest.raises(MCPError) as raised:
                await client.call_tool("flaky.echo", {"text": "2"})
            assert raised.value.error.code == -32000 and "unavailable" in raised.value.error.message
            assert client_count(samples_of(gateway), "flaky", "echo", "transport") == 1
            # the tools stay listed while the server is away
            assert {"flaky.echo", "flaky.query"} <= names((await client.list_tools()).tools)

            flaky.start()
            await eventually(lambda: up() == 1, within=5)
            assert text(await client.call_tool("flaky.echo", {"text": "3"})) == "3"
        samples = samples_of(gateway)
        assert client_count(samples, "flaky", "echo", "") == 2
    finally:
        gateway.stop()
        flaky.stop()


async def test_a_reloaded_section_adds_and_removes_servers_and_rules(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    config = simulated_config()
    config["mcp"] = {"servers": {}}
    gateway = start_gateway(bg, config, tmp_path / "gw")
    mcp = gateway.runtime.mcp
    assert mcp is not None
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            assert names((await client.list_tools()).tools) == BUILTINS
            section = {"servers": {"search": {"url": search.url}}, "access": {"test": {}}}
            bg.run(mcp.apply(McpConfig.model_validate(section)))
            assert value(samples_of(gateway), UP, mcp_server_name="search") == 1
            assert names((await client.list_tools()).tools) == BUILTINS  # not allowed yet
            section["access"] = {"test": {"tools": ["search.echo"]}}
            bg.run(mcp.apply(McpConfig.model_validate(section)))
            assert names((await client.list_tools()).tools) == BUILTINS | {"search.echo"}
            assert text(await client.call_tool("search.echo", {"text": "hot"})) == "hot"
            assert console_servers(gateway) == {"search": True}
            bg.run(mcp.apply(McpConfig.model_validate({"servers": {}})))
            assert names((await client.list_tools()).tools) == BUILTINS
            assert value(samples_of(gateway), UP, mcp_server_name="search") is None
            # Its call counts stay in /metrics, but the console lists it no more.
            assert client_count(samples_of(gateway), "search", "echo", "") == 1
            assert console_servers(gateway) == {}
    finally:
        gateway.stop()


async def test_a_call_in_flight_across_a_reload_that_removes_its_server_keeps_its_labels(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path
) -> None:
    """A reload removes the server while a call to it is on the server: the call
    finishes on the old connection and is counted under its tool's name, on the
    gateway's endpoint as upstream, not as a call to an `unknown` tool."""
    gateway, mcp = open_to_all(bg, tmp_path, search={"url": search.url, "timeout_seconds": 10})
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            call = await on_the_server(client, "search.nap", {"seconds": 3})
            removed = McpConfig.model_validate({"servers": {}})
            await asyncio.wrap_future(bg.submit(mcp.apply(removed)))
            assert not call.done()  # the reload came first, the answer after it
            assert text(await call) == "napped 3.0"
        await eventually(lambda: front_count(samples_of(gateway), "search.nap", "") == 1, 5)
        samples = samples_of(gateway)
        assert front_count(samples, "unknown", "") == 0
        assert client_count(samples, "search", "nap", "") == 1
    finally:
        gateway.stop()


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_chat_the_client_cancels_is_metered_as_cancelled(
    bg: BackgroundLoop, tmp_path: Path, mode: str
) -> None:
    """A client cancels `chat` while the model answers (2026-07-28: it closes the
    request's stream; handshake era: `notifications/cancelled`). That is a caller who
    left, as an HTTP caller closing its connection: the model call in flight finishes
    and is billed, under `cancelled` / 499, not as a fault of the gateway."""
    config = simulated_config(latency_ms=1500)
    config["mcp"] = {"servers": {}}
    gateway = start_gateway(bg, config, tmp_path / "gw")
    deployment = gateway.runtime.plan.router.routes["sim"].deployments[0]
    try:
        async with connect(mcp_url(gateway), gateway.key, mode=mode) as client:
            call = asyncio.create_task(client.call_tool("chat", {"model": "sim", "prompt": "hi"}))
            await eventually(lambda: deployment.in_flight, within=10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await eventually(lambda: not deployment.in_flight, within=10)

        await eventually(lambda: gateway.ledger_rows("request_id LIKE 'mcp_%'"), within=10)
        (row,) = gateway.ledger_rows("request_id LIKE 'mcp_%'")
        assert (row["outcome"], row["status"]) == ("cancelled", 499)
        assert row["cost_nano"] > 0  # the model answered, and its provider bills that
        assert gateway.metric("metergate_requests_total", outcome="cancelled", api="chat") == 1
        assert gateway.metric("metergate_requests_total", outcome="gateway_error") == 0
    finally:
        gateway.stop()


@pytest.mark.parametrize("tool", ["hold", "slow"])
async def test_a_server_that_dies_mid_call_is_named_in_the_callers_error(
    bg: BackgroundLoop, tmp_path: Path, tool: str
) -> None:
    """The SDK ends a call whose server died under it with a bare -32000 ("Connection
    closed", for an SSE answer "SSE stream ended without a response"); with several
    servers behind the gateway the caller must learn which one."""
    doomed = HttpMcpServer(SEARCH_SERVER, free_port(), tmp_path / "doomed.log")
    doomed.start()
    gateway, mcp = open_to_all(bg, tmp_path, doomed={"url": doomed.url, "timeout_seconds": 20})
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            if tool == "hold":  # an SSE answer: it reports progress first
                call = await on_the_server(client, "doomed.hold", {"label": "doomed"})
            else:  # a JSON answer, the request on its way or on the server
                call = asyncio.create_task(client.call_tool("doomed.slow", {"seconds": 20}))
                await eventually(lambda: mcp.upstreams["doomed"]._in_flight, within=10)
            doomed.kill()
            with pytest.raises(MCPError) as raised:
                await call
        error = raised.value.error
        assert error.code == -32000
        assert error.message.startswith("MCP server 'doomed' failed: "), error.message
        assert client_count(samples_of(gateway), "doomed", tool, "transport") == 1
    finally:
        gateway.stop()
        doomed.stop()


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_call_whose_connection_drops_is_cancelled_not_timed_out(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path: Path, mode: str
) -> None:
    """The connection that carried a call closes under it, with no cancel notification
    (a killed agent). Nobody can receive the answer any more (handshake era too: no
    event store replays it on another stream), so the call is cancelled upstream at
    once and counted `cancelled` on both sides, not held until the server's
    timeout_seconds and then counted as the server's `timeout`."""
    gateway, _ = open_to_all(bg, tmp_path, search={"url": search.url, "timeout_seconds": 8})
    headers = {"Authorization": f"Bearer {gateway.key}"}
    try:
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(streamable_http_client(mcp_url(gateway), http_client=http), mode=mode) as client,
        ):
            call = await on_the_server(client, "search.hold", {"label": f"dropped-{mode}"})
            await http.aclose()  # the connection drops: the client says nothing more

            def ended() -> float:
                samples = samples_of(gateway)
                return sum(
                    client_count(samples, "search", "hold", e) for e in ("cancelled", "timeout")
                )

            await eventually(ended, within=20)
            call.cancel()
        samples = samples_of(gateway)
        assert client_count(samples, "search", "hold", "cancelled") == 1
        assert client_count(samples, "search", "hold", "timeout") == 0
        await eventually(lambda: front_count(samples_of(gateway), "search.hold", "cancelled"), 5)
        assert front_count(samples_of(gateway), "search.hold", "timeout") == 0
    finally:
        gateway.stop()
