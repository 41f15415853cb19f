"""The OpenAI Responses API: POST /v1/responses, and GET/DELETE of stored responses.

A Responses request takes the one pipeline (`api.chat`), so budgets, rate limits, caps,
the cache, retries, fallbacks and rollouts apply as they do to chat completions. An
upstream that serves the Responses API (`providers.*.apis`) gets it as it came; any other
gets its chat translation (`responses_translate`), and its answer or stream is turned
back into a Response and its semantic events (`responses_stream`).

`store` (default true, as OpenAI) keeps each response in the ledger database
(`storage.responses`): `previous_response_id` is resolved there into the conversation so
far, whatever upstream served each turn, and `GET /v1/responses/{id}`, its
`/input_items` and `DELETE` read it. A stored response belongs to the gateway key that
made it: to any other key it does not exist (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from metergate.api.doors import (
    Door,
    Exchange,
    Relay,
    check_integer,
    check_number,
    is_web_search,
    search_limit,
)
from metergate.api.doors.responses_shape import check_request
from metergate.api.doors.responses_stream import NativeResponseStream, ResponseStream
from metergate.api.doors.responses_translate import input_items, new_id, to_chat, to_response
from metergate.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.auth.keys import KeyRecord
from metergate.errors import GatewayLimit, InvalidRequest, NotFound, quoted
from metergate.metering.estimate import NO_EXTRAS, Extras
from metergate.providers.base import Completion, NativeRequest, StreamState
from metergate.routing.router import Deployment
from metergate.runtime import Plan, Runtime
from metergate.storage.database import unreachable
from metergate.storage.response_saves import RetriedSaves, Save
from metergate.storage.responses import BrokenChain, ResponseStore

logger = logging.getLogger("metergate.api")

PURGE_EVERY_SECONDS = 60.0
_UNSUPPORTED = {
    "background": "background responses are not supported by this gateway",
    "conversation": "conversation objects are not supported; use previous_response_id",
    "prompt": "stored prompt templates are not supported; send instructions and input",
}


@dataclass(slots=True)
class _Turn:
    """What the door needs again to answer one Responses request and keep its answer."""

    body: dict[str, Any]  # the caller's request
    items: list[Any]  # its input items, kept with the response
    previous: str | None
    store: bool
    key_id: str
    retention_seconds: float


_INTEGERS = (("max_output_tokens", 1), ("max_tool_calls", 0), ("top_logprobs", 0))


class ResponsesDoor(Door):
    api = "responses"
    max_tokens_field = "max_output_tokens"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._store: ResponseStore | None = None
        self._saves: RetriedSaves | None = None
        self._purger: asyncio.Task[None] | None = None

    @property
    def store(self) -> ResponseStore:
        if self._store is None:
            assert self.runtime.database is not None, "used before the gateway started"
            self._store = ResponseStore(self.runtime.database)
        return self._store

    @property
    def saves(self) -> RetriedSaves:
        if self._saves is None:
            self._saves = RetriedSaves(self.store)
        return self._saves

    async def enter(
        self, request: Request, body: dict[str, Any], key: KeyRecord, plan: Plan
    ) -> Exchange:
        stream, store = _flag(body, "stream", False), _flag(body, "store", True)
        for name, least in _INTEGERS:  # read as numbers by caps, budgets and translators
            check_integer(body, name, least)
        for name in ("temperature", "top_p"):
            check_number(body, name)
        for name, reason in _UNSUPPORTED.items():
            if body.get(name):
                raise InvalidRequest(reason, param=name)
        items = input_items(body)
        check_request(body, items)
        previous = body.get("previous_response_id")
        native = body
        conversation = items
        history_bytes = 0
        if previous is not None:
            history = await self._conversation(previous, key)
            history_bytes = len(orjson.dumps(history))
            conversation = history + items
            native = {k: v for k, v in body.items() if k != "previous_response_id"}
            native["input"] = conversation
        chat, lost = to_chat(body, conversation)
        retention = plan.config.responses.retention_hours * 3600
        turn = _Turn(body, items, previous, store, key.id, retention)
        native_request = NativeRequest("responses", native, {}, lost)
        return Exchange(chat, stream, native_request, turn, history_bytes)

    def extras(self, exchange: Exchange, max_searches: int, bound: bool) -> Extras:
        """The web searches a request with the built-in `web_search` tool may run: its
        `max_tool_calls` (which bounds every built-in tool's calls), else
        `max_searches`, then sent as its `max_tool_calls` when a hard budget applies."""
        assert exchange.native is not None
        body = exchange.native.body
        tools = body.get("tools")
        if not isinstance(tools, list) or not any(map(is_web_search, tools)):
            return NO_EXTRAS
        return Extras(None, search_limit(body, "max_tool_calls", max_searches, bound))

    async def _conversation(self, previous: Any, key: KeyRecord) -> list[Any]:
        if not isinstance(previous, str) or not previous:
            raise InvalidRequest(
                "`previous_response_id` must be a response id", param="previous_response_id"
            )
        try:
            history = await self.store.conversation(previous, key.id, time.time())
        except BrokenChain as broken:
            raise NotFound(
                f"previous response {quoted(previous)} continues response {broken.missing!r}, "
                "which is no longer stored",
                param="previous_response_id",
            ) from None
        except Exception as error:
            if not unreachable(error):
                raise
            raise _store_unreachable(previous) from None
        if history is None:
            raise NotFound(
                f"previous response {quoted(previous)} not found (a response is visible only to "
                "the key that made it, while it is stored)",
                param="previous_response_id",
            )
        return history

    async def answer(
        self, exchange: Exchange, deployment: Deployment, completion: Completion, key: KeyRecord
    ) -> bytes:
        turn: _Turn = exchange.context
        if not exchange.passthrough(deployment):
            response = to_response(turn.body, new_id("resp"), completion.body, completion.usage)
            await self._keep(turn, response)
            return orjson.dumps(response)
        response = orjson.loads(completion.body)
        if turn.previous is None:
            await self._keep(turn, response)
            return completion.body
        response["previous_response_id"] = turn.previous  # upstream saw the whole history
        await self._keep(turn, response)
        return orjson.dumps(response)

    async def from_cache(self, exchange: Exchange, body: bytes, key: KeyRecord) -> bytes:
        """A cached answer is a new response: its own id and time (and stored as such)."""
        response = orjson.loads(body)
        response["id"], response["created_at"] = new_id("resp"), int(time.time())
        await self._keep(exchange.context, response)
        return orjson.dumps(response)

    def relay(self, exchange: Exchange, deployment: Deployment, state: StreamState) -> Relay:
        turn: _Turn = exchange.context

        async def keep(response: dict[str, Any]) -> None:
            if turn.previous is not None:
                response["previous_response_id"] = turn.previous
            await self._keep(turn, response)

        if exchange.passthrough(deployment):
            return NativeResponseStream(keep)
        return ResponseStream(turn.body, new_id("resp"), state, keep)

    async def _keep(self, turn: _Turn, response: dict[str, Any]) -> None:
        """Store a finished response (`store: true`). A failure is not raised: the answer
        was paid for and goes to the caller all the same (`storage.response_saves`)."""
        if turn.store:
            save = Save(
                turn.key_id,
                response,
                turn.items,
                turn.previous,
                time.time(),
                turn.retention_seconds,
            )
            await self.saves.save(save)  # or kept to save once the ledger answers again

    # --- GET /v1/responses/{id}, its /input_items, DELETE /v1/responses/{id} ---------

    async def stored(self, request: Request, send: Send, rest: str) -> None:
        key = await self.runtime.keys.authenticate(request.headers)
        method = request.scope["method"]
        response_id, _, tail = rest.partition("/")
        served = not tail and method in ("GET", "DELETE")
        if not served and (method, tail) != ("GET", "input_items"):
            raise InvalidRequest(
                f"{method} is not served on /v1/responses/{rest}; use GET or DELETE "
                "/v1/responses/{id}, or GET /v1/responses/{id}/input_items",
                status=405,
                code="method_not_allowed",
            )
        try:
            body = await self._read_stored(method, tail, response_id, key, request)
        except Exception as error:
            if not unreachable(error):
                raise
            raise _store_unreachable(response_id) from None
        if body is None:
            raise NotFound(f"no response found with id {response_id!r}", param="response_id")
        await respond(send, 200, body, base_headers(request) + JSON_HEADERS)

    async def _read_stored(
        self, method: str, tail: str, response_id: str, key: KeyRecord, request: Request
    ) -> bytes | None:
        """The answer's body, or None when the key has no such response."""
        now = time.time()
        if tail == "input_items":
            items = await self.store.input_items(response_id, key.id, now)
            return None if items is None else _page(response_id, items, request)
        if method == "DELETE":
            deleted = await self.store.delete(response_id, key.id)
            body = orjson.dumps({"id": response_id, "object": "response", "deleted": True})
            return body if deleted else None
        found = await self.store.get(response_id, key.id, now)
        return None if found is None else orjson.dumps(found)

    # --- retention ---------------------------------------------------------------------

    def start(self) -> None:
        self._purger = asyncio.create_task(self._purge_forever(), name="responses-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        if self._saves is not None:
            await self._saves.close()

    async def purge(self) -> int:
        """Delete expired responses, then the oldest beyond `responses.max_stored_mb`."""
        limits = self.runtime.plan.config.responses
        return await self.store.purge(time.time(), int(limits.max_stored_mb * 1024 * 1024))

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception:
                logger.exception("purging stored responses failed; retrying later")
            await asyncio.sleep(PURGE_EVERY_SECONDS)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"`{name}` must be true or false", param=name)
    return value


def _page(response_id: str, items: list[Any], request: Request) -> bytes:
    """A page of input items: `limit` (1-100, default 20), `order` (desc by default), `after`."""
    query = parse_qs(request.scope.get("query_string", b"").decode("latin-1"))
    listed = [_listed(item, response_id, n) for n, item in enumerate(items)]
    if (query.get("order") or ["desc"])[0] != "asc":
        listed.reverse()
    after = (query.get("after") or [None])[0]
    if after is not None:
        ids = [item["id"] for item in listed]
        listed = listed[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = min(100, max(1, int((query.get("limit") or ["20"])[0])))
    except ValueError:
        raise InvalidRequest("`limit` must be an integer", param="limit") from None
    data = listed[:limit]
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(listed) > limit,
        }
    )


def _listed(item: dict[str, Any], response_id: str, number: int) -> dict[str, Any]:
    """An input item as listed: with an id and, for messages, content as parts."""
    kind = item.get("type") or "message"
    listed = {**item, "type": kind}
    if kind == "message":
        content = item.get("content")
        if isinstance(content, str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            listed["content"] = [{"type": part, "text": content}]
        listed.setdefault("status", "completed")
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    listed.setdefault("id", f"{prefix.get(kind, 'item')}_{response_id[5:]}{number:04d}")
    return listed


def _store_unreachable(response_id: str) -> GatewayLimit:
    """The database that keeps stored responses does not answer: a 503 to retry, not an
    internal error, since nothing is wrong with the request or the gateway."""
    logger.warning("could not read stored response %s: ledger unreachable", response_id)
    return GatewayLimit(
        f"stored response {quoted(response_id)} cannot be read now: the response store (the "
        "ledger database) is unreachable; try again shortly",
        code="response_store_unavailable",
        retry_after=1,
    )
