"""Prometheus metrics for any Python MCP server built on the `mcp` 2.x SDK, in two lines.

    from metergate.mcp import instrument
    instrument(mcp)                       # streamable HTTP: GET /metrics beside /mcp
    instrument(mcp, metrics_port=9464)    # stdio: http://127.0.0.1:9464/metrics

It is one server middleware `(ctx, call_next)`, first in the chain, so each request's
time covers everything the SDK does for it. It observes and re-raises; it never changes
a result, except that an optional `timeout_seconds` turns an overlong request into a
JSON-RPC timeout error. Given an OpenTelemetry tracer provider (`tracer_provider=`), it
also makes a span per request with the MCP semantic conventions (`metergate.mcp.spans`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import ErrorData
from mcp_types import methods as _methods
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from metergate.mcp.metrics import (
    CANCELLED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    REQUEST_TIMEOUT,
    UNKNOWN_TOOL,
    ServerMetrics,
    code_error_type,
    is_tool_error,
    server_metrics,
)

_KNOWN_METHODS = frozenset({*_methods.SPEC_CLIENT_METHODS, "initialize"})
_MAX_LEARNED_TOOLS = 10_000
_LISTEN = "subscriptions/listen"  # a stream of notifications, timed from opening to close


class MetricsMiddleware:
    """Times every request (not notifications) into `mcp_server_operation_duration_seconds`
    and every handshake-era session into `mcp_server_session_duration_seconds`.

    `known_tool` says whether a `tools/call` name is a real tool, so that an unknown name
    is labelled `unknown` instead of becoming a series; without it, names are learned from
    the server's own `tools/list` answers. A request the client abandons (its timeout, a
    cancel notification, a dropped connection) is cancelled and counted as `cancelled`,
    not as the server's `timeout`; a `subscriptions/listen` stream lasts until the client
    closes it, which is no error.
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        *,
        known_tool: Callable[[str], bool] | None = None,
        known_method: Callable[[str], bool] | None = None,
        timeout_seconds: float | None = None,
        tracer: Callable[[], Any] | None = None,
        sessions: bool = True,
    ) -> None:
        self.metrics = metrics
        self.sessions = sessions  # False: requests stand alone (stateless), no sessions
        self.known_tool = known_tool
        self.known_method = known_method or _KNOWN_METHODS.__contains__
        self.timeout_seconds = timeout_seconds
        self.tracer = tracer  # the OpenTelemetry tracer of the spans, or None: no spans
        self._listed: set[str] = set()

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if ctx.request_id is None:  # a notification: no response, nothing to time
            return await call_next(ctx)
        tracer = self.tracer() if self.tracer is not None else None
        if tracer is None:
            return await self._observe(ctx, call_next, None)
        from metergate.mcp import spans

        span = spans.start_server_span(tracer, ctx, self.known_method(ctx.method))
        with spans.current(span):
            return await self._observe(ctx, call_next, span)

    async def _observe(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, span: Any
    ) -> HandlerResult:
        started = time.perf_counter()
        method = ctx.method
        names = self._names(ctx, method)
        error_type = ""
        try:
            if self.timeout_seconds is None:
                result = await call_next(ctx)
            else:
                result = await self._with_deadline(ctx, call_next)
        except MCPError as exc:
            error_type = code_error_type(exc.error.code)
            raise
        except ValidationError:
            error_type = str(INVALID_PARAMS)  # what the SDK answers on the wire
            raise
        except Exception:
            error_type = str(INTERNAL_ERROR)
            raise
        except BaseException as exc:
            # Cancelled: the client stopped waiting (or the server is stopping). A listen
            # stream has no answer to wait for: the client closing it is its normal end.
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            if not cancelled:
                error_type = str(INTERNAL_ERROR)
            elif method != _LISTEN:
                error_type = CANCELLED
            raise
        else:
            if method == "tools/call" and is_tool_error(result):
                error_type = "tool_error"
        finally:
            seconds = time.perf_counter() - started
            if names[1] == UNKNOWN_TOOL:  # a tool that appeared during the call (a relist)
                names = self._names(ctx, method)
            self.metrics.operation.observe((*names, error_type), seconds)
            if span is not None:
                from metergate.mcp.spans import end_span

                end_span(span, error_type)
            if method == "initialize" and self.sessions:
                self._session_started(ctx, started, error_type)
        if method == "tools/list":
            self._learn(result)
        return result

    async def _with_deadline(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        assert self.timeout_seconds is not None
        with anyio.move_on_after(self.timeout_seconds):
            return await call_next(ctx)
        raise MCPError.from_error_data(
            ErrorData(
                code=REQUEST_TIMEOUT,
                message=f"{ctx.method} did not finish within the server's "
                f"{self.timeout_seconds:g} s limit",
            )
        )

    def _names(self, ctx: ServerRequestContext[Any, Any], method: str) -> tuple[str, str]:
        """The method and tool labels, taken when the request arrives: a reload that
        removes or renames a tool's server while the call is in flight must not turn
        the call, once finished, into one to an `unknown` tool."""
        if not self.known_method(method):
            return ("unknown", "")
        if method != "tools/call":
            return (method, "")
        name = ctx.params.get("name") if ctx.params else None
        if not isinstance(name, str) or not self._is_tool(name):
            name = UNKNOWN_TOOL
        return (method, name)

    def _is_tool(self, name: str) -> bool:
        if self.known_tool is not None:
            return self.known_tool(name)
        return name in self._listed

    def _learn(self, result: HandlerResult) -> None:
        if self.known_tool is not None or not isinstance(result, dict):
            return
        for tool in result.get("tools") or ():
            name = tool.get("name") if isinstance(tool, dict) else None
            if isinstance(name, str) and len(self._listed) < _MAX_LEARNED_TOOLS:
                self._listed.add(name)

    def _session_started(
        self, ctx: ServerRequestContext[Any, Any], started: float, error_type: str
    ) -> None:
        """Observe the session when its connection closes (client DELETE, idle reap, EOF).

        A refused handshake is a session that ended at once, with the handshake's error.
        The SDK keeps per-connection teardown on `Connection.exit_stack` but hands
        middleware only the session proxy; `_connection` is the way there in mcp 2.x.
        """
        session = self.metrics.session
        if error_type:
            session.observe((error_type,), time.perf_counter() - started)
            return
        connection = getattr(ctx.session, "_connection", None)
        exit_stack = getattr(connection, "exit_stack", None)
        if exit_stack is None:
            return

        def ended() -> None:
            session.observe(("",), time.perf_counter() - started)

        exit_stack.callback(ended)


@dataclass
class Instrumentation:
    """What `instrument` attached: keep it to stop the stdio metrics listener (`close`)."""

    middleware: MetricsMiddleware
    registry: CollectorRegistry
    metrics_port: int | None = None
    _listener: Any = field(default=None, repr=False)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.shutdown()
            self._listener.server_close()
            self._listener = None


def instrument(
    server: MCPServer | Server[Any],
    *,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    timeout_seconds: float | None = None,
    tracer_provider: Any = None,
) -> Instrumentation:
    """Add Prometheus metrics to an MCP server; call it before the server runs.

    An `MCPServer` gets `GET /metrics` on its streamable-HTTP app, beside `/mcp`. For
    stdio (no HTTP of its own), pass `metrics_port` to serve them on
    `http://{metrics_host}:{metrics_port}/metrics` from a thread. A low-level `Server`
    takes the route as `streamable_http_app(custom_starlette_routes=[metrics_route()])`.
    `timeout_seconds` bounds each request; past it the client gets a JSON-RPC
    -32001 error and the metric `error_type="timeout"`. `tracer_provider` (an
    OpenTelemetry `TracerProvider`) makes a span per request on that provider,
    continuing the caller's trace from `params._meta.traceparent` or the HTTP
    `traceparent` header, with the same `error.type` as the metrics; it takes the place
    of the SDK's own span middleware (which reports to the global provider), so a
    request is not traced twice.
    """
    registry = REGISTRY if registry is None else registry
    lowlevel: Server[Any] = server._lowlevel_server if isinstance(server, MCPServer) else server
    if any(isinstance(m, MetricsMiddleware) for m in lowlevel.middleware):
        raise RuntimeError(f"MCP server {lowlevel.name!r} is instrumented already")
    schema = lowlevel.get_tool_input_schema  # MCPServer's: a dict lookup, None when unknown
    middleware = MetricsMiddleware(
        server_metrics(registry),
        known_tool=None if schema is None else (lambda name: schema(name) is not None),
        known_method=lambda method: (
            method in _KNOWN_METHODS or lowlevel.get_request_handler(method) is not None
        ),
        timeout_seconds=timeout_seconds,
    )
    if tracer_provider is not None:
        tracer = tracer_provider.get_tracer("metergate.mcp")
        middleware.tracer = lambda: tracer
        replace_sdk_spans(lowlevel)
    lowlevel.middleware.insert(0, middleware)
    if isinstance(server, MCPServer):
        server.custom_route("/metrics", methods=["GET"])(_metrics_endpoint(registry))
    listener = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        listener, _ = start_http_server(metrics_port, addr=metrics_host, registry=registry)
    return Instrumentation(middleware, registry, metrics_port, listener)


def replace_sdk_spans(server: Server[Any]) -> None:
    """Remove the `mcp` SDK's own OpenTelemetry middleware (on by default since 2.x, on
    the global tracer provider): metergate's makes the MCP spans instead."""
    server.middleware[:] = [
        m for m in server.middleware if type(m).__name__ != "OpenTelemetryMiddleware"
    ]


def metrics_route(registry: CollectorRegistry | None = None, path: str = "/metrics") -> Route:
    """`GET /metrics` as a Starlette route, for apps that assemble their own routes."""
    return Route(
        path, _metrics_endpoint(REGISTRY if registry is None else registry), methods=["GET"]
    )


def _metrics_endpoint(registry: CollectorRegistry) -> Callable[[Request], Any]:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
