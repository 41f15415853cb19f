"""The MCP metrics middleware on real MCP servers (a streamable-HTTP and a stdio process).

Driven with the official `mcp` client; assertions are on the exact samples the servers
export: label values, counts and cumulative bucket counts.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.server import MCPServer, Server
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ListToolsResult, TextContent, Tool
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from metergate.mcp import instrument
from metergate.mcp.middleware import metrics_route
from tests.harness import free_port
from tests.mcp_servers.support import (
    FILES_SERVER,
    SEARCH_SERVER,
    HttpMcpServer,
    Samples,
    buckets,
    eventually,
    parse,
    registry_samples,
    scrape,
    value,
)

OP = "mcp_server_operation_duration_seconds"
SESSION = "mcp_server_session_duration_seconds"
LE_ALL = ("0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1.0", "2.0", "5.0", "10.0", "30.0")
LE_ALL = (*LE_ALL, "60.0", "120.0", "300.0", "+Inf")


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpMcpServer]:
    log = tmp_path_factory.mktemp("search") / "search.log"
    server = HttpMcpServer(SEARCH_SERVER, free_port(), log)
    server.start()
    yield server
    server.stop()


def count(samples: Samples, tool: str, error_type: str, method: str = "tools/call") -> float:
    labels = {"mcp_method_name": method, "gen_ai_tool_name": tool, "error_type": error_type}
    return value(samples, f"{OP}_count", **labels) or 0.0


async def test_http_server_exports_calls_by_tool_and_outcome(search: HttpMcpServer) -> None:
    before = scrape(search.metrics_url)
    async with Client(search.url) as client:
        for word in ("alpha", "beta", "gamma"):
            result = await client.call_tool("query", {"text": word})
            assert result.content[0].text == f"3 results for {word!r}"
        failed = await client.call_tool("fail", {"reason": "index offline"})
        assert failed.is_error and failed.content[0].text.endswith("index offline")
        unknown = await client.call_tool("no-such-tool-42", {})
        assert unknown.is_error
    after = scrape(search.metrics_url)

    assert count(after, "query", "") - count(before, "query", "") == 3
    assert count(after, "fail", "tool_error") - count(before, "fail", "tool_error") == 1
    assert count(after, "unknown", "tool_error") - count(before, "unknown", "tool_error") == 1
    # a caller's free text never becomes a label value
    assert not [key for key in after if ("gen_ai_tool_name", "no-such-tool-42") in key[1]]
    # every bucket of a fresh series is cumulative, ending at the count; loopback is fast
    labels = {"mcp_method_name": "tools/call", "gen_ai_tool_name": "query", "error_type": ""}
    series = buckets(after, OP, **labels)
    assert list(series) == list(LE_ALL)
    assert series["+Inf"] == count(after, "query", "")
    assert series["0.5"] == series["+Inf"]
    counts = list(series.values())
    assert counts == sorted(counts)


async def test_a_call_the_client_abandons_is_cancelled(search: HttpMcpServer) -> None:
    """The client gave up (here its own read timeout; an interrupted agent looks the same
    to the server): `cancelled`, not the server's `timeout`."""
    labels = {
        "mcp_method_name": "tools/call",
        "gen_ai_tool_name": "slow",
        "error_type": "cancelled",
    }
    before = scrape(search.metrics_url)
    async with Client(search.url) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("slow", {"seconds": 5}, read_timeout_seconds=0.3)
        assert raised.value.error.code == -32001
    old = count(before, "slow", "cancelled")
    after = await eventually(
        lambda: (s := scrape(search.metrics_url)) and count(s, "slow", "cancelled") > old and s,
        within=5,
    )
    assert count(after, "slow", "cancelled") == old + 1
    assert count(after, "slow", "timeout") == count(before, "slow", "timeout")
    was, now = buckets(before, OP, **labels), buckets(after, OP, **labels)
    grew = [now[le] - was.get(le, 0) for le in LE_ALL]  # about 0.3 s: above 0.2, below 2
    low, high = LE_ALL.index("0.2") + 1, LE_ALL.index("2.0")
    assert grew[:low] == [0] * low and grew[high:] == [1] * (len(LE_ALL) - high)
    assert grew == sorted(grew)


async def test_handshake_sessions_are_timed_until_the_client_leaves(search: HttpMcpServer) -> None:
    def sessions(samples: Samples) -> float:
        return value(samples, f"{SESSION}_count", error_type="") or 0.0

    before = sessions(scrape(search.metrics_url))
    async with Client(search.url, mode="legacy") as client:
        assert client.protocol_version.startswith("2025")
        assert (await client.call_tool("echo", {"text": "hi"})).content[0].text == "hi"
        assert sessions(scrape(search.metrics_url)) == before  # still open
    samples = await eventually(
        lambda: (s := scrape(search.metrics_url)) and sessions(s) > before and s, within=5
    )
    assert sessions(samples) == before + 1
    assert (value(samples, f"{OP}_count", **_labels("initialize")) or 0) >= 1


def _labels(method: str) -> dict[str, str]:
    return {"mcp_method_name": method, "gen_ai_tool_name": "", "error_type": ""}


