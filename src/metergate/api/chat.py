"""POST /v1/chat/completions and /v1/embeddings: the gateway's hot path, top to bottom.

request in → take the plan → authenticate → parse → route → caps → cache → admit (rate
limits and budget hold) → call upstream → settle → meter → respond. Ledger writes, and
with Redis the settling, happen off this path (see metering.ledger, shared.counters).

Every other door (Anthropic Messages, the Responses API, legacy completions) takes this
same path: its `Door` translates the caller's request into the chat body on the way in
and the answer, the stream and errors back on the way out (`api.doors`), so budgets,
rate limits, caps, the cache, retries, fallbacks and rollouts apply to all of them alike.

The plan in force when the request arrives serves it to the end (`runtime.Plan`): a
reload while the body arrives, during a retry's wait or mid-stream changes nothing for
it. Every failure ends as one of the error kinds of `metergate.errors`; anything else is
a gateway bug, answered as a 500 `gateway_error` that quotes the request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from itertools import repeat
from typing import Any, NoReturn

from metergate.api.doors import Door, Exchange, Relay, check_integer, check_number, check_stop
from metergate.asgi import (
    JSON_HEADERS,
    ON_DEPARTURE,
    SSE_HEADERS,
    Receive,
    Request,
    Send,
    base_headers,
)
from metergate.auth.keys import KeyRecord
from metergate.budgets.budget import Budget
from metergate.cache import CachedResponse
from metergate.errors import GatewayError, InternalError, InvalidRequest, NotFound, ShutDown
from metergate.limits import apply_max_tokens_cap, requested_max_tokens
from metergate.metering import estimate
from metergate.metering.meter import Answered, RequestLog
from metergate.providers.base import StreamState
from metergate.providers.sse import DONE
from metergate.routing.router import Route
from metergate.runtime import Plan, Runtime

logger = logging.getLogger("metergate.api")


class CompletionsHandler:
    """Serves chat completions (streamed or not) and embeddings, and every other door's
    model calls (`door`: how its protocol enters and leaves this pipeline)."""

    def __init__(self, runtime: Runtime, door: Door) -> None:
        self.runtime = runtime
        self.door = door
        self.kind = door.kind

    async def __call__(self, request: Request, send: Send) -> None:
        meter = self.runtime.meter
        plan = self.runtime.plan.enter()
        log = meter.begin(request.id, request.started, request.headers)
        log.api = self.door.api
        task = asyncio.current_task()
        assert task is not None
        departure = request.scope[ON_DEPARTURE] = _Departure(log, task)
        headers = base_headers(request)
        try:
            try:
                reply = await self._handle(plan, request, send, log, headers)
            except GatewayError as error:
                if not log.raw:  # refused before it was parsed (not JSON, not UTF-8): the
                    log.raw, log.body_bytes = request.raw, len(request.raw)  # log keeps it
                reply = _error_reply(self.door, error, log, headers)
            except Exception:
                logger.exception("internal error serving request %s", request.id)
                reply = _error_reply(self.door, _internal(request.id), log, headers)
            except asyncio.CancelledError:
                if log.gone or task.cancelling() > 1:
                    log.outcome, log.status = "cancelled", 499
                    meter.finish(log)
                    if log.gone and not task.uncancel():
                        return  # cancelled because the caller left (`_Departure`)
                    raise
                # Cancelled by the server (a shutdown whose grace period ran out) before the
                # answer started: the caller is still there, and gets an error it can read.
                task.uncancel()
                reply = _error_reply(self.door, ShutDown.of(request.id), log, headers)
            except BaseException:
                log.outcome, log.status = "cancelled", 499
                meter.finish(log)
                raise
            departure.task = None  # the answer is decided: sending it is not cancelled
            if log.gone and log.status < 400:  # answered, but nobody is there to read it
                log.outcome, log.status = "cancelled", 499
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
        log.attach(body, request.raw)
        try:
            route = plan.router.route(body.get("model"), key)
        except NotFound:
            model = body.get("model")
            if type(model) is str and model in plan.router.routes:  # configured, not the
                log.model = model  # key's: its row names it (a bounded metric label)
            raise
        log.model = route.name
        if route.rollout is not None:
            log.affinity = _affinity(route.rollout.config.sticky, key.name, request.headers)
        exchange = await self.door.enter(request, body, key, plan)
        body, streaming = exchange.body, exchange.stream
        if log.steps is not None:  # traced or logged: a span shows the prompt as sent on
            log.prompt = body
        if self.kind == "chat":
            apply_max_tokens_cap(body, route.config, key)
        budgets = gate.budgets.applicable(key.name, route.name, key.team, key.budget_limits)
        assumed = (  # a hard budget must bound the worst case; a soft one only alerts
            bool(budgets)
            and self.kind == "chat"
            and requested_max_tokens(body) is None
            and _hard(budgets)
        )
        if assumed:
            body["max_tokens"] = route.config.budget_max_tokens  # bounds the worst case
        extras = estimate.NO_EXTRAS
        if budgets and exchange.native is not None:  # cache writes, server tools
            searches = route.config.budget_max_web_searches
            extras = self.door.extras(exchange, searches, _hard(budgets))
        if exchange.native is not None:  # the same limit for upstreams that get it as it came
            limit = requested_max_tokens(body)
            if limit is not None:
                exchange.native.body[self.door.max_tokens_field] = limit
        cache_key = None
        if plan.cache is not None and route.config.cache and not streaming:
            cache_key, hit = await self._cache_lookup(plan, request, exchange, key.name, route)
            if hit is not None:
                hit_body = await self.door.from_cache(exchange, hit.body, key)
                return _from_cache(hit, hit_body, log, headers)
        prompt = request.body_size + exchange.added_bytes  # stored history a door added
        # Only a budget holds it, so a request without one skips the walk, as does one
        # whose bytes cannot hold an attachment and that carries no stored history.
        if budgets and (exchange.added_bytes or estimate.may_attach(request.raw)):
            forms = (body,) if exchange.native is None else (body, exchange.native.body)
            prompt = estimate.prompt_bound(prompt, forms, route.config.budget_attachment_tokens)
        if budgets and (
            body.get("tools") or (exchange.native is not None and exchange.native.body.get("tools"))
        ):
            forms = (body,) if exchange.native is None else (body, exchange.native.body)
            prompt += estimate.tool_tokens(forms)  # what providers add that bytes do not show
        worst = estimate.worst_case(
            prompt,
            body,
            route.worst_prices,
            assumed,
            extras,
            self.door.max_tokens_field,
        )
        admission = await gate.admit(key.name, route.name, budgets, worst, key.team, key.rates)
        headers += admission.headers
        active = runtime.metrics.active(route.name)
        active.inc(1)
        try:
            if streaming:
                log.stream = True
                return await self._stream(plan, request, send, exchange, route, log, headers)
            reply = await self._unary(plan, exchange, key, route, log, headers)
            if cache_key is not None:
                assert plan.cache is not None and log.usage is not None
                await plan.cache.store(
                    cache_key, reply.body, log.usage, log.upstream, log.cost_nano
                )
            return reply
        finally:
            active.inc(-1)
            log.ended = time.time()
            gate.settle(admission, log.cost_nano, log.usage, log.ended)

    async def _cache_lookup(
        self, plan: Plan, request: Request, exchange: Exchange, key: str, route: Route
    ) -> tuple[bytes | None, CachedResponse | None]:
        """Honour `Cache-Control: no-store` (skip the cache) and `no-cache` (refresh it)."""
        cache = plan.cache
        assert cache is not None
        control = request.headers.get(b"cache-control", b"").lower()  # directives ignore case
        if b"no-store" in control:
            return None, None
        material = self.door.cache_material(exchange)
        cache_key = cache.key(self.door.api, material, key, route.version)
        if b"no-cache" in control:
            return cache_key, None
        hit = await cache.lookup(cache_key)
        result = "miss" if hit is None else "hit"
        self.runtime.metrics.cache_requests.labels(route.name, result).inc()
        return cache_key, hit

    async def _unary(
        self,
        plan: Plan,
        exchange: Exchange,
        key: KeyRecord,
        route: Route,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> Reply:
        try:
            deployment, completion = await plan.dispatcher.complete(
                route, exchange.body, log, self.kind, exchange.native
            )
        except asyncio.CancelledError:  # a shutdown's grace ran out while it was upstream
            _bill_the_prompt(plan, exchange.body, log, None)
            raise
        usage = completion.usage
        if not completion.reported:  # billed at least what it answered (metering.estimate)
            usage = estimate.answer_usage(exchange.body, completion.body)
            log.usage_estimated = True
            completion.usage = usage  # what a door that builds its answer reports
        log.usage = usage
        log.cost_nano = deployment.prices.cost_nano(usage)
        answer = await self.door.answer(exchange, deployment, completion, key)
        if log.steps is not None:  # traced or logged: the answer as the caller gets it
            log.response = answer
        headers += (
            (b"x-metergate-upstream", deployment.name.encode()),
            (b"x-metergate-attempts", b"%d" % log.attempts),
            (b"x-metergate-cost-usd", b"%.9f" % (log.cost_nano / 1e9)),
            *JSON_HEADERS,
        )
        return Reply(answer, 200, headers)

    async def _stream(
        self,
        plan: Plan,
        request: Request,
        send: Send,
        exchange: Exchange,
        route: Route,
        log: RequestLog,
        headers: list[tuple[bytes, bytes]],
    ) -> Reply:
        """Relay the stream; return its last message, sent once the request is metered."""
        body = exchange.body
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        state = StreamState()
        dispatcher = plan.dispatcher
        try:
            deployment, served, chunks, first = await dispatcher.open_stream(
                route, body, include_usage, state, log, exchange.native
            )
        except asyncio.CancelledError:  # the caller left, or a shutdown's grace ran out
            _bill_the_prompt(plan, body, log, state)
            raise
        outward = self.door.relay(exchange, deployment, state)  # None: chunks as they are
        headers += (
            (b"x-metergate-upstream", deployment.name.encode()),
            (b"x-metergate-attempts", b"%d" % log.attempts),
            *SSE_HEADERS,
        )
        gone = asyncio.Event()
        relay = asyncio.current_task()
        assert relay is not None
        watcher: asyncio.Task[None] | None = None
        relayed = estimate.RelayedText()
        relayed.add(first)
        kept = Answered() if log.capture else None  # what the caller gets, for the record
        error: BaseException | None = None
        last = out = b""
        try:  # from here on, whatever happens, the attempt is accounted for below
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            out = first if outward is None else outward.feed(first)
            if kept is not None:
                kept.add(out)
            elif log.steps is not None:  # traced: the first chunk its caller got (its
                log.response = out or first  # model, id), or the upstream's if none yet
            await send({"type": "http.response.body", "body": out, "more_body": True})
            log.ttft = time.perf_counter() - log.started
            # Watched from the first chunk on, so that starting its task does not delay that
            # chunk (a client gone before it dropped it; the watcher sees that at once).
            watcher = asyncio.create_task(_watch_disconnect(request.receive, gone, relay, log))
            waited = time.perf_counter()
            async for chunk in chunks:
                log.upstream_seconds += time.perf_counter() - waited
                relayed.add(chunk)
                out = chunk if outward is None else outward.feed(chunk)
                if kept is not None:
                    kept.add(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
                waited = time.perf_counter()
            if outward is not None:
                if state.usage is None:  # none from the upstream: the door reports the bill
                    state.usage = estimate.stream_usage(
                        body, None, relayed, True, state.service_tier, state.output_limit
                    )[0]
                    log.usage_estimated = True
                last = await outward.end()
        except asyncio.CancelledError as cancelled:
            error = cancelled
            if (gone.is_set() or log.gone) and (state.ended or out.endswith(DONE)):
                # It left after the stream's last event (an SDK hangs up on [DONE]),
                # while the upstream's end of the body was still on its way: the answer
                # was whole, and is billed as the upstream reported it.
                relay.uncancel()
                error, log.gone = None, False
            elif gone.is_set() or log.gone:
                relay.uncancel()
                log.outcome, log.status = "cancelled", 499
            elif relay.cancelling() > 1:
                raise
            else:  # cancelled by the server (a shutdown's grace period ran out)
                relay.uncancel()
                error = ShutDown.of(request.id)
                log.outcome, log.status = error.request_outcome, error.status
                last = await _stream_error(outward, error)
        except Exception as exc:
            # After the first byte the status is sent: the stream ends with an error event.
            if not isinstance(exc, GatewayError):
                logger.exception("internal error relaying stream %s", request.id)
            error = exc if isinstance(exc, GatewayError) else _internal(request.id)
            log.outcome, log.status = error.request_outcome, error.status
            last = await _stream_error(outward, error)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            await chunks.aclose()  # type: ignore[attr-defined]
            dispatcher.stream_finished(deployment, served, error, log)
            # A stream that did not complete is billed at least what the caller received,
            # also when it was cancelled here (a shutdown's timeout) and the error goes on.
            usage, estimated = estimate.stream_usage(
                body, state.usage, relayed, error is None, state.service_tier, state.output_limit
            )
            log.usage, log.usage_estimated = usage, estimated or log.usage_estimated
            log.cost_nano = deployment.prices.cost_nano(usage)
            if kept is not None:
                kept.add(last)
                log.response = kept.body()
        return Reply(last)


def _bill_the_prompt(
    plan: Plan, body: dict[str, Any], log: RequestLog, state: StreamState | None
) -> None:
    """A request cancelled while an attempt had it upstream (its caller left before a
    stream's first chunk; a shutdown's grace ran out) was sent there whole, and the
    upstream bills its prompt: so do the ledger and the budgets, as the upstream counted
    it in a stream's opening (Anthropic's message_start), else at four characters a
    token, marked estimated. What it may have answered meanwhile is not known."""
    deployment = plan.router.deployments.get(log.upstream) if log.attempts else None
    if deployment is None:
        return
    reported = None if state is None else state.usage
    usage, _ = estimate.stream_usage(
        body, reported, estimate.RelayedText(), False, None if state is None else state.service_tier
    )
    log.usage, log.usage_estimated = usage, True
    log.cost_nano = deployment.prices.cost_nano(usage)


def _hard(budgets: tuple[Budget, ...]) -> bool:
    return any(budget.config.hard for budget in budgets)


def _internal(request_id: str) -> InternalError:
    return InternalError(f"internal gateway error; quote request id {request_id} to the operator")


def _error_reply(
    door: Door, error: GatewayError, log: RequestLog, headers: list[tuple[bytes, bytes]]
) -> Reply:
    status, body = door.error(error)
    log.fail(error)
    log.status = status  # the door's (Anthropic's overloaded is 529, say)
    if log.steps is not None:  # traced or logged: the error as its caller gets it
        log.response = body
    if log.attempts:  # where the failure came from, and how often it was tried
        headers = [
            *headers,
            (b"x-metergate-upstream", log.upstream.encode()),
            (b"x-metergate-attempts", b"%d" % log.attempts),
        ]
    return Reply(body, status, headers + JSON_HEADERS + error.headers)


async def _stream_error(outward: Relay | None, error: GatewayError) -> bytes:
    """The event that ends a stream broken after its first byte, in the door's protocol."""
    if outward is not None:
        return await outward.failed(error)
    return b"data: " + error.body() + b"\n\n"


