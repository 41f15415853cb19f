"""A request whose caller's connection closed is cancelled, in both protocol eras.

A 2026-07-28 client cancels by closing its request's stream, and the SDK then cancels
the handler itself. A handshake-era request is answered on the SSE stream of the POST
that carried it, and the SDK keeps its handler running when that connection closes: the
2025 transport spec has a client cancel with `notifications/cancelled`, and lets it
resume a dropped stream from an event store. The gateway keeps no event store, so no
stream is resumed and nobody is left to receive that answer; running on would hold the
server behind until its `timeout_seconds`, then count the server's `timeout`. The
connection closing cancels the request instead, as the notification would: upstream
too, counted `cancelled` on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from metergate.asgi import Message, Receive
from metergate.mcp.metrics import CONNECTION_CLOSED
from metergate.mcp.upstream import mcp_error

DEPARTURE = "metergate.mcp.departure"
"""Scope key of the POST's `Departure`, for the request the POST carries."""


class Departure:
    """The connection of one POST: whether it closed, and the request to cancel then."""

    __slots__ = ("cancel", "left")

    def __init__(self) -> None:
        self.left = False
        self.cancel: Callable[[], None] | None = None

    def watching(self, receive: Receive) -> Receive:
        """`receive` that notes the connection closing (the SDK's SSE answer listens to
        it for as long as the answer is open)."""

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not self.left:
                self.left = True
                if self.cancel is not None:
                    self.cancel()
            return message

        return watched


async def cancel_on_departure(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    """Server middleware, outside the metrics one (which sees the cancellation): run the
    request until its POST's connection closes."""
    scope = getattr(ctx.request, "scope", None) or {}
    departure = scope.get(DEPARTURE)
    if ctx.request_id is None or not isinstance(departure, Departure):
        return await call_next(ctx)
    with anyio.CancelScope() as cancel_scope:
        departure.cancel = cancel_scope.cancel
        if departure.left:
            cancel_scope.cancel()
        try:
            return await call_next(ctx)
        finally:
            departure.cancel = None
    # The answer goes nowhere (the POST's stream is gone), as the SDK's own at shutdown.
    raise mcp_error(CONNECTION_CLOSED, "Connection closed")