async def test_stdio_server_serves_metrics_on_its_own_port() -> None:
    port = free_port()
    params = StdioServerParameters(command=sys.executable, args=[str(FILES_SERVER), str(port)])
    async with Client(params) as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == {
            "read",
            "list",
            "slow",
            "pid",
            "write",
            "big",
        }
        assert (await client.call_tool("read", {"path": "readme.md"})).content[0].text == "# hello"
        assert (await client.call_tool("read", {"path": "notes.txt"})).content[0].text == "buy milk"
        missing = await client.call_tool("read", {"path": "secret"})
        assert missing.is_error
        samples = scrape(f"http://127.0.0.1:{port}/metrics")  # the process is alive until exit

    assert count(samples, "read", "") == 2
    assert count(samples, "read", "tool_error") == 1
    assert value(samples, f"{OP}_count", **_labels("tools/list")) == 1
    series = buckets(
        samples, OP, mcp_method_name="tools/call", gen_ai_tool_name="read", error_type=""
    )
    assert series["+Inf"] == 2 and series["0.5"] == 2
    label_sets = {dict(labels).get("mcp_method_name") for (_, labels) in samples}
    assert label_sets >= {"tools/call", "tools/list"}


async def test_server_side_deadline_answers_timeout_in_process() -> None:
    registry = CollectorRegistry()
    server = MCPServer("deadline")

    @server.tool()
    async def wait(seconds: float) -> str:
        import anyio

        await anyio.sleep(seconds)
        return "finished"

    instrumentation = instrument(server, registry=registry, timeout_seconds=0.25)
    with pytest.raises(RuntimeError, match="instrumented already"):
        instrument(server, registry=registry)
    async with Client(server) as client:
        assert (await client.call_tool("wait", {"seconds": 0})).content[0].text == "finished"
        with pytest.raises(MCPError) as raised:
            await client.call_tool("wait", {"seconds": 3})
        assert raised.value.error.code == -32001
        assert "0.25 s limit" in raised.value.error.message
    samples = registry_samples(registry)
    assert count(samples, "wait", "") == 1
    assert count(samples, "wait", "timeout") == 1
    series = buckets(
        samples, OP, mcp_method_name="tools/call", gen_ai_tool_name="wait", error_type="timeout"
    )
    assert series["0.2"] == 0 and series["0.5"] == 1 and series["+Inf"] == 1
    assert instrumentation.metrics_port is None


async def test_a_low_level_server_learns_tool_names_from_its_own_listing() -> None:
    registry = CollectorRegistry()

    async def list_tools(ctx: Any, params: Any) -> ListToolsResult:
        return ListToolsResult(tools=[Tool(name="add", input_schema={"type": "object"})])

    async def call_tool(ctx: Any, params: Any) -> CallToolResult:
        if params.name != "add":
            raise MCPError(-32602, f"Unknown tool: {params.name}")
        return CallToolResult(content=[TextContent(type="text", text="3")])

    server: Server[Any] = Server("low", on_list_tools=list_tools, on_call_tool=call_tool)
    instrument(server, registry=registry)
    async with Client(server) as client:
        await client.call_tool("add", {})  # not listed yet: its name is not trusted
        await client.list_tools()
        await client.call_tool("add", {})
        with pytest.raises(MCPError):
            await client.call_tool("zzz", {})
    samples = registry_samples(registry)
    assert count(samples, "unknown", "") == 1
    assert count(samples, "add", "") == 1
    assert count(samples, "unknown", "-32602") == 1

    app = Starlette(routes=[metrics_route(registry)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert parse(response.text) == registry_samples(registry)


async def test_error_codes_a_server_makes_up_share_one_label() -> None:
    """A server may answer any integer as its error code, even one its caller chose:
    each would be a new series. The codes JSON-RPC and MCP define are labels as they
    are; any other is `_OTHER`."""
    registry = CollectorRegistry()

    async def list_tools(ctx: Any, params: Any) -> ListToolsResult:
        return ListToolsResult(tools=[Tool(name="fail", input_schema={"type": "object"})])

    async def call_tool(ctx: Any, params: Any) -> CallToolResult:
        raise MCPError(int(params.arguments["code"]), "as asked")

    server: Server[Any] = Server("codes", on_list_tools=list_tools, on_call_tool=call_tool)
    instrument(server, registry=registry)
    async with Client(server) as client:
        await client.list_tools()
        for code in (100_001, 100_002, -31999, 7, -32602):
            with pytest.raises(MCPError):
                await client.call_tool("fail", {"code": code})
    samples = registry_samples(registry)
    assert count(samples, "fail", "_OTHER") == 4
    assert count(samples, "fail", "-32602") == 1
    kinds = {dict(labels).get("error_type") for (name, labels) in samples if name == f"{OP}_count"}
    assert kinds <= {"", "_OTHER", "-32602"}, kinds


def test_docs_show_the_two_lines_the_test_server_uses() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "mcp.md").read_text()
    server = SEARCH_SERVER.read_text()
    assert "pip install 'metergate[mcp]'" in docs
    for line in ("from metergate.mcp import instrument", "instrument(mcp)"):
        assert re.search(rf"^{re.escape(line)}$", server, re.M), line
        assert re.search(rf"^{re.escape(line)}", docs, re.M), line