def _from_cache(
    hit: CachedResponse, body: bytes, log: RequestLog, headers: list[tuple[bytes, bytes]]
) -> Reply:
    """A cache hit costs nothing; the ledger keeps what it saved."""
    log.upstream = hit.upstream
    log.cache_hit = True
    log.saved_nano = hit.cost_nano
    if log.steps is not None:  # traced or logged: the answer its caller got, from the cache
        log.response = body
    headers += (
        (b"x-metergate-upstream", hit.upstream.encode()),
        (b"x-metergate-cost-usd", b"0.000000000"),
        (b"x-metergate-cache", b"hit"),
        *JSON_HEADERS,
    )
    return Reply(body, 200, headers)


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


class _Departure:
    """What the gateway's HTTP protocol calls when the caller leaves before its answer is
    complete (`asgi.ON_DEPARTURE`).

    No attempt is made for a caller that has left (the dispatcher checks `log.gone`). A
    stream is stopped at once: closing it makes the upstream stop generating. A whole
    answer's attempt in flight is let finish (its timeouts bound it): providers finish
    and bill a request whose caller went away, so the ledger gets the real usage, under
    outcome `cancelled`.
    """

    __slots__ = ("log", "task")

    def __init__(self, log: RequestLog, task: asyncio.Task[Any]) -> None:
        self.log = log
        self.task: asyncio.Task[Any] | None = task  # None once only sending is left

    def __call__(self) -> None:
        self.log.gone = True
        if self.log.stream and self.task is not None:
            self.task.cancel()


