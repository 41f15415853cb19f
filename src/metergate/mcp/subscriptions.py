"""Resource subscriptions through the gateway: who downstream wants which resource, and
the one subscription per resource the gateway holds upstream for all of them.

Downstream, a subscriber (`Sink`) is a handshake-era session (`resources/subscribe`,
updates on its standalone stream) or a 2026-07-28 `subscriptions/listen` stream. The
`Subscribers` registry maps namespaced URIs to sinks and tells each upstream which of its
URIs are wanted.

Upstream, `UpstreamSubscriptions` keeps what the server holds equal to what is wanted,
level-triggered: `sync` compares and fixes, so a reconnect or a replaced connection
re-establishes everything. A handshake-era server gets `resources/subscribe` and
`resources/unsubscribe`; a 2026-07-28 server one `subscriptions/listen` stream carrying
every wanted URI, replaced (new stream first, then the old one closed) when the set
changes. Updates arrive through the upstream's message handler either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

from metergate.mcp.metrics import CONNECTION_CLOSED, code_error_type
from metergate.mcp.naming import qualify_uri, split_uri

if TYPE_CHECKING:
    from mcp import Client

    from metergate.mcp.upstream import Upstream

log = logging.getLogger("metergate.mcp")


@dataclass(eq=False)
class Sink:
    """One downstream subscriber: a key, and how to hand it an update (never blocks)."""

    key_name: str
    deliver: Callable[[str], None]
    uris: set[str] = field(default_factory=set)  # namespaced


class Subscribers:
    """Which downstream sinks want updates of which namespaced URI, by server."""

    def __init__(self) -> None:
        self._by_server: dict[str, dict[str, set[Sink]]] = {}

    def add(self, sink: Sink, namespaced: str) -> str | None:
        """Record the subscription; the server it concerns (None: not a resource URI)."""
        found = split_uri(namespaced)
        if found is None:
            return None
        server, uri = found
        self._by_server.setdefault(server, {}).setdefault(uri, set()).add(sink)
        sink.uris.add(namespaced)
        return server

    def remove(self, sink: Sink, namespaced: str) -> str | None:
        """Forget one subscription; the server it concerned, if any."""
        sink.uris.discard(namespaced)
        found = split_uri(namespaced)
        if found is None:
            return None
        server, uri = found
        sinks = self._by_server.get(server, {}).get(uri)
        if sinks is None:
            return None
        sinks.discard(sink)
        if not sinks:
            del self._by_server[server][uri]
        return server

    def drop(self, sink: Sink) -> set[str]:
        """Forget every subscription of `sink` (its session or stream ended); the servers."""
        servers = {self.remove(sink, uri) for uri in list(sink.uris)}
        return {server for server in servers if server is not None}

    def wanted(self, server: str) -> set[str]:
        """The server's own URIs somebody subscribes to."""
        return set(self._by_server.get(server, ()))

    def publish(self, server: str, uri: str, allowed: Callable[[str, str, str], bool]) -> int:
        """Hand `uri`'s update to its subscribers whose key may still read it (access
        can change on reload); how many got it."""
        namespaced = qualify_uri(server, uri)
        delivered = 0
        for sink in list(self._by_server.get(server, {}).get(uri, ())):
            if allowed(sink.key_name, server, uri):
                sink.deliver(namespaced)
                delivered += 1
        return delivered


