"""MCP spans with the MCP semantic conventions, decoded from real OTLP payloads: the
metrics middleware on an MCP server (given a tracer provider), and the MCP gateway
(with `tracing:` on), continuing the caller's trace from `params._meta.traceparent`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from metergate.mcp import instrument
from tests.harness import BackgroundLoop, Gateway, free_port, simulated_config, start_gateway
from tests.mcp_servers.support import HttpMcpServer, mcp_url
from tests.otlp import HttpCollector

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
META = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
TRACED_SERVER = Path(__file__).parent / "mcp_servers" / "traced_server.py"


@pytest.fixture
def collector(bg: BackgroundLoop) -> Iterator[HttpCollector]:
    receiver = HttpCollector(bg)
    yield receiver
    receiver.close()


def named(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (span,) = [s for s in spans if s["name"] == name]
    return span


async def test_middleware_spans_follow_the_mcp_conventions(collector: HttpCollector) -> None:
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=collector.endpoint), schedule_delay_millis=50)
    )
    server = MCPServer("traced")

    @server.tool()
    async def add(a: int, b: int) -> int:
        return a + b

    @server.tool()
    async def explode() -> str:
        raise ValueError("boom")

    instrument(server, registry=CollectorRegistry(), tracer_provider=provider)
    kinds = [type(m).__name__ for m in server._lowlevel_server.middleware]
    assert "OpenTelemetryMiddleware" not in kinds  # the SDK's own span middleware gave way
    async with Client(server) as client:
        assert (await client.call_tool("add", {"a": 1, "b": 2}, meta=META)).content[0].text == "3"
        assert (await client.call_tool("explode", {}, meta=META)).is_error
        with pytest.raises(MCPError):
            await client.read_resource("note://missing")
    provider.force_flush()
    spans = collector.wait(lambda s: len(s) >= 3)

    call = named(spans, "tools/call add")
    assert call["kind"] == "SERVER" and call["status"] == "UNSET"
    assert call["trace_id"] == TRACE and call["parent_span_id"] == PARENT
    attrs = call["attributes"]
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["gen_ai.tool.name"] == "add"
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["jsonrpc.request.id"]
    assert "error.type" not in attrs
    failed = named(spans, "tools/call explode")
    assert failed["status"] == "ERROR" and failed["attributes"]["error.type"] == "tool_error"
    missing = named(spans, "resources/read note://missing")
    assert missing["attributes"]["mcp.resource.uri"] == "note://missing"
    assert missing["status"] == "ERROR" and missing["attributes"]["error.type"]
    assert missing["parent_span_id"] is None  # no _meta: a trace of its own
    provider.shutdown()


@pytest.fixture
def traced_server(
    tmp_path: Path, collector: HttpCollector, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HttpMcpServer]:
    """An MCP server of its own (another process) exporting its spans to the collector."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector.endpoint)
    server = HttpMcpServer(TRACED_SERVER, free_port(), tmp_path / "traced.log")
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def connect(url: str, key: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def traced_gateway(
    bg: BackgroundLoop, collector: HttpCollector, mcp: dict[str, Any], tmp_path: Path
) -> Gateway:
    """A gateway with this `mcp:` section, exporting its spans to `collector` at once."""
    config = simulated_config()
    config["mcp"] = mcp
    config["tracing"] = {
        "enabled": True,
        "endpoint": collector.endpoint,
        "export_interval_seconds": 0.05,
    }
    return start_gateway(bg, config, tmp_path / "gw")


async def test_one_trace_runs_caller_gateway_mcp_server(
    bg: BackgroundLoop, traced_server: HttpMcpServer, collector: HttpCollector, tmp_path: Path
) -> None:
    mcp = {
        "servers": {"search": {"url": traced_server.url}},
        "access": {"test": {"servers": ["search"]}},
    }
    gateway = traced_gateway(bg, collector, mcp, tmp_path)
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            answer = await client.call_tool("search.lookup", {"text": "otel"}, meta=META)
            assert answer.content[0].text == "found otel"
            with pytest.raises(MCPError):
                await client.call_tool("search.nothing", {}, meta=META)
        spans = collector.wait(
            lambda s: (
                {"tools/call search.lookup", "tools/call lookup"} <= {x["name"] for x in s}
                and len([x for x in s if x["name"] == "tools/call lookup"]) == 2
                and any(x["name"] == "tools/call search.nothing" for x in s)
            )
        )
    finally:
        gateway.stop()
    front = named(spans, "tools/call search.lookup")
    behind, served = sorted(
        (s for s in spans if s["name"] == "tools/call lookup"), key=lambda s: s["kind"]
    )
    assert (front["kind"], behind["kind"], served["kind"]) == ("SERVER", "CLIENT", "SERVER")
    # caller -> gateway (server span) -> call (client span) -> MCP server (its server span)
    assert front["trace_id"] == behind["trace_id"] == served["trace_id"] == TRACE
    assert front["parent_span_id"] == PARENT
    assert behind["parent_span_id"] == front["span_id"]
    assert served["parent_span_id"] == behind["span_id"]
    assert front["resource"]["service.name"] == "metergate"
    assert served["resource"]["service.name"] == "traced-search"
    assert front["attributes"]["metergate.key"] == "test"
    assert front["attributes"]["mcp.protocol.version"]
    assert front["attributes"]["gen_ai.tool.name"] == "search.lookup"
    assert behind["attributes"]["metergate.mcp_server"] == "search"
    assert behind["attributes"]["gen_ai.tool.name"] == "lookup"
    assert behind["attributes"]["server.address"] == "127.0.0.1"
    assert served["attributes"]["jsonrpc.request.id"]
    assert front["start"] <= behind["start"] <= behind["end"] <= front["end"]
    unknown = named(spans, "tools/call search.nothing")
    assert unknown["status"] == "ERROR" and unknown["attributes"]["error.type"] == "-32602"


async def test_the_chat_tool_s_model_call_joins_the_mcp_call_s_trace(
    bg: BackgroundLoop, collector: HttpCollector, tmp_path: Path
) -> None:
    """The built-in `chat` tool calls a model through the gateway's own chat door: that
    request's spans are children of the `tools/call chat` span, in the caller's trace,
    and name the caller's key, as any other call's."""
    gateway = traced_gateway(bg, collector, {"servers": {}}, tmp_path)
    try:
        async with connect(mcp_url(gateway), gateway.key) as client:
            answer = await client.call_tool("chat", {"model": "sim", "prompt": "hi"}, meta=META)
            assert not answer.is_error
        spans = collector.wait(lambda s: {"tools/call chat", "chat sim"} <= {x["name"] for x in s})
    finally:
        gateway.stop()
    tool, model = named(spans, "tools/call chat"), named(spans, "chat sim")
    assert tool["trace_id"] == model["trace_id"] == TRACE
    assert model["parent_span_id"] == tool["span_id"]
    assert tool["attributes"]["metergate.key"] == model["attributes"]["metergate.key"] == "test"
