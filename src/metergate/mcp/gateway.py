"""The metered MCP gateway: many MCP servers behind one streamable-HTTP endpoint.

Every upstream tool is listed as `server.tool`, next to metergate's own `chat`,
`list_models` and `usage`. Each HTTP request is authenticated with a gateway key before
the MCP SDK sees it (the key also owns any session it opens, so another key cannot use
that session), and each key sees and may call only the tools its allow-list names.
Every proxied call is timed into `mcp_client_operation_duration_seconds`, every request
on this endpoint into `mcp_server_operation_duration_seconds`, in the gateway's registry.
With `tracing:` on, each request is a server span and each proxied call a client span
(`metergate.mcp.spans`), exported with the gateway's other spans.

Wiring: `await gateway.start()` after the key index is loaded, route GET/POST/DELETE
`/mcp` to `gateway.handle` (or mount `gateway` as a plain ASGI app), and set
`gateway.app` to the gateway's ASGI app for the `chat` tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import orjson
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from mcp_types import (
    SERVER_INFO_META_KEY,
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
)
from prometheus_client import CollectorRegistry

from metergate import __version__
from metergate.asgi import Receive, Request, Scope, Send
from metergate.auth.keys import KeyRecord
from metergate.errors import GatewayError
from metergate.mcp.builtins import ASGIApp, Builtins
from metergate.mcp.config import SEPARATOR, McpConfig
from metergate.mcp.metrics import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    client_metrics,
    code_error_type,
    is_tool_error,
    server_metrics,
)
from metergate.mcp.middleware import MetricsMiddleware, replace_sdk_spans
from metergate.mcp.upstream import Upstream, mcp_error

if TYPE_CHECKING:
    from metergate.runtime import Runtime

log = logging.getLogger("metergate.mcp")

_KEY = "metergate.key"  # ASGI scope entry carrying the authenticated KeyRecord
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
INVALID_REQUEST = -32600

INSTRUCTIONS = (
    "metergate: tools of several MCP servers, named SERVER.TOOL, plus `chat` (ask a "
    "model), `list_models` and `usage` (this key's spend and budgets)."
)


class McpGateway:
    def __init__(
        self,
        config: McpConfig,
        runtime: Runtime,
        *,
        registry: CollectorRegistry | None = None,
        app: ASGIApp | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.app = app
        registry = runtime.metrics.registry if registry is None else registry
        self.client_metrics = client_metrics(registry)
        self.upstreams = {
            name: Upstream(name, server, config, self.client_metrics)
            for name, server in config.servers.items()
        }
        self.builtins = Builtins(runtime, lambda: self.app)
        self.server: Server[Any] = Server(
            "metergate",
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            get_tool_input_schema=self._input_schema,
        )
        replace_sdk_spans(self.server)  # the gateway's spans follow its `tracing:` config
        self.server.middleware.insert(
            0,
            MetricsMiddleware(
                server_metrics(registry), known_tool=self._known, tracer=self._tracer
            ),
        )
        # JSON answers, not SSE: the gateway does not relay progress notifications.
        self.sessions = StreamableHTTPSessionManager(self.server, json_response=True)
        self._http = StreamableHTTPASGIApp(self.sessions)
        self._principals: dict[str, AuthenticatedUser] = {}
        self._stop = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._ready = False

    async def start(self) -> None:
        """Serve sessions, connect every server; wait (bounded) for the first connections."""
        started = asyncio.Event()
        self._serving = asyncio.create_task(self._serve(started), name="mcp-gateway")
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({waiter, self._serving}, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():
            waiter.cancel()
            self._serving.result()  # raises why it stopped
        for upstream in self.upstreams.values():
            await upstream.start()
        first = [upstream.wait_first_attempt() for upstream in self.upstreams.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*first), self.config.connect_timeout_seconds + 1)
        self._ready = True
        up = sum(upstream.up for upstream in self.upstreams.values())
        log.info("MCP gateway: %d of %d servers up", up, len(self.upstreams))

    async def _serve(self, started: asyncio.Event) -> None:
        async with self.sessions.run():
            started.set()
            await self._stop.wait()

    async def close(self) -> None:
        self._ready = False
        await asyncio.gather(*(upstream.close() for upstream in self.upstreams.values()))
        self._stop.set()
        if self._serving is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serving, 10)
            self._serving = None

    async def apply(self, config: McpConfig) -> None:
        """Take a reloaded `mcp:` section without a restart.

        Access rules apply to the next request. A server whose settings changed (or any
        server, when the health or reconnection settings changed) is disconnected and
        connected again; removed servers are disconnected and their series dropped.
        """
        same = _settings(config) == _settings(self.config)
        old = self.upstreams
        kept = {
            name: upstream
            for name, upstream in old.items()
            if same and config.servers.get(name) == upstream.config
        }
        for name, upstream in old.items():
            if name not in kept:
                await upstream.close()
                if name not in config.servers:
                    self.client_metrics.up.remove(name)
        self.config = config
        self.upstreams = {
            name: kept.get(name) or Upstream(name, server, config, self.client_metrics)
            for name, server in config.servers.items()
        }
        fresh = [u for name, u in self.upstreams.items() if name not in kept]
        for upstream in fresh:
            await upstream.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(u.wait_first_attempt() for u in fresh)),
                config.connect_timeout_seconds + 1,
            )

    async def handle(self, request: Request, send: Send) -> None:
        """The route handler shape of `metergate.api.app.GatewayApp`."""
        await self._authenticated(request.scope, request.receive, send, request.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gateway as a plain ASGI app (HTTP only), for mounting anywhere."""
        if scope["type"] == "http":
            await self._authenticated(scope, receive, send, dict(scope["headers"]))

    async def _authenticated(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]
    ) -> None:
        if not self._ready:
            await _json_rpc_error(send, 503, "the MCP gateway is starting or stopping", "unready")
            return
        try:
            key = await self.runtime.keys.authenticate(headers)
        except GatewayError as error:
            await _json_rpc_error(send, error.status, error.message, error.code or "unauthorized")
            return
        scope = {**scope, _KEY: key, "user": self._principal(key)}
        await self._http(scope, receive, send)

    def _principal(self, key: KeyRecord) -> AuthenticatedUser:
        """The SDK binds a session to the principal that opened it: here, the key."""
        found = self._principals.get(key.id)
        if found is None:
            token = AccessToken(token=key.id, client_id=key.id, scopes=[])
            found = self._principals[key.id] = AuthenticatedUser(token)
        return found

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        key, _ = _caller(ctx)
        access = self.config.access_for(key.name)
        tools = list(self.builtins.tools.values())
        for name, upstream in self.upstreams.items():
            if access.may_use(name):
                tools.extend(t for own, t in upstream.listed.items() if access.allows(name, own))
        return ListToolsResult(tools=tools)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams
    ) -> CallToolResult:
        key, credentials = _caller(ctx)
        name = params.name
        if name in self.builtins.tools:
            return await self.builtins.call(name, params.arguments or {}, key, credentials)
        server, _, tool = name.partition(SEPARATOR)
        upstream = self.upstreams.get(server)
        # Not allowed and not there answer alike, so a key learns nothing of other tools.
        if (
            upstream is None
            or not tool
            or not self.config.access_for(key.name).allows(server, tool)
            or (upstream.up and not await upstream.knows(tool))
        ):
            raise mcp_error(INVALID_PARAMS, f"Unknown tool: {name}")
        tracer = self._tracer()
        if tracer is None:
            result = await upstream.call_tool(tool, params.arguments)
        else:
            result = await self._traced_call(tracer, key, upstream, tool, params.arguments)
        if result.meta and SERVER_INFO_META_KEY in result.meta:
            # The upstream's identity stamp would claim the answer came from it, not us.
            meta = {k: v for k, v in result.meta.items() if k != SERVER_INFO_META_KEY}
            result = result.model_copy(update={"meta": meta or None})
        return result

    def _tracer(self) -> Any:
        """The tracer of the MCP spans while the gateway's `tracing:` is on, else None."""
        return self.runtime.observers.mcp_tracer()

    async def _traced_call(
        self,
        tracer: Any,
        key: KeyRecord,
        upstream: Upstream,
        tool: str,
        arguments: dict[str, Any] | None,
    ) -> CallToolResult:
        from metergate.mcp import spans

        spans.annotate({"metergate.key": key.name, "metergate.mcp_server": upstream.name})
        span = spans.start_client_span(tracer, upstream.name, tool, upstream.config.url)
        error_type = ""
        try:
            with spans.current(span):  # the SDK puts it in `_meta.traceparent` upstream
                result = await upstream.call_tool(tool, arguments)
        except MCPError as error:
            error_type = code_error_type(error.error.code)
            raise
        except Exception:
            error_type = str(INTERNAL_ERROR)
            raise
        except BaseException:
            error_type = "timeout"  # the caller went away
            raise
        else:
            error_type = "tool_error" if is_tool_error(result) else ""
        finally:
            spans.end_span(span, error_type)
        return result

    def _known(self, name: str) -> bool:
        """Tool names that may become metric labels: ours, and the servers' listed ones."""
        if name in self.builtins.tools:
            return True
        server, _, tool = name.partition(SEPARATOR)
        upstream = self.upstreams.get(server)
        return upstream is not None and tool in upstream.tools

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        found = self.builtins.tools.get(name)
        if found is None:
            server, _, tool = name.partition(SEPARATOR)
            upstream = self.upstreams.get(server)
            found = upstream.tools.get(tool) if upstream is not None else None
        return None if found is None else dict(found.input_schema)


def _settings(config: McpConfig) -> dict[str, Any]:
    """The section's settings that every upstream connection depends on."""
    return config.model_dump(exclude={"servers", "access", "default_access"})


def _caller(ctx: ServerRequestContext[Any, Any]) -> tuple[KeyRecord, list[tuple[bytes, bytes]]]:
    """The key `_authenticated` put on this request's scope, and its credential headers."""
    scope = getattr(ctx.request, "scope", None) or {}
    key = scope.get(_KEY)
    if not isinstance(key, KeyRecord):
        raise mcp_error(INVALID_REQUEST, "request did not pass metergate's authentication")
    credentials = [(k, v) for k, v in scope["headers"] if k in _CREDENTIAL_HEADERS]
    return key, credentials


async def _json_rpc_error(send: Send, status: int, message: str, code: str) -> None:
    """An HTTP error whose body is a JSON-RPC error, so MCP clients surface its message."""
    body = orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {
                "code": INVALID_REQUEST,
                "message": f"HTTP {status}: {message} ({code})",
                "data": {"status": status, "code": code},
            },
        }
    )
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="metergate"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
