"""The metered MCP gateway: many MCP servers behind one streamable-HTTP endpoint.

Every upstream tool is listed as `server.tool`, next to metergate's own `chat`,
`list_models` and `usage`; prompts as `server.prompt`, resources as
`metergate://server/URI` (see `naming`). Each HTTP request is authenticated with a
gateway key before the MCP SDK sees it (the key also owns any session it opens, so
another key cannot use that session), and each key sees and may use only what its
allow-list names. Progress an upstream reports reaches the caller under the caller's
token; a caller that cancels (or leaves) cancels the upstream request. The gateway
announces only what its servers offer. Every request to an upstream is timed into
`mcp_client_operation_duration_seconds`, every request on this endpoint into
`mcp_server_operation_duration_seconds`, in the gateway's registry.
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mcp_types as types
import orjson
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
)
from prometheus_client import CollectorRegistry

from metergate import __version__
from metergate.asgi import Message, Receive, Request, Scope, Send
from metergate.auth.keys import KeyRecord
from metergate.errors import GatewayError
from metergate.mcp.builtins import ASGIApp, Builtins
from metergate.mcp.catalog import PROMPTS, RESOURCES, TEMPLATES, Catalog, offers, own_tool_result
from metergate.mcp.config import McpAccess, McpConfig
from metergate.mcp.departure import DEPARTURE, Departure, cancel_on_departure
from metergate.mcp.listeners import Listeners
from metergate.mcp.metrics import (
    CANCELLED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    client_metrics,
    code_error_type,
    is_tool_error,
    server_metrics,
)
from metergate.mcp.middleware import MetricsMiddleware, replace_sdk_spans
from metergate.mcp.naming import split_name
from metergate.mcp.upstream import Upstream, mcp_error
from metergate.metering.metrics import multiprocess_dir
from metergate.metering.multiprocess import remove_series

if TYPE_CHECKING:
    from metergate.runtime import Runtime

log = logging.getLogger("metergate.mcp")

_KEY = "metergate.key"  # ASGI scope entry carrying the authenticated KeyRecord
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
INVALID_REQUEST = -32600

INSTRUCTIONS = (
    "metergate: tools and prompts of several MCP servers, named SERVER.NAME, and their "
    "resources as metergate://SERVER/URI, plus `chat` (ask a model), `list_models` and "
    "`usage` (this key's spend and budgets)."
)


class _Front(Server[Any]):
    """The gateway's own MCP server; it announces what its upstream servers offer."""

    offers: Callable[[], dict[str, Any]] = dict

    def get_capabilities(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
        *,
        protocol_version: str | None = None,
    ) -> types.ServerCapabilities:
        own = super().get_capabilities(
            notification_options,
            experimental_capabilities,
            extensions,
            protocol_version=protocol_version,
        )
        return own.model_copy(update=self.offers())


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
        self.catalog = Catalog(lambda: self.upstreams)
        self.listeners = Listeners(
            self.catalog, lambda: self.upstreams, lambda key: self.config.access_for(key)
        )
        self.upstreams = {name: self._upstream(name, config) for name in config.servers}
        self.builtins = Builtins(runtime, lambda: self.app)
        self.server = _Front(
            "metergate",
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            get_tool_input_schema=self._input_schema,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=self._listen,
            on_list_prompts=self._list_prompts,
            on_get_prompt=self._get_prompt,
        )
        self.server.offers = self._offers
        replace_sdk_spans(self.server)  # the gateway's spans follow its `tracing:` config
        # SSE answers where needed: progress rides the request's stream, and a client
        # that closes it (either era: `departure`) or sends notifications/cancelled
        # cancels the call.
        # A handshake session lives in one process's memory: with several workers on the
        # port its next request may reach another, so there each request stands alone.
        stateless = config.stateless
        if stateless is None:
            stateless = multiprocess_dir() is not None  # set by serve --workers N > 1
        self.server.middleware.insert(
            0,
            MetricsMiddleware(
                server_metrics(registry),
                known_tool=self._known,
                tracer=self._tracer,
                sessions=not stateless,  # stateless: a handshake's "session" is one request
            ),
        )
        self.server.middleware.insert(0, cancel_on_departure)
        self.sessions = StreamableHTTPSessionManager(
            self.server, json_response=False, stateless=stateless
        )
        self._http = StreamableHTTPASGIApp(self.sessions)
        self._principals: dict[str, AuthenticatedUser] = {}
        self._stop = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None
        self._ready = False
        self._retiring: set[Upstream] = set()  # replaced by a reload, finishing their calls
        self._retirements: set[asyncio.Task[None]] = set()

    def _retire(self, upstream: Upstream) -> None:
        async def retire() -> None:
            try:
                await upstream.retire()
            finally:
                self._retiring.discard(upstream)

        self._retiring.add(upstream)
        task = asyncio.create_task(retire(), name=f"mcp-retire-{upstream.name}")
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

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

    def _upstream(self, name: str, config: McpConfig) -> Upstream:
        return Upstream(
            name,
            config.servers[name],
            config,
            self.client_metrics,
            wanted=self.listeners.wanted(name),
            on_updated=self.listeners.published,
        )

    async def close(self) -> None:
        self._ready = False
        self.listeners.close()
        for task in self._retirements:
            task.cancel()  # shutting down: their calls end with the process
        closing = [*self.upstreams.values(), *self._retiring]
        await asyncio.gather(*(upstream.close() for upstream in closing))
        self._stop.set()
        if self._serving is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serving, 10)
            self._serving = None
        await self.builtins.close()  # after the sessions, which may leave chats behind

    async def apply(self, config: McpConfig) -> None:
        """Take a reloaded `mcp:` section without a restart.

        Access rules apply to the next request. A server whose settings changed (or any
        server, when the health or reconnection settings changed) gets a new connection
        for new requests; removed servers' series are dropped. A replaced connection is
        closed once the requests already on it are done (bounded by their timeouts).
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
                # Its calls in flight finish on it; new ones go to its successor.
                self._retire(upstream)
                if name not in config.servers:
                    remove_series(self.client_metrics.up, name)
        self.config = config
        self.upstreams = {
            name: kept.get(name) or self._upstream(name, config) for name in config.servers
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
        if scope.get("method") == "POST":
            server = self.runtime.plan.config.server
            try:
                body = await Request(scope, receive).bounded_body(
                    server.max_body_bytes, server.max_json_depth
                )
            except GatewayError as error:
                await _json_rpc_error(send, error.status, error.message, error.code or "invalid")
                return
            departure = Departure()
            receive = departure.watching(_replay(body, receive))
            scope = {**scope, DEPARTURE: departure}
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
        access = self._access(ctx)
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
            if self._tracer() is not None:  # `chat`'s request continues this call's trace
                from metergate.mcp import spans

                spans.annotate({"metergate.key": key.name})
                credentials = [*credentials, *spans.trace_headers()]
            return await self.builtins.call(name, params.arguments or {}, key, credentials)
        server, tool = split_name(name) or ("", "")
        upstream = self.upstreams.get(server)
        # Not allowed and not there answer alike, so a key learns nothing of other tools.
        if (
            upstream is None
            or not self.config.access_for(key.name).allows(server, tool)
            or (upstream.up and not await upstream.knows(tool))
        ):
            raise mcp_error(INVALID_PARAMS, f"Unknown tool: {name}")
        tracer = self._tracer()
        if tracer is None:
            result = await upstream.call_tool(tool, params.arguments, _progress(ctx))
        else:
            result = await self._traced_call(
                tracer, key, upstream, tool, params.arguments, _progress(ctx)
            )
        return own_tool_result(server, result)

    async def _list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        found, cursor = await self.catalog.list_page(RESOURCES, self._access(ctx), _cursor(params))
        return types.ListResourcesResult(resources=found, next_cursor=cursor)

    async def _list_templates(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        found, cursor = await self.catalog.list_page(TEMPLATES, self._access(ctx), _cursor(params))
        return types.ListResourceTemplatesResult(resource_templates=found, next_cursor=cursor)

    async def _read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        return await self.catalog.read_resource(self._access(ctx), params.uri, _progress(ctx))

    async def _subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        key, _ = _caller(ctx)
        return await self.listeners.subscribe(ctx, key.name, params.uri)

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        _caller(ctx)
        return await self.listeners.unsubscribe(ctx, params.uri)

    async def _listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        key, _ = _caller(ctx)
        return await self.listeners.listen(ctx, key.name, params)

    async def _list_prompts(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        found, cursor = await self.catalog.list_page(PROMPTS, self._access(ctx), _cursor(params))
        return types.ListPromptsResult(prompts=found, next_cursor=cursor)

    async def _get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        access = self._access(ctx)
        return await self.catalog.get_prompt(access, params.name, params.arguments, _progress(ctx))

    def _access(self, ctx: ServerRequestContext[Any, Any]) -> McpAccess:
        key, _ = _caller(ctx)
        return self.config.access_for(key.name)

    def _offers(self) -> dict[str, Any]:
        """The capabilities the gateway announces: its own tools, and resources (with
        subscriptions) and prompts when some upstream server announced them. Lists are
        not announced as changing: the gateway sends no list-changed notifications."""
        upstreams = list(self.upstreams.values())
        resources = [u for u in upstreams if offers(u, "resources")]
        subscribe = any(u.subscriptions.supported for u in resources)
        return {
            "tools": types.ToolsCapability(list_changed=False),
            "resources": types.ResourcesCapability(subscribe=subscribe, list_changed=False)
            if resources
            else None,
            "prompts": types.PromptsCapability(list_changed=False)
            if any(offers(u, "prompts") for u in upstreams)
            else None,
        }

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
        progress: ProgressFnT | None,
    ) -> CallToolResult:
        from metergate.mcp import spans

        spans.annotate({"metergate.key": key.name, "metergate.mcp_server": upstream.name})
        span = spans.start_client_span(tracer, upstream.name, tool, upstream.config.url)
        error_type = ""
        try:
            with spans.current(span):  # the SDK puts it in `_meta.traceparent` upstream
                result = await upstream.call_tool(tool, arguments, progress)
        except MCPError as error:
            error_type = code_error_type(error.error.code)
            raise
        except Exception:
            error_type = str(INTERNAL_ERROR)
            raise
        except BaseException:
            error_type = CANCELLED  # the caller went away
            raise
        else:
            error_type = "tool_error" if is_tool_error(result) else ""
        finally:
            spans.end_span(span, error_type)
        return result

    def _known(self, name: str) -> bool:
        """Tool names that may become metric labels: ours, and the servers' listed ones."""
        return self._tool(name) is not None

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        found = self._tool(name)
        return None if found is None else dict(found.input_schema)

    def _tool(self, name: str) -> types.Tool | None:
        found = self.builtins.tools.get(name)
        if found is None:
            server, tool = split_name(name) or ("", "")
            upstream = self.upstreams.get(server)
            found = upstream.tools.get(tool) if upstream is not None else None
        return found