async def _watch_disconnect(
    receive: Receive, gone: asyncio.Event, relay: asyncio.Task[Any], log: RequestLog
) -> None:
    """Stop the relay (and with it the upstream call) when the client goes away (under
    another ASGI server than the gateway's own, which tells `_Departure` first)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if log.gone:
        return  # already stopped by `_Departure`
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


def _check_tools(body: dict[str, Any], name: str) -> None:
    """`tools`, when sent, is an array of objects, as every provider reads it."""
    tools = body.get(name)
    if tools is None:
        return
    if type(tools) is not list:
        raise InvalidRequest("`tools` must be an array of tool objects", param="tools")
    for number, tool in enumerate(tools):
        if type(tool) is not dict:
            raise InvalidRequest(f"`tools[{number}]` must be an object", param=f"tools[{number}]")


# What the gateway checks of a chat body before an upstream sees it: the integers it or
# an adapter reads, with their least value (JSON's true/false are not numbers here,
# although Python's bool is an int), and the fields every provider takes of one type only.
_CHAT_CHECKS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "max_tokens": partial(check_integer, least=1),
    "max_completion_tokens": partial(check_integer, least=1),
    "n": partial(check_integer, least=1),
    "top_logprobs": partial(check_integer, least=0),
    "seed": partial(check_integer, least=None),
    "temperature": check_number,
    "top_p": check_number,
    "presence_penalty": check_number,
    "frequency_penalty": check_number,
    "stop": check_stop,
    "tools": _check_tools,
}


_DICT, _STR = frozenset((dict,)), frozenset((str,))
_CONTENT_TYPES = frozenset((str, list, type(None)))


def _refuse_message(messages: list[Any]) -> NoReturn:
    """The 400 for the first message that is not an object with a string `role` and a
    string, array or null `content`."""
    for number, message in enumerate(messages):
        if type(message) is not dict or type(message.get("role")) is not str:
            raise InvalidRequest(
                f"`messages[{number}]` must be an object with a string `role`",
                param=f"messages[{number}]",
            )
        if type(message.get("content")) not in _CONTENT_TYPES:
            raise InvalidRequest(
                f"`messages[{number}].content` must be a string or an array of content parts",
                param=f"messages[{number}].content",
            )
    raise AssertionError("no message is malformed")


def _check_chat(body: dict[str, Any]) -> bool:
    """Validate what the gateway itself relies on; return whether the call streams."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty array", param="messages")
    # Each message an object with a string role and a string, array or null content, as
    # every provider reads them; checked in C (map, issuperset), whatever the number of
    # messages: a Python loop cost ~35 bytecodes a message.
    if (
        not _DICT.issuperset(map(type, messages))
        or not _STR.issuperset(map(type, map(dict.get, messages, repeat("role"))))
        or not _CONTENT_TYPES.issuperset(map(type, map(dict.get, messages, repeat("content"))))
    ):
        _refuse_message(messages)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be true or false", param="stream")
    for name in sorted(body.keys() & _CHAT_CHECKS.keys()):  # one or two, mostly; in order,
        _CHAT_CHECKS[name](body, name)  # so a body wrong twice is always told the same
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict)
        or not isinstance(options.get("include_usage", False), bool | None)
    ):
        raise InvalidRequest(
            "`stream_options` must be an object whose `include_usage` is true or false",
            param="stream_options",
        )
    return bool(stream)


def _check_embeddings(body: dict[str, Any]) -> bool:
    if body.get("input") in (None, "", []):
        raise InvalidRequest("`input` is required", param="input")
    check_integer(body, "dimensions", 1)
    return False


class ChatDoor(Door):
    """POST /v1/chat/completions: the pipeline's own protocol."""

    async def enter(
        self, request: Request, body: dict[str, Any], key: KeyRecord, plan: Plan
    ) -> Exchange:
        return Exchange(body, _check_chat(body))


class EmbeddingsDoor(Door):
    """POST /v1/embeddings."""

    api = "embeddings"
    kind = "embeddings"

    async def enter(
        self, request: Request, body: dict[str, Any], key: KeyRecord, plan: Plan
    ) -> Exchange:
        return Exchange(body, _check_embeddings(body))
