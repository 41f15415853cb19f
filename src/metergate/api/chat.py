"""POST /v1/chat/completions and /v1/embeddings: the gateway's hot path, top to bottom.

request in → authenticate → parse → route → call upstream → meter → respond.
Ledger writes and other side work happen off this path (see metering.ledger).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from metergate.api.asgi import (
    JSON_HEADERS,
    SSE_HEADERS,
    Receive,
    Request,
    Send,
    base_headers,
    respond,
)
from metergate.api.errors import GatewayError, bad_request, from_failure
from metergate.metering import estimate
from metergate.metering.meter import RequestLog
from metergate.providers.base import StreamState, UpstreamFailure
from metergate.routing.dispatch import Dispatcher, Kind
from metergate.routing.router import Route
from metergate.runtime import Runtime


class CompletionsHandler:
    """Serves chat completions (streamed or not) and embeddings."""

    def __init__(self, runtime: Runtime, kind: Kind) -> None:
        self.runtime = runtime
        self.kind = kind
        self.dispatcher = Dispatcher(runtime.metrics)

    async def __call__(self, request: Request, send: Send) -> None:
        runtime = self.runtime
        log = RequestLog(request.id, request.started)
        headers = base_headers(request)
        active = None
        try:
            key = await runtime.keys.authenticate(request.headers)
            log.key = key.name
            body = await request.json(runtime.config.server.max_body_bytes)
            route = runtime.router.route(body.get("model"), key)
            log.model = route.name
            active = runtime.metrics.active_requests.labels(route.name)
            active.inc()
            if self.kind == "embeddings":
                _check_embeddings(body)
                await self._unary(send, body, route, log, headers)
            elif _check_chat(body):
                log.stream = True
                await self._stream(request, send, body, route, log, headers)
            else:
                await self._unary(send, body, route, log, headers)
        except GatewayError as error:
            log.outcome, log.status = error.outcome, error.status
            await respond(send, error.status, error.body(), headers + JSON_HEADERS + error.headers)
        finally:
            if active is not None:
                active.dec()
            runtime.meter.finish(log)

    async def _unary(
        self,
        send: Send,
        body: dict[str, Any],
        route: Route,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        try:
            deployment, completion = await self.dispatcher.complete(route, body, log, self.kind)
        except UpstreamFailure as failure:
            raise from_failure(failure) from None
        log.usage = completion.usage
        log.cost_nano = deployment.prices.cost_nano(completion.usage)
        headers += (
            (b"x-metergate-upstream", deployment.name.encode()),
            (b"x-metergate-cost-usd", b"%.9f" % (log.cost_nano / 1e9)),
            *JSON_HEADERS,
        )
        await respond(send, 200, completion.body, headers)

    async def _stream(
        self,
        request: Request,
        send: Send,
        body: dict[str, Any],
        route: Route,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        state = StreamState()
        try:
            deployment, chunks, first = await self.dispatcher.open_stream(
                route, body, include_usage, state, log
            )
        except UpstreamFailure as failure:
            raise from_failure(failure) from None
        headers += ((b"x-metergate-upstream", deployment.name.encode()), *SSE_HEADERS)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = asyncio.Event()
        relay = asyncio.current_task()
        assert relay is not None
        watcher = asyncio.create_task(_watch_disconnect(request.receive, gone, relay))
        events = first.count(b"data:")
        attempt_outcome = "success"
        try:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            log.ttft = time.perf_counter() - log.started
            waited = time.perf_counter()
            async for chunk in chunks:
                log.upstream_seconds += time.perf_counter() - waited
                events += chunk.count(b"data:")
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                waited = time.perf_counter()
            watcher.cancel()
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            relay.uncancel()
            attempt_outcome = log.outcome = "cancelled"
            log.status = 499
        except UpstreamFailure as failure:
            attempt_outcome = log.outcome = failure.outcome
            log.status = failure.status
            error = from_failure(failure)
            await send(
                {
                    "type": "http.response.body",
                    "more_body": False,
                    "body": b"data: " + error.body() + b"\n\n",
                }
            )
        finally:
            watcher.cancel()
            await chunks.aclose()  # type: ignore[attr-defined]
        self.dispatcher.metrics.count_attempt(deployment.name, attempt_outcome)
        usage = state.usage or estimate.abandoned_stream(body, events)
        log.usage = usage
        log.cost_nano = deployment.prices.cost_nano(usage)


async def _watch_disconnect(
    receive: Receive, gone: asyncio.Event, relay: asyncio.Task[Any]
) -> None:
    """Stop the relay (and with it the upstream call) when the client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    relay.cancel()


def _check_chat(body: dict[str, Any]) -> bool:
    """Validate what the gateway itself relies on; return whether the call streams."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty array", param="messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("`stream` must be true or false", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise bad_request(f"`{name}` must be a positive integer", param=name)
    return bool(stream)


def _check_embeddings(body: dict[str, Any]) -> None:
    if body.get("input") in (None, "", []):
        raise bad_request("`input` is required", param="input")
