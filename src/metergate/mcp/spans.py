"""OpenTelemetry spans of MCP requests, per the MCP semantic conventions.

A server span per request (`{mcp.method.name} {target}`, kind SERVER: `mcp.method.name`,
`gen_ai.tool.name` and `gen_ai.operation.name = execute_tool` for tool calls,
`jsonrpc.request.id`, `mcp.session.id`, `mcp.protocol.version`, `error.type`), whose
parent is the caller's context from `params._meta` (`traceparent`, as the conventions
propagate it) or else the HTTP request's headers; and, in the gateway, a client span per
call to an MCP server behind it. Used only when a tracer is given, so the OpenTelemetry
API is imported only then.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_TARGETS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


def _carrier(ctx: Any) -> dict[str, str]:
    """W3C trace context of an MCP request: `params._meta` first, then HTTP headers."""
    meta = ctx.meta if isinstance(ctx.meta, Mapping) else {}
    if isinstance(meta.get("traceparent"), str):
        return {k: meta[k] for k in ("traceparent", "tracestate") if isinstance(meta.get(k), str)}
    headers = getattr(ctx.request, "headers", None)
    if headers is None:
        return {}
    return {k: headers[k] for k in ("traceparent", "tracestate") if headers.get(k)}


def start_server_span(tracer: Any, ctx: Any, known_method: bool) -> Span:
    method = ctx.method if known_method else "unknown"
    params = ctx.params if isinstance(ctx.params, Mapping) else {}
    attributes: dict[str, Any] = {"mcp.method.name": method}
    target = None
    if method == "tools/call":
        attributes["gen_ai.operation.name"] = "execute_tool"
        if isinstance(params.get("name"), str):
            attributes["gen_ai.tool.name"] = target = params["name"]
    elif method in _TARGETS and isinstance(params.get(_TARGETS[method]), str):
        target = params[_TARGETS[method]]
        key = "gen_ai.prompt.name" if method == "prompts/get" else "mcp.resource.uri"
        attributes[key] = target
    if ctx.request_id is not None:
        attributes["jsonrpc.request.id"] = str(ctx.request_id)
    if getattr(ctx, "protocol_version", None):
        attributes["mcp.protocol.version"] = ctx.protocol_version
    headers = getattr(ctx.request, "headers", None)
    session = headers.get("mcp-session-id") if headers is not None else None
    if session:
        attributes["mcp.session.id"] = session
        attributes["network.transport"] = "tcp"
    parent = _PROPAGATOR.extract(_carrier(ctx))
    name = f"{method} {target}" if target else method
    return tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def end_span(span: Span, error_type: str, message: str | None = None) -> None:
    if error_type:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, message or error_type))
    span.end()


@contextmanager
def current(span: Span) -> Iterator[None]:
    """Make `span` the parent of spans started inside (the gateway's client spans)."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def start_client_span(tracer: Any, server: str, tool: str, url: str | None) -> Span:
    """The gateway calling `tool` on the MCP server `server` (a child of the current span)."""
    attributes: dict[str, Any] = {
        "mcp.method.name": "tools/call",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool,
        "metergate.mcp_server": server,
    }
    if url:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return tracer.start_span(f"tools/call {tool}", kind=SpanKind.CLIENT, attributes=attributes)


def trace_headers() -> list[tuple[bytes, bytes]]:
    """The current span's W3C trace context as HTTP headers: a request the gateway makes
    to itself (the `chat` tool's) joins the trace of the MCP call it serves."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return [(name.encode(), value.encode()) for name, value in carrier.items()]


def annotate(attributes: dict[str, Any]) -> None:
    """Add attributes to the current span (the gateway's server span: the caller's key)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)
