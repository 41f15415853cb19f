"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, for every model.

A Messages request takes the one pipeline (`api.chat`), so budgets, rate limits, caps,
the cache, retries, fallbacks and rollouts apply as they do to chat completions. An
Anthropic upstream gets it as it came (`providers.anthropic_native`); any other gets its
chat translation (`messages_translate`), and its answer and stream are turned back into
the Messages API's, event grammar included. Errors take Anthropic's shape,
`{"type": "error", "error": {"type", "message"}}`, with the statuses the SDK maps to its
exception classes (an upstream's 529 stays a 529: `OverloadedError`).

The key is read from `x-api-key` or `Authorization: Bearer`, as the SDK and Claude Code
send it; `anthropic-version` is accepted and `anthropic-beta` forwarded to Anthropic.
"""

from __future__ import annotations

import math
from collections.abc import Container
from typing import Any

import orjson

from metergate.api.doors import (
    Door,
    Exchange,
    Relay,
    check_number,
    is_web_search,
    search_limit,
)
from metergate.api.doors.messages_translate import (
    MessageStream,
    NativeMessageStream,
    error_payload,
    to_chat,
    to_message,
)
from metergate.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.auth.keys import KeyRecord
from metergate.errors import GatewayError, InvalidRequest
from metergate.metering.estimate import Extras
from metergate.providers.anthropic import AnthropicAdapter
from metergate.providers.anthropic_native import FORWARDED_HEADERS
from metergate.providers.base import Completion, NativeRequest, StreamState, UpstreamCall
from metergate.routing.router import Deployment, Router
from metergate.runtime import Plan, Runtime

# count_tokens without an Anthropic upstream: ~4 characters per text token, and a flat
# figure per image or document (Anthropic's images cost up to ~1,600 tokens).
CHARS_PER_TOKEN = 4
TOKENS_PER_ATTACHMENT = 1600
_NOT_TEXT = frozenset({"type", "role", "cache_control", "id", "tool_use_id", "signature"})


class MessagesDoor(Door):
    api = "messages"
    max_tokens_field = "max_tokens"

    async def enter(
        self, request: Request, body: dict[str, Any], key: KeyRecord, plan: Plan
    ) -> Exchange:
        stream = check(body, require_max_tokens=True)
        chat, lost = to_chat(body)
        return Exchange(chat, stream, NativeRequest("messages", body, forwarded(request), lost))

    async def answer(
        self, exchange: Exchange, deployment: Deployment, completion: Completion, key: KeyRecord
    ) -> bytes:
        if exchange.passthrough(deployment):
            return completion.body
        return to_message(completion.body, completion.usage)

    def relay(self, exchange: Exchange, deployment: Deployment, state: StreamState) -> Relay:
        if exchange.passthrough(deployment):
            return NativeMessageStream()
        return MessageStream(state)

    def error(self, error: GatewayError) -> tuple[int, bytes]:
        return anthropic_error(error)

    def extras(self, exchange: Exchange, max_searches: int, bound: bool) -> Extras:
        """Prompt-cache writes asked for by `cache_control` (anywhere, or at the top for
        automatic caching; `ttl: "1h"` for the dearer ones) and the web searches its
        `web_search_*` server tools may run (their `max_uses`)."""
        assert exchange.native is not None
        body = exchange.native.body
        tools = body.get("tools")
        searches = sum(
            search_limit(tool, "max_uses", max_searches, bound)
            for tool in (tools if isinstance(tools, list) else ())
            if is_web_search(tool)
        )
        return Extras(_cache_writes(body), searches)


def _cache_writes(body: dict[str, Any]) -> str | None:
    """The prompt-cache writes a request asks for: "1h" when any `cache_control` marker
    keeps an hour, else "5m" when there is one, else None. Markers go where Anthropic
    takes them: the top (automatic caching), tools, system blocks, message blocks."""
    places: list[Any] = [body]
    for field in ("tools", "system"):
        if isinstance(body.get(field), list):
            places.extend(body[field])
    for message in body.get("messages") or ():  # (checked to be a list of objects)
        if isinstance(message.get("content"), list):
            places.extend(message["content"])
    found: str | None = None
    for place in places:
        marker = place.get("cache_control") if isinstance(place, dict) else None
        if isinstance(marker, dict):
            if marker.get("ttl") == "1h":
                return "1h"
            found = "5m"
    return found


ANTHROPIC_PATHS = ("/v1/messages", "/messages")


def speaks_anthropic(path: str, header_names: Container[bytes]) -> bool:
    """A request to the Messages door, or from Anthropic's SDK (it sends
    `anthropic-version`), whatever the path: its errors go out in Anthropic's shape."""
    return path.startswith(ANTHROPIC_PATHS) or b"anthropic-version" in header_names


def anthropic_error(error: GatewayError) -> tuple[int, bytes]:
    status, payload = error_payload(error)
    return status, orjson.dumps(payload)


def check(body: dict[str, Any], require_max_tokens: bool) -> bool:
    """Validate what the gateway relies on; return whether the call streams."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("messages: each message must be an object", param="messages")
    limit = body.get("max_tokens")
    if require_max_tokens and (type(limit) is not int or limit < 1):
        raise InvalidRequest("max_tokens: a positive integer is required", param="max_tokens")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be true or false", param="stream")
    for name in ("temperature", "top_p"):
        check_number(body, name)
    return bool(stream)


def forwarded(request: Request) -> dict[str, str]:
    headers = request.headers
    return {
        name: headers[name.encode()].decode("latin-1")
        for name in FORWARDED_HEADERS
        if name.encode() in headers
    }


class CountTokens:
    """POST /v1/messages/count_tokens: exact from an Anthropic upstream (which counts for
    free), else an estimate. Not a model call: neither metered nor rate-limited."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, request: Request, send: Send) -> None:
        headers = base_headers(request) + JSON_HEADERS
        plan = self.runtime.plan.enter()
        try:
            status, body = 200, await self._count(plan.router, request)
        except GatewayError as error:
            status, body = anthropic_error(error)
            headers += error.headers
        finally:
            plan.leave()
        await respond(send, status, body, headers)

    async def _count(self, router: Router, request: Request) -> bytes:
        key = await self.runtime.keys.authenticate(request.headers)
        server = self.runtime.plan.config.server
        body = await request.json(server.max_body_bytes, server.max_json_depth)
        route = router.route(body.get("model"), key)
        check(body, require_max_tokens=False)
        for deployment in route.serving():
            adapter = deployment.adapter
            if isinstance(adapter, AnthropicAdapter) and deployment.breaker.available():
                native = NativeRequest("messages", body, forwarded(request))
                call = UpstreamCall({}, deployment.model, timeouts=deployment.timeouts)
                call.native = native
                return await adapter.count_tokens(call)
        return orjson.dumps({"input_tokens": estimate_tokens(body)})


def estimate_tokens(body: dict[str, Any]) -> int:
    """About 4 characters per token of text (system, messages, tool calls and results,
    tool definitions) and 1,600 tokens per image or document."""
    characters = 0
    attachments = 0
    stack: list[Any] = [body.get("system"), body.get("messages"), body.get("tools")]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            characters += len(node)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") in ("image", "document"):
                attachments += 1
            elif node.get("type") == "tool_use" or "input_schema" in node:
                characters += len(orjson.dumps(node))
            else:
                stack.extend(v for k, v in node.items() if k not in _NOT_TEXT)
    return math.ceil(characters / CHARS_PER_TOKEN) + TOKENS_PER_ATTACHMENT * attachments
