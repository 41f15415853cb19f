"""The MCP metrics of the contract, and the one rule that turns an outcome into `error_type`.

Names follow the OpenTelemetry MCP semantic conventions (dots become underscores), so
dashboards built for those work unchanged. `error_type` is empty on success, else the
JSON-RPC error code (one JSON-RPC or MCP defines; `_OTHER` for any other), `tool_error`
(a result with isError), `timeout`, `transport` or `cancelled`: the caller stopped waiting
(its own timeout, a cancel notification, a closed connection), which says nothing about the
server, so the error-rate rules leave it out, as the LLM side does its `cancelled` outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

MCP_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

# JSON-RPC codes with a name of their own in the contract (see mcp_types.jsonrpc).
CONNECTION_CLOSED = -32000
REQUEST_TIMEOUT = -32001
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# What the SDK's client raises when a server's answer is not JSON-RPC it can read.
BROKEN_ANSWER = frozenset({-32700, -32600})  # parse error, invalid request

UNKNOWN_TOOL = "unknown"
"""`gen_ai_tool_name` of a call to a tool the server does not have: label values never
come from request text, or a caller could create series without bound."""


# The codes JSON-RPC and MCP define, which are labels as they are; a server may answer
# any other integer (from its caller's arguments, say), so any other is `_OTHER`, as
# OpenTelemetry bounds `error.type`: else series would grow without bound.
KNOWN_CODES = frozenset({-32700, -32600, -32601, -32602, -32603, -32002, -32042})
OTHER_CODE = "_OTHER"
CANCELLED = "cancelled"


def code_error_type(code: int) -> str:
    """`error_type` of a JSON-RPC error code; timeouts and lost connections by name."""
    if code == REQUEST_TIMEOUT:
        return "timeout"
    if code == CONNECTION_CLOSED:
        return "transport"
    return str(code) if code in KNOWN_CODES else OTHER_CODE


def is_tool_error(result: Any) -> bool:
    """A `tools/call` result that reports failure in-band (`isError`), as model or wire dict."""
    if isinstance(result, Mapping):
        return result.get("isError") is True
    return getattr(result, "is_error", False) is True


class _Labelled:
    """Children of one histogram cached per label tuple: one dict lookup per observation."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.children: dict[tuple[str, ...], Any] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.histogram.labels(*labels)
        child.observe(seconds)


class ServerMetrics:
    """What an MCP server exports: its operations and its sessions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.operation = _Labelled(
            Histogram(
                "mcp_server_operation_duration_seconds",
                "MCP requests handled, by method, tool and error type.",
                ["mcp_method_name", "gen_ai_tool_name", "error_type"],
                buckets=MCP_BUCKETS,
                registry=registry,
            )
        )
        self.session = _Labelled(
            Histogram(
                "mcp_server_session_duration_seconds",
                "MCP sessions (initialize handshake to connection close), by error type.",
                ["error_type"],
                buckets=MCP_BUCKETS,
                registry=registry,
            )
        )


class ClientMetrics:
    """What the MCP gateway exports about the servers behind it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.operation = _Labelled(
            Histogram(
                "mcp_client_operation_duration_seconds",
                "MCP requests the gateway sent upstream, by server, method, tool and error type.",
                ["mcp_server_name", "mcp_method_name", "gen_ai_tool_name", "error_type"],
                buckets=MCP_BUCKETS,
                registry=registry,
            )
        )
        self.up = Gauge(
            "metergate_mcp_server_up",
            "1 while the gateway holds a working connection to the MCP server, else 0.",
            ["mcp_server_name"],
            registry=registry,
            multiprocess_mode="livemin",
        )


_lock = threading.Lock()
_server_metrics: dict[int, ServerMetrics] = {}
_client_metrics: dict[int, ClientMetrics] = {}


def server_metrics(registry: CollectorRegistry) -> ServerMetrics:
    """One set per registry, so several servers in one process share (not re-register) them."""
    with _lock:
        found = _server_metrics.get(id(registry))
        if found is None or found.registry is not registry:
            found = _server_metrics[id(registry)] = ServerMetrics(registry)
        return found


def client_metrics(registry: CollectorRegistry) -> ClientMetrics:
    with _lock:
        found = _client_metrics.get(id(registry))
        if found is None or found.registry is not registry:
            found = _client_metrics[id(registry)] = ClientMetrics(registry)
        return found
