"""POST /v1/chat/completions and /v1/embeddings: the gateway's hot path, top to bottom.

request in → take the plan → authenticate → parse → route → caps → cache → admit (rate
limits and budget hold) → call upstream → settle → meter → respond. Ledger writes, and
with Redis the settling, happen off this path (see metering.ledger, shared.counters).

The plan in force when the request arrives serves it to the end (`runtime.Plan`): a
reload while the body arrives, during a retry's wait or mid-stream changes nothing for
it. Every failure ends as one of the error kinds of `metergate.errors`; anything else is
a gateway bug, answered as a 500 `gateway_error` that quotes the request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from metergate.asgi import (
    JSON_HEADERS,
    SSE_HEADERS,
    Receive,
    Request,
    Send,
    base_headers,
)
from metergate.cache import CachedResponse
from metergate.errors import GatewayError, InternalError, InvalidRequest
from metergate.limits import apply_max_tokens_cap, requested_max_tokens
from metergate.metering import estimate
from metergate.metering.meter import RequestLog
from metergate.providers.base import StreamState
from metergate.routing.dispatch import Kind
from metergate.routing.router import Route
from metergate.runtime import Plan, Runtime

logger = logging.getLogger("metergate.api")


class CompletionsHandler:
    """Serves chat completions (streamed or not) and embeddings."""

    def __init__(self, runtime: Runtime, kind: Kind) -> None:
        self.runtime = runtime
        self.kind = kind

    async def __call__(self, request: Request, send: Send) -> None:
        meter = self.runtime.meter
        plan = self.runtime.plan.enter()
        log = meter.begin(request.id, request.started, request.headers)
        headers = base_headers(request)
        try:
            try:
                reply = await self._handle(plan, request, send, log, headers)
            except GatewayError as error:
                reply = _error_reply(error, log, headers)
            except Exception:
                logger.exception("internal error serving request %s", request.id)
                reply = _error_reply(_internal(request.id), log, headers)
            except BaseException:
                log.outcome, log.status = "cancelled", 499
                meter.finish(log)
                raise
            # Metered before the last byte goes out, so a caller that sees the answer can
            # already see it in /metrics and (after one ledger flush) in the ledger.
            meter.finish(log)
            await reply.send(send)
        finally:
            plan.leave()

    async def _handle(
        self,
        plan: Plan,
        request: Request,
        send: Send,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> Reply:
        runtime = self.runtime
        gate = plan.gate
        key = await runtime.keys.authenticate(request.headers)
        log.identify(key)
        server = plan.config.server
        body = await request.json(server.max_body_bytes, server.max_json_depth)
        log.attach(body)
        route = plan.router.route(body.get("model"), key)
        log.model = route.name
        if route.rollout is not None:
            log.affinity = _affinity(route.rollout.config.sticky, key.name, request.headers)
        streaming = _check_chat(body) if self.kind == "chat" else _check_embeddings(body)
        if self.kind == "chat":
            apply_max_tokens_cap(body, route.config, key)
        budgets = gate.budgets.applicable(key.name, route.name, key.team)
        if budgets and self.kind == "chat" and requested_max_tokens(body) is None:
            body["max_tokens"] = route.config.budget_max_tokens  # bounds the worst case
        cache_key = None
        if plan.cache is not None and route.config.cache and not streaming:
            cache_key, hit = await self._cache_lookup(plan, request, body, key.name, route.name)
            if hit is not None:
                return _from_cache(hit, log, headers)
        worst = estimate.worst_case_nano(request.body_size, body, route.worst_prices)
        admission = await gate.admit(key.name, route.name, budgets, worst, key.team)
        headers += admission.headers
        active = runtime.metrics.active(route.name)
        active.inc()
        try:
            if streaming:
                log.stream = True
                return await self._stream(plan, request, send, body, route, log, headers)
            reply = await self._unary(plan, body, route, log, headers)
            if cache_key is not None:
                assert plan.cache is not None and log.usage is not None
                await plan.cache.store(
                    cache_key, reply.body, log.usage, log.upstream, log.cost_nano
                )
            return reply
        finally:
            active.dec()
            gate.settle(admission, log.cost_nano, log.usage)

    async def _cache_lookup(
        self, plan: Plan, request: Request, body: dict[str, Any], key: str, model: str
    ) -> tuple[bytes | None, CachedResponse | None]:
        """Honour `Cache-Control: no-store` (skip the cache) and `no-cache` (refresh it)."""
        cache = plan.cache
        assert cache is not None
        control = request.headers.get(b"cache-control", b"")
        if b"no-store" in control:
            return None, None
        cache_key = cache.key(self.kind, body, key)
        if b"no-cache" in control:
            return cache_key, None
        hit = await cache.lookup(cache_key)
        self.runtime.metrics.cache_requests.labels(model, "miss" if hit is None else "hit").inc()
        return cache_key, hit

    async def _unary(
        self,
        plan: Plan,
        body: dict[str, Any],
        route: Route,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> Reply:
        deployment, completion = await plan.dispatcher.complete(route, body, log, self.kind)
        log.usage = completion.usage
        log.cost_nano = deployment.prices.cost_nano(completion.usage)
        headers += (
            (b"x-metergate-upstream", deployment.name.encode()),
            (b"x-metergate-attempts", b"%d" % log.attempts),
            (b"x-metergate-cost-usd", b"%.9f" % (log.cost_nano / 1e9)),
            *JSON_HEADERS,
        )
        return Reply(completion.body, 200, headers)

    async def _stream(
        self,
        plan: Plan,
        request: Request,
        send: Send,
        body: dict[str, Any],
        route: Route,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> Reply:
        """Relay the stream; return its last message, sent once the request is metered."""
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        state = StreamState()
        dispatcher = plan.dispatcher
        deployment, chunks, first = await dispatcher.open_stream(
            route, body, include_usage, state, log
        )
        headers += (
            (b"x-metergate-upstream", deployment.name.encode()),
            (b"x-metergate-attempts", b"%d" % log.attempts),
            *SSE_HEADERS,
        )
        gone = asyncio.Event()
        relay = asyncio.current_task()
        assert relay is not None
        watcher = asyncio.create_task(_watch_disconnect(request.receive, gone, relay))
        events = first.count(b"data:")
        error: BaseException | None = None
        last = b""
        try:  # from here on, whatever happens, the attempt is accounted for below
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            log.ttft = time.perf_counter() - log.started
            waited = time.perf_counter()
            async for chunk in chunks:
                log.upstream_seconds += time.perf_counter() - waited
                events += chunk.count(b"data:")
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                waited = time.perf_counter()
        except asyncio.CancelledError as cancelled:
            error = cancelled
            if not gone.is_set():
                raise
            relay.uncancel()
            log.outcome, log.status = "cancelled", 499
        except Exception as exc:
            # After the first byte the status is sent: the stream ends with an error event.
            if not isinstance(exc, GatewayError):
                logger.exception("internal error relaying stream %s", request.id)
            error = exc if isinstance(exc, GatewayError) else _internal(request.id)
            log.outcome, log.status = error.outcome, error.status
            last = b"data: " + error.body() + b"\n\n"
        except BaseException as exc:
            error = exc
            raise
        finally:
            watcher.cancel()
            await chunks.aclose()  # type: ignore[attr-defined]
            dispatcher.stream_finished(deployment, error, log)
        usage = state.usage or estimate.abandoned_stream(body, events)
        log.usage = usage
        log.cost_nano = deployment.prices.cost_nano(usage)
        return Reply(last)


def _internal(request_id: str) -> InternalError:
    return InternalError(f"internal gateway error; quote request id {request_id} to the operator")


def _error_reply(error: GatewayError, log: RequestLog, headers: list[tuple[bytes, bytes]]) -> Reply:
    log.fail(error)
    return Reply(error.body(), error.status, headers + JSON_HEADERS + error.headers)


def _from_cache(hit: CachedResponse, log: RequestLog, headers: list[tuple[bytes, bytes]]) -> Reply:
    """A cache hit costs nothing; the ledger keeps what it saved."""
    log.upstream = hit.upstream
    log.cache_hit = True
    log.saved_nano = hit.cost_nano
    headers += (
        (b"x-metergate-upstream", hit.upstream.encode()),
        (b"x-metergate-cost-usd", b"0.000000000"),
        (b"x-metergate-cache", b"hit"),
        *JSON_HEADERS,
    )
    return Reply(hit.body, 200, headers)


class Reply:
    """The last thing to send: a whole response, or the tail of a started stream."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, body: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers  # None: the response has started already

    async def send(self, send: Send) -> None:
        if self.headers is not None:
            # A length lets the server send the body in one piece instead of chunked.
            self.headers.append((b"content-length", b"%d" % len(self.body)))
            await send(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
        await send({"type": "http.response.body", "body": self.body})


async def _watch_disconnect(
    receive: Receive, gone: asyncio.Event, relay: asyncio.Task[Any]
) -> None:
    """Stop the relay (and with it the upstream call) when the client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    relay.cancel()


def _affinity(sticky: str, key: str, headers: dict[bytes, bytes]) -> str | None:
    """What keeps a caller on one side of a rollout: its key, a header, or nothing."""
    if sticky == "key":
        return key
    if sticky.startswith("header:"):
        value = headers.get(sticky[7:].lower().encode())
        return value.decode("latin-1") if value else None
    return None


def _check_chat(body: dict[str, Any]) -> bool:
    """Validate what the gateway itself relies on; return whether the call streams."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty array", param="messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"`{name}` must be a positive integer", param=name)
    return bool(stream)


def _check_embeddings(body: dict[str, Any]) -> bool:
    if body.get("input") in (None, "", []):
        raise InvalidRequest("`input` is required", param="input")
    return False
