"""The gateway's clients subscribing to resources, in both protocol eras.

Handshake era (2025-11-25 and before): `resources/subscribe` and `resources/unsubscribe`
on a session; updates go out on the session's standalone stream (the GET stream) until
the client unsubscribes or the session ends. 2026-07-28: a `subscriptions/listen` stream
whose acknowledgment names the URIs honored and which then carries their updates.

Either way a URI is honored only if the key may read it and its server supports
subscriptions, and an update is delivered only while the key still may (access can
change on reload). The upstream side is `UpstreamSubscriptions`, one per server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY

from metergate.mcp.catalog import Catalog
from metergate.mcp.config import McpAccess
from metergate.mcp.metrics import CONNECTION_CLOSED, INTERNAL_ERROR, INVALID_PARAMS
from metergate.mcp.subscriptions import Sink, Subscribers
from metergate.mcp.upstream import Upstream

_SINK = "metergate.subscriptions"  # Connection.state entry of a session's sink
_MAX_URIS = 1000  # per listen stream
_BACKLOG = 1000  # updates a listen stream may hold for a client that does not read


class Listeners:
    """Downstream subscriptions of the gateway, and delivery of upstream updates to them."""

    def __init__(
        self,
        catalog: Catalog,
        upstreams: Callable[[], dict[str, Upstream]],
        access: Callable[[str], McpAccess],
    ) -> None:
        self.subscribers = Subscribers()
        self._catalog = catalog
        self._upstreams = upstreams
        self._access = access
        self._streams: set[MemoryObjectSendStream[str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def wanted(self, server: str) -> Callable[[], set[str]]:
        return lambda: self.subscribers.wanted(server)

    def published(self, server: str, uri: str) -> None:
        """An upstream said `uri` changed: tell whoever subscribed and may still read it."""
        self.subscribers.publish(server, uri, self._may_read)

    def _may_read(self, key_name: str, server: str, uri: str) -> bool:
        return self._access(key_name).allows_resource(server, uri)

    async def subscribe(
        self, ctx: ServerRequestContext[Any, Any], key_name: str, uri: str
    ) -> types.EmptyResult:
        """`resources/subscribe` of a handshake-era session."""
        upstream = self._subscribable(self._access(key_name), uri)
        sink = self._session_sink(ctx, key_name)
        failed = await self._add(sink, [(uri, upstream)])
        if failed:
            raise failed[0]
        return types.EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any, Any], uri: str) -> types.EmptyResult:
        connection = getattr(ctx.session, "_connection", None)
        sink = connection.state.get(_SINK) if connection is not None else None
        if isinstance(sink, Sink):
            self._resync(self.subscribers.remove(sink, uri))
        return types.EmptyResult()

    async def listen(
        self,
        ctx: ServerRequestContext[Any, Any],
        key_name: str,
        params: types.SubscriptionsListenRequestParams,
    ) -> types.SubscriptionsListenResult:
        """One `subscriptions/listen` stream: acknowledge what is honored, then relay
        updates until the client leaves (or the gateway stops: a graceful end)."""
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(INVALID_PARAMS, "subscriptions/listen requires a request id")
        meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: subscription_id}
        send, receive = anyio.create_memory_object_stream[str](_BACKLOG)

        def deliver(uri: str) -> None:
            try:
                send.send_nowait(uri)
            except anyio.WouldBlock:
                send.close()  # a client that stopped reading: end its stream, it re-listens
            except anyio.ClosedResourceError:
                pass

        sink = Sink(key_name, deliver)
        access = self._access(key_name)
        wanted: list[tuple[str, Upstream]] = []
        for uri in (params.notifications.resource_subscriptions or [])[:_MAX_URIS]:
            with contextlib.suppress(MCPError):
                wanted.append((uri, self._subscribable(access, uri)))
        self._streams.add(send)
        try:
            await self._add(sink, wanted)  # what failed is not honored: the ack says so
            honored = [uri for uri, _ in wanted if uri in sink.uris]
            acknowledged = types.SubscriptionsAcknowledgedNotification(
                params=types.SubscriptionsAcknowledgedNotificationParams(
                    notifications=types.SubscriptionFilter(resource_subscriptions=honored or None),
                    _meta=meta,
                )
            )
            await ctx.session.send_notification(acknowledged, related_request_id=subscription_id)
            async for uri in receive:
                updated = types.ResourceUpdatedNotification(
                    params=types.ResourceUpdatedNotificationParams(uri=uri, _meta=meta)
                )
                await ctx.session.send_notification(updated, related_request_id=subscription_id)
        finally:
            self._streams.discard(send)
            send.close()
            receive.close()
            self._drop(sink)
        return types.SubscriptionsListenResult(_meta=meta)

    def _subscribable(self, access: McpAccess, uri: str) -> Upstream:
        server, _, upstream = self._catalog.resource(access, uri)
        if not upstream.subscriptions.supported:
            raise MCPError(
                INVALID_PARAMS, f"MCP server {server!r} does not support resource subscriptions"
            )
        return upstream

    async def _add(self, sink: Sink, wanted: Sequence[tuple[str, Upstream]]) -> list[MCPError]:
        """Subscribe `sink` to every URI, each server brought in line once; what failed
        is undone and returned."""
        by_upstream: dict[Upstream, list[str]] = {}
        for uri, upstream in wanted:
            by_upstream.setdefault(upstream, []).append(uri)
        failures: list[MCPError] = []
        for upstream, uris in by_upstream.items():
            for uri in uris:
                self.subscribers.add(sink, uri)
            try:
                if not upstream.up:
                    raise MCPError(
                        CONNECTION_CLOSED,
                        f"MCP server {upstream.name!r} is unavailable; "
                        "metergate is reconnecting to it",
                    )
                await upstream.subscriptions.sync()
            except MCPError as exc:
                failures.append(exc)
            except Exception as exc:
                failures.append(MCPError(INTERNAL_ERROR, f"subscribing failed: {exc}"))
            else:
                continue
            for uri in uris:
                self.subscribers.remove(sink, uri)
            upstream.subscriptions.resync_soon()
        return failures

    def _session_sink(self, ctx: ServerRequestContext[Any, Any], key_name: str) -> Sink:
        """The handshake-era session's subscriber, made on its first subscription and
        dropped with the session (the SDK hands handlers the session's `Connection` only
        as `ServerSession._connection` in mcp 2.x)."""
        connection = getattr(ctx.session, "_connection", None)
        if connection is None:
            raise MCPError(INTERNAL_ERROR, "this connection cannot carry resource updates")
        sink = connection.state.get(_SINK)
        if not isinstance(sink, Sink):
            session = ctx.session
            sink = Sink(key_name, lambda uri: self._spawn(_notify_updated(session, uri)))
            connection.state[_SINK] = sink
            connection.exit_stack.callback(self._drop, sink)
        return sink

    def _drop(self, sink: Sink) -> None:
        for server in self.subscribers.drop(sink):
            self._resync(server)

    def _resync(self, server: str | None) -> None:
        upstream = self._upstreams().get(server) if server is not None else None
        if upstream is not None:
            upstream.subscriptions.resync_soon()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """End every listen stream gracefully; drop pending session notifications."""
        for stream in list(self._streams):
            stream.close()
        for task in list(self._tasks):
            task.cancel()


async def _notify_updated(session: ServerSession, uri: str) -> None:
    with contextlib.suppress(Exception):  # best effort, as the SDK's own notifications
        await session.send_resource_updated(uri)
