"""One MCP server behind the gateway: its connection, its tools, its health, its requests.

A supervisor task owns the connection (the SDK's `Client` is an async context that must
be entered and left in one task). While connected it probes the server with `tools/list`
every `health_interval_seconds` (which also picks up changed tool lists; a server without
tools gets `resources/list` or `prompts/list` instead); a failed probe, a failed request
or a dropped connection marks the server down (`metergate_mcp_server_up` 0) and the task
reconnects with exponential backoff and jitter until it answers again. A handshake-era
server that ended the gateway's session (its idle timeout, a restart: it answers 404) is
not down: the task opens a new session at once, and the requests that met the end are
sent again on it. Requests from handlers use the live `Client` concurrently, each within
the server's timeout and metered whatever its outcome; while the server is down they
fail at once instead of waiting on a connection that is not there. What the server
announced at connection (capabilities, protocol era) is kept, so the gateway can say
what its servers support.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ErrorData, ServerCapabilities, Tool
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

from metergate.mcp.bounded import SSE_MARGIN, BoundedTransport, session_ended
from metergate.mcp.config import McpConfig, McpServerConfig
from metergate.mcp.metrics import (
    BROKEN_ANSWER,
    CANCELLED,
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    REQUEST_TIMEOUT,
    UNKNOWN_TOOL,
    ClientMetrics,
    code_error_type,
    is_tool_error,
)
from metergate.mcp.naming import qualify
from metergate.mcp.stdio import bounded_stdio
from metergate.mcp.subscriptions import UpstreamSubscriptions

log = logging.getLogger("metergate.mcp")

_MAX_PAGES = 100
_RELIST_EVERY = 1.0  # seconds: at most one extra tools/list per server for unknown names
_RESERVED = 8
"""HTTP connections kept beyond `max_connections` for the gateway's own traffic (the
health probe, the server's notification stream, listen streams, a relist): requests
never take them, so a pool full of calls never makes a healthy server look down."""

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)
Send = Callable[[Client, float], Awaitable[T]]
"""One request on a live client, given the seconds it may take."""


def mcp_error(code: int, message: str, data: Any = None) -> MCPError:
    return MCPError.from_error_data(ErrorData(code=code, message=message, data=data))


class _Unavailable(MCPError):
    """The gateway's own word that a server takes no requests now (it names the server)."""