def _settings(config: McpConfig) -> dict[str, Any]:
    """The section's settings that every upstream connection depends on."""
    return config.model_dump(exclude={"servers", "access", "default_access"})


def _cursor(params: PaginatedRequestParams | None) -> str | None:
    return params.cursor if params is not None else None


def _progress(ctx: ServerRequestContext[Any, Any]) -> ProgressFnT | None:
    """Relay an upstream's progress to the caller under the caller's own token, when the
    caller asked for progress (the SDK gives the upstream a token of its own)."""
    if not ctx.meta or ctx.meta.get("progress_token") is None:
        return None
    session = ctx.session

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        with contextlib.suppress(Exception):  # the caller's stream may be gone already
            await session.report_progress(progress, total, message)

    return relay


def _caller(ctx: ServerRequestContext[Any, Any]) -> tuple[KeyRecord, list[tuple[bytes, bytes]]]:
    """The key `_authenticated` put on this request's scope, and its credential headers."""
    scope = getattr(ctx.request, "scope", None) or {}
    key = scope.get(_KEY)
    if not isinstance(key, KeyRecord):
        raise mcp_error(INVALID_REQUEST, "request did not pass metergate's authentication")
    credentials = [(k, v) for k, v in scope["headers"] if k in _CREDENTIAL_HEADERS]
    return key, credentials


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the SDK after the body was read (and bounded) here: the body once,
    then what the connection says next (a disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


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