class UpstreamSubscriptions:
    """The subscriptions one upstream server holds for the gateway."""

    def __init__(self, upstream: Upstream, wanted: Callable[[], set[str]]) -> None:
        self.upstream = upstream
        self.wanted = wanted
        self.active: set[str] = set()  # what the server holds on this connection
        self._lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def supported(self) -> bool:
        """Whether the server announced resource subscriptions."""
        capabilities = self.upstream.capabilities
        resources = capabilities.resources if capabilities is not None else None
        return resources is not None and resources.subscribe is True

    def connected(self) -> None:
        """A (re)connected server holds nothing yet: subscribe what is wanted."""
        self.active = set()
        if self.wanted():
            self._spawn(self.sync())

    def disconnected(self) -> None:
        self._stop_listener()
        self.active = set()

    def resync_soon(self) -> None:
        """Bring the server in line in the background (after an unsubscribe)."""
        self._spawn(self.sync())

    async def sync(self) -> None:
        """Make what the server holds equal to what is wanted; raise the first failure
        to add a subscription (a failed removal is only logged: nobody waits for it)."""
        async with self._lock:
            client = self.upstream.client
            if client is None or not self.supported:
                return
            wanted = self.wanted()
            if self.upstream.modern:
                await self._listen(client, wanted)
            else:
                await self._subscribe(wanted)

    async def _subscribe(self, wanted: set[str]) -> None:
        """Handshake era: one `resources/subscribe` per URI added, `unsubscribe` per removed."""
        for uri in sorted(self.active - wanted):
            self.active.discard(uri)
            unsubscribe = types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri))
            try:
                await self.upstream.send("resources/unsubscribe", unsubscribe, types.EmptyResult)
            except Exception as exc:
                log.info("MCP server %s: unsubscribe %s failed: %s", self.upstream.name, uri, exc)
        failure: Exception | None = None
        for uri in sorted(wanted - self.active):
            request = types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
            try:
                await self.upstream.send("resources/subscribe", request, types.EmptyResult)
            except Exception as exc:
                failure = failure or exc
            else:
                self.active.add(uri)
        if failure is not None:
            raise failure

    async def _listen(self, client: Client, wanted: set[str]) -> None:
        """2026-07-28: one listen stream with every wanted URI; replaced when they change."""
        if wanted == self.active and self._listener is not None and not self._listener.done():
            return
        if not wanted:
            self._stop_listener()
            self.active = set()
            return
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._stream(client, frozenset(wanted), acked), name=f"mcp-listen-{self.upstream.name}"
        )
        try:
            await asyncio.shield(acked)
        except BaseException as exc:
            task.cancel()
            if isinstance(exc, Exception) and not isinstance(exc, MCPError):
                raise MCPError(
                    CONNECTION_CLOSED,
                    f"MCP server {self.upstream.name!r} did not accept the subscription: {exc}",
                ) from None
            raise
        self._stop_listener()  # the new stream is acknowledged: the old one may go
        self._listener = task
        self.active = set(wanted)

    async def _stream(
        self, client: Client, uris: frozenset[str], acked: asyncio.Future[None]
    ) -> None:
        """Hold one listen stream open; its events reach the upstream's message handler."""
        upstream = self.upstream
        started = time.perf_counter()
        try:
            async with client.listen(resource_subscriptions=sorted(uris)) as stream:
                self._observe(started, "")
                acked.set_result(None)
                async for _ in stream:  # drain the stream's own queue; delivery is elsewhere
                    pass
        except Exception as exc:
            if not acked.done():
                self._observe(started, _error_type(exc))
                acked.set_exception(exc)
                return
            log.info("MCP server %s: the subscription stream ended: %s", upstream.name, exc)
        finally:
            if not acked.done():  # cancelled before the server answered
                acked.set_exception(MCPError(CONNECTION_CLOSED, "the subscription was abandoned"))
        if asyncio.current_task() is self._listener and upstream.client is client:
            # The server ended the stream on a live connection: listen again shortly.
            self._listener = None
            self.active = set()
            self._spawn(self._later(self.sync(), upstream.settings.reconnect_min_seconds))

    def _observe(self, started: float, error_type: str) -> None:
        labels = (self.upstream.name, "subscriptions/listen", "", error_type)
        self.upstream.metrics.operation.observe(labels, time.perf_counter() - started)

    def _stop_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    async def close(self) -> None:
        self._stop_listener()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):
                await coroutine

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _later(coroutine: Coroutine[Any, Any, None], seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except BaseException:
            coroutine.close()
            raise
        await coroutine


def _error_type(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MCPError):
        return code_error_type(exc.error.code)
    return "transport"