class Upstream:
    def __init__(
        self,
        name: str,
        config: McpServerConfig,
        settings: McpConfig,
        metrics: ClientMetrics,
        *,
        wanted: Callable[[], set[str]] = set,
        on_updated: Callable[[str, str], None] | None = None,
    ) -> None:
        """`wanted`: the server's resource URIs that downstream clients subscribe to;
        `on_updated(server, uri)`: called when the server says one of them changed."""
        self.name = name
        self.config = config
        self.settings = settings
        self.metrics = metrics
        self.client: Client | None = None
        self.capabilities: ServerCapabilities | None = None  # as last announced
        self.modern = False  # the connection speaks the 2026-07-28 era (no handshake)
        self.tools: dict[str, Tool] = {}  # by the server's own name
        self.listed: dict[str, Tool] = {}  # namespaced copies, by the server's own name
        self.subscriptions = UpstreamSubscriptions(self, wanted)
        self._on_updated = on_updated
        self._up = metrics.up.labels(name)
        self._up.set(0)
        self._probe_now = asyncio.Event()
        self._stopping = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_relist = 0.0
        # HTTP: a request holds a slot while in flight; one over the limit waits for one.
        self._slots = asyncio.Semaphore(config.max_connections) if config.url else None
        self._in_flight = 0
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()
        self._retired = False  # replaced by a reload: serves only what it already has
        # A new session asked for in place of one the server ended: the new client, or
        # None when none could be opened.
        self._renewal: asyncio.Future[Client | None] | None = None

    @property
    def up(self) -> bool:
        return self.client is not None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-upstream-{self.name}")

    async def wait_first_attempt(self) -> None:
        await self._first_attempt.wait()

    async def close(self) -> None:
        """Stop: a connected server's session is ended in order (bounded); one still
        connecting is abandoned at once, as a server that never answers its handshake
        would otherwise hold a shutdown or reload for the whole connect timeout."""
        self._stopping.set()
        self._probe_now.set()
        await self.subscriptions.close()
        if self._task is None:
            return
        if self.client is None:
            self._task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise  # this close itself was cancelled
        self._task = None

    async def retire(self) -> None:
        """Replaced by a reload (or removed): take no part in the server's state any more
        (its `up` series and notifications belong to the successor, or are gone), let
        the requests already on this connection finish (bounded by their own time
        limits), then close it. A request is served by the config it arrived under."""
        self._retired = True
        await self.subscriptions.close()
        limit = self.config.timeout_seconds + 1  # a request's wait for a slot included
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), limit)
        await self.close()

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Client:
        """Open the transport and the session; what is entered on `stack` closes with it.

        Not under an anyio deadline: the client's task group must be left in the scope it
        was entered in. The handshake is bounded by the client's read timeout instead,
        and a TCP connect by the HTTP client's connect timeout.
        """
        handshake = self.settings.connect_timeout_seconds
        if self.config.url is not None:
            read = self.config.timeout_seconds + 5  # the call's own timeout comes first
            pool = self.config.max_connections + _RESERVED
            limits = httpx2.Limits(max_connections=pool, max_keepalive_connections=pool)
            bounded = self.config.max_response_bytes
            http = httpx2.AsyncClient(
                headers=self.config.headers,
                timeout=httpx2.Timeout(self.settings.connect_timeout_seconds, read=read),
                transport=BoundedTransport(
                    httpx2.AsyncHTTPTransport(limits=limits), self.name, bounded
                ),
            )
            await stack.enter_async_context(http)
            transport = streamable_http_client(
                self.config.url, http_client=http, max_sse_event_size=bounded + SSE_MARGIN
            )
            client = Client(
                transport,
                cache=None,
                read_timeout_seconds=handshake,
                message_handler=self._on_message,
            )
            return await stack.enter_async_context(client)
        client = Client(
            bounded_stdio(self.name, self.config),
            cache=None,
            read_timeout_seconds=handshake,
            message_handler=self._on_message,
        )
        return await stack.enter_async_context(client)

    async def _on_message(self, message: IncomingMessage) -> None:
        """Notifications from the server: resource updates go to subscribers (on a
        listen stream or, handshake era, the session), a changed tool list is relisted."""
        if self._retired:
            return
        if isinstance(message, types.ResourceUpdatedNotification):
            if self._on_updated is not None:
                self._on_updated(self.name, message.params.uri)
        elif isinstance(message, types.ToolListChangedNotification):
            self._probe_now.set()

    async def _supervise(self) -> None:
        delay = self.settings.reconnect_min_seconds
        while not self._stopping.is_set():
            renewing = False
            try:
                async with contextlib.AsyncExitStack() as stack:
                    client = await self._connect(stack)
                    stack.callback(self.subscriptions.disconnected)  # before the client closes
                    self.capabilities = client.server_capabilities
                    self.modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
                    await self._refresh(client)
                    self._mark_up(client)
                    delay = self.settings.reconnect_min_seconds
                    renewing = await self._watch(client)
            except Exception as exc:  # includes the SDK's ExceptionGroups from its task groups
                if not self._stopping.is_set():
                    log.warning("MCP server %s: %s", self.name, _describe(exc))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._stopping.is_set() or (task is not None and task.cancelling()):
                    raise  # really cancelled: the gateway or the loop is stopping
                # The SDK's transport cancelled this task's scope when the connection broke.
                log.warning("MCP server %s: connection lost", self.name)
            finally:
                renewing = renewing and not self._stopping.is_set()
                if not renewing:
                    self._mark_down()
                self._first_attempt.set()
            if renewing:
                continue  # at once, still up: the server only ended the session
            if self._stopping.is_set() or self._retired:
                return  # a retired connection that broke has no requests left to serve
            pause = delay * random.uniform(0.8, 1.2)
            delay = min(delay * 2, self.settings.reconnect_max_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)

    async def _watch(self, client: Client) -> bool:
        """Probe until a probe fails (raise), the server ended the session (True: open
        a new one) or the gateway stops (False)."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._probe_now.wait(), self.settings.health_interval_seconds
                )
            self._probe_now.clear()
            if self._stopping.is_set():
                return False
            if self._renewal is not None:
                return True
            try:
                await self._refresh(client)
            except MCPError as exc:
                if not session_ended(exc.error):
                    raise
                self._renew()
                return True
        return False

    def _renew(self) -> None:
        """Have the supervisor open a new session in place of the one the server ended
        (one for all the requests that met its end)."""
        if self._renewal is None:
            log.info("MCP server %s ended metergate's session; opening a new one", self.name)
            self._renewal = asyncio.get_running_loop().create_future()
            self._probe_now.set()

    def _settle_renewal(self, client: Client | None) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None and not renewal.done():
            renewal.set_result(client)

    def _mark_up(self, client: Client) -> None:
        if self.client is None:
            log.info("MCP server %s is up (%d tools)", self.name, len(self.tools))
        self.client = client
        self._first_attempt.set()
        self._settle_renewal(client)
        if not self._retired:
            self._up.set(1)
            self.subscriptions.connected()

    def _mark_down(self) -> None:
        if self.client is not None and not self._stopping.is_set() and not self._retired:
            log.warning("MCP server %s is down; reconnecting", self.name)
        self.client = None
        self._settle_renewal(None)
        if not self._retired:
            self._up.set(0)
        self.subscriptions.disconnected()

    async def _refresh(self, client: Client) -> None:
        """The health probe: list every tool (all pages) within the server's timeout, or
        for a server without tools a first page of what it has; metered like a call."""
        capabilities = self.capabilities or ServerCapabilities(tools=types.ToolsCapability())
        if capabilities.tools is None and capabilities.resources is not None:
            await self._probe(client, "resources/list", lambda c: c.session.list_resources())
        elif capabilities.tools is None and capabilities.prompts is not None:
            await self._probe(client, "prompts/list", lambda c: c.session.list_prompts())
        else:
            tools = await self._probe(client, "tools/list", self._list_tools)
            self.tools = tools
            self.listed = {
                own: tool.model_copy(update={"name": qualify(self.name, own)})
                for own, tool in tools.items()
            }

    async def _list_tools(self, client: Client) -> dict[str, Tool]:
        tools: dict[str, Tool] = {}
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.update((tool.name, tool) for tool in page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        return tools

    async def _probe(
        self, client: Client, method: str, probe: Callable[[Client], Awaitable[T]]
    ) -> T:
        started = time.perf_counter()
        error_type = ""
        try:
            with anyio.fail_after(self.config.timeout_seconds):
                return await probe(client)
        except TimeoutError:
            error_type = "timeout"
            raise
        except MCPError as exc:
            error_type = code_error_type(exc.error.code)
            raise
        except BaseException:
            error_type = "transport"
            raise
        finally:
            labels = (self.name, method, "", error_type)
            self.metrics.operation.observe(labels, time.perf_counter() - started)

    async def knows(self, tool: str) -> bool:
        """Whether the server has `tool`, relisting once a second at most when unsure."""
        if tool in self.tools:
            return True
        client = self.client
        now = time.monotonic()
        if client is None or now - self._last_relist < _RELIST_EVERY:
            return False
        self._last_relist = now
        try:
            await self._refresh(client)
        except Exception:
            self._probe_now.set()
            return False
        return tool in self.tools

    async def call_tool(
        self, tool: str, arguments: dict[str, Any] | None, progress: ProgressFnT | None = None
    ) -> CallToolResult:
        """Call `tool`; metered, a result with `isError` counted as `tool_error`."""

        def send(client: Client, seconds: float) -> Awaitable[CallToolResult]:
            return client.call_tool(
                tool, arguments, read_timeout_seconds=seconds, progress_callback=progress
            )

        label = tool if tool in self.tools else UNKNOWN_TOOL
        result = await self.request("tools/call", send, what=qualify(self.name, tool), tool=label)
        return result

    async def send(
        self,
        method: str,
        request: types.ClientRequest,
        result_type: type[R],
        progress: ProgressFnT | None = None,
    ) -> R:
        """Send one request (resources, prompts, subscriptions) and validate its result."""

        def send(client: Client, seconds: float) -> Awaitable[R]:
            return client.session.send_request(
                request,
                result_type,
                request_read_timeout_seconds=seconds,
                progress_callback=progress,
            )

        return await self.request(method, send, what=f"{method} on MCP server {self.name!r}")

    async def request(self, method: str, send: Send[T], *, what: str, tool: str = "") -> T:
        """Run `send` on the live client within the server's timeout; metered as `method`
        whatever the outcome (`tool` labels `tools/call`). A caller that goes away
        cancels the request upstream too (the SDK tells the server), counted as
        `cancelled`, not as a failure of the server.

        One deadline covers the wait for a connection slot and the request, so no
        request takes longer than `timeout_seconds`; where it passed decides the error:
        still waiting is metergate's own limit, on the server a timeout like any other.
        """
        timeout = self.config.timeout_seconds
        started = time.perf_counter()
        waited: float | None = None  # seconds spent waiting for a slot, once it has one
        error_type = ""
        self._in_flight += 1
        self._idle.clear()
        try:
            if self.client is None:
                raise self._unavailable()
            with anyio.fail_after(timeout):
                async with self._slot() as queued:
                    waited = time.perf_counter() - started if queued else 0.0
                    result = await self._send(send, timeout + 1)
        except TimeoutError:
            if waited is None:
                error_type = "gateway_error"  # metergate's own limit, not the server's fault
                raise mcp_error(
                    INTERNAL_ERROR,
                    f"{what} waited {timeout:g} s for one of the {self.config.max_connections} "
                    f"connections metergate allows to MCP server {self.name!r} "
                    f"(max_connections); all were busy with other requests",
                ) from None
            error_type = "timeout"
            queue = (
                f", {waited:.1f} s of which it waited for a free connection "
                f"(max_connections {self.config.max_connections})"
                if waited
                else ""
            )
            raise mcp_error(
                REQUEST_TIMEOUT,
                f"{what} did not answer within {timeout:g} s "
                f"(timeout_seconds of MCP server {self.name!r}){queue}",
            ) from None
        except _Unavailable:
            error_type = "transport"
            self._probe_now.set()
            raise
        except MCPError as exc:
            if exc.error.code in BROKEN_ANSWER:  # the server's answer, never the caller's
                error_type = "transport"
                self._probe_now.set()
                raise mcp_error(
                    INTERNAL_ERROR,
                    f"MCP server {self.name!r} sent an answer that is not valid JSON-RPC: "
                    f"{exc.error.message[:200]}",
                ) from None
            error_type = code_error_type(exc.error.code)
            if error_type != "transport":
                raise
            self._probe_now.set()
            if session_ended(exc.error):  # the new session's too; the message says so
                raise mcp_error(CONNECTION_CLOSED, exc.error.message) from None
            # The connection broke under the request (the SDK's bare "Connection closed"),
            # or the server said -32000 itself: either way, name the server.
            raise mcp_error(
                CONNECTION_CLOSED,
                f"MCP server {self.name!r} failed: {exc.error.message}",
                exc.error.data,
            ) from None
        except Exception as exc:
            if not _is_transport(exc):  # e.g. a result that breaks the tool's output schema
                error_type = str(INTERNAL_ERROR)
                raise mcp_error(
                    INTERNAL_ERROR, f"MCP server {self.name!r} answered badly: {_describe(exc)}"
                ) from None
            error_type = "transport"
            self._probe_now.set()
            raise mcp_error(
                CONNECTION_CLOSED, f"MCP server {self.name!r} failed: {_describe(exc)}"
            ) from None
        except BaseException:  # the caller went away: no fault of the server's
            error_type = CANCELLED
            raise
        else:
            if method == "tools/call" and is_tool_error(result):
                error_type = "tool_error"
        finally:
            labels = (self.name, method, tool, error_type)
            self.metrics.operation.observe(labels, time.perf_counter() - started)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        return result

    async def _send(self, send: Send[T], seconds: float) -> T:
        """`send` on the live session; if the server had ended it (its idle timeout, a
        restart), once more on a new one: the server never took the request, and the
        spec has a client that gets 404 for its session start a new one."""
        client = await self._session()
        try:
            return await send(client, seconds)
        except MCPError as exc:
            if not session_ended(exc.error):
                raise
        if self.client is client:  # else another request had it replaced already
            self._renew()
        return await send(await self._session(), seconds)

    async def _session(self) -> Client:
        """The client to send on; while an ended session is replaced, the new one's."""
        renewal = self._renewal
        if renewal is not None and await asyncio.shield(renewal) is None:
            raise _Unavailable(
                code=CONNECTION_CLOSED,
                message=f"MCP server {self.name!r} ended metergate's session and a new one "
                f"could not be opened; metergate is reconnecting to it",
            )
        client = self.client
        if client is None:
            raise self._unavailable()
        return client

    def _unavailable(self) -> _Unavailable:
        return _Unavailable(
            code=CONNECTION_CLOSED,
            message=f"MCP server {self.name!r} is unavailable; metergate is reconnecting to it",
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[bool]:
        """One of the server's `max_connections` request slots, waited for as long as
        the caller's deadline allows; yields whether all were taken when it asked (it
        had to queue). A stdio server has no such limit."""
        slots = self._slots
        if slots is None:
            yield False
            return
        queued = slots.locked()
        await slots.acquire()
        try:
            yield queued
        finally:
            slots.release()


_TRANSPORT_ERRORS = (
    OSError,
    httpx2.TransportError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


def _is_transport(exc: BaseException) -> bool:
    """A failure to reach the server (as opposed to an answer it gave)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_transport(inner) for inner in exc.exceptions)
    return isinstance(exc, _TRANSPORT_ERRORS)


def _describe(exc: BaseException) -> str:
    """The innermost useful message of an exception (or of the first in a group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
