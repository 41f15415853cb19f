"""metergate's own MCP tools: `chat`, `list_models` and `usage`, for the calling key.

`chat` is an in-process call of the gateway's own `POST /v1/chat/completions` with the
caller's key, so routing, caps, budgets, retries, metrics and the ledger apply exactly
as to any other request: there is no second path to keep in step. A client that cancels
`chat` is to that request a caller who closed its connection (`asgi.ON_DEPARTURE`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from mcp_types import CallToolResult, TextContent, Tool

from metergate.asgi import ON_DEPARTURE
from metergate.auth.keys import KeyRecord
from metergate.budgets.period import iso, period_bounds
from metergate.metering.hourly import spend_source

if TYPE_CHECKING:
    from metergate.runtime import Runtime

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string"},
    },
    "required": ["role", "content"],
}

TOOLS = [
    Tool(
        name="chat",
        description="Ask a model through metergate (metered and budgeted like any request). "
        "Give `prompt` for one user message, or `messages` for a conversation.",
        input_schema={
            "type": "object",
            "properties": {
                "model": {"type": "string", "description": "a model from list_models"},
                "prompt": {"type": "string"},
                "messages": {"type": "array", "items": _MESSAGE},
                "max_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number", "minimum": 0},
            },
            "required": ["model"],
        },
    ),
    Tool(
        name="list_models",
        description="The models this key may use, with their descriptions.",
        input_schema={"type": "object", "properties": {}},
    ),
    Tool(
        name="usage",
        description="This key's spend today and this month (UTC) and its budgets' status.",
        input_schema={"type": "object", "properties": {}},
    ),
]


def _result(data: dict[str, Any], text: str | None = None, error: bool = False) -> CallToolResult:
    body = text if text is not None else orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
    return CallToolResult(
        content=[TextContent(type="text", text=body)], structured_content=data, is_error=error
    )


class Builtins:
    """The tools, bound to one runtime and (for `chat`) the gateway's ASGI app."""

    def __init__(self, runtime: Runtime, app: Callable[[], ASGIApp | None]) -> None:
        self.runtime = runtime
        self._app = app
        self.tools = {tool.name: tool for tool in TOOLS}
        self._abandoned: set[asyncio.Future[None]] = set()  # chats whose client cancelled

    async def close(self) -> None:
        """Stop the chats still finishing for clients that cancelled them (a shutdown):
        they are recorded as `cancelled` while the ledger still takes rows."""
        for task in self._abandoned:
            task.cancel()
        await asyncio.gather(*self._abandoned, return_exceptions=True)

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        key: KeyRecord,
        forwarded: list[tuple[bytes, bytes]],
    ) -> CallToolResult:
        """`forwarded`: the headers `chat`'s request carries of the call's, the caller's
        credentials and the trace context."""
        if name == "chat":
            return await self.chat(arguments, forwarded)
        if name == "list_models":
            return self.list_models(key)
        return await self.usage(key)

    async def chat(
        self, arguments: dict[str, Any], forwarded: list[tuple[bytes, bytes]]
    ) -> CallToolResult:
        app = self._app()
        if app is None:
            return _result({"error": "chat is not wired to the gateway app"}, error=True)
        messages = arguments.get("messages")
        if not messages and isinstance(arguments.get("prompt"), str):
            messages = [{"role": "user", "content": arguments["prompt"]}]
        body: dict[str, Any] = {"model": arguments.get("model"), "messages": messages}
        for option in ("max_tokens", "temperature"):
            if arguments.get(option) is not None:
                body[option] = arguments[option]
        status, headers, raw = await asgi_post(
            app, "/v1/chat/completions", orjson.dumps(body), forwarded, self._abandoned
        )
        reply = _json(raw)
        if status != 200:
            found = reply.get("error")
            error: dict[str, Any] = found if isinstance(found, dict) else {}
            message = error.get("message") or raw.decode("utf-8", "replace")[:500]
            return _result(
                {"status": status, "error": message, "code": error.get("code")},
                text=f"HTTP {status}: {message}",
                error=True,
            )
        choices = reply.get("choices") or [{}]
        text = (choices[0].get("message") or {}).get("content") or ""
        data = {
            "model": reply.get("model"),
            "content": text,
            "usage": reply.get("usage"),
            "upstream": headers.get(b"x-metergate-upstream", b"").decode(),
            "cost_usd": float(headers.get(b"x-metergate-cost-usd", b"0") or 0),
        }
        return _result(data, text=text)

    def list_models(self, key: KeyRecord) -> CallToolResult:
        router = self.runtime.plan.router
        models = [
            {"id": name, "description": router.routes[name].description}
            for name in router.models_for(key)
        ]
        return _result({"models": models})

    async def usage(self, key: KeyRecord) -> CallToolResult:
        """Spend from the ledger (flushed first, so the caller's last requests count)."""
        runtime = self.runtime
        if runtime.ledger is not None:
            await runtime.ledger.flush()
        now = time.time()
        spend: dict[str, Any] = {}
        for period in ("day", "month"):
            start, end = period_bounds(now, period, "UTC")
            total = requests = 0
            if runtime.database is not None:
                source, params = spend_source(
                    start, end, " AND key_name = ?", [key.name], keys=True
                )
                ((total, requests),) = await runtime.database.fetch(
                    f"SELECT COALESCE(SUM(cost_nano), 0), COALESCE(SUM(requests), 0) FROM {source}",
                    params,
                )
            spend["today" if period == "day" else "this_month"] = {
                "cost_usd": int(total) / 1e9,
                "requests": int(requests),
                "since": iso(start),
            }
        return _result({"key": key.name, **spend, "budgets": await self._budgets(key)})

    async def _budgets(self, key: KeyRecord) -> list[dict[str, Any]]:
        models = set(self.runtime.plan.router.models_for(key))
        book = self.runtime.plan.budgets
        mine = [
            b
            for b in book.budgets
            if not (
                (b.config.scope == "key" and b.target != key.name)
                or (b.config.scope == "model" and b.target not in models)
                or (b.config.scope == "team" and b.target != key.team)
            )
        ]
        for each in book.each:  # the key's own share of budgets for each key (team, model)
            targets = {
                "key": [key.name],
                "team": [key.team] if key.team is not None else [],
                "model": sorted(models),
            }[each.config.scope]
            mine += (book.share(each, target, key.budget_limits) for target in targets)
        book.roll(mine)
        held = await self.runtime.plan.gate.held_nano(mine)  # wherever requests hold it
        found = []
        for budget, held_nano in zip(mine, held, strict=True):
            found.append(
                {
                    "name": budget.name,
                    "scope": budget.config.scope,
                    "target": budget.target,
                    "period": budget.config.period,
                    "hard": budget.config.hard,
                    "limit_usd": budget.limit_nano / 1e9,
                    "spent_usd": budget.spent_nano / 1e9,
                    "held_usd": held_nano / 1e9,
                    "remaining_usd": max(0, budget.limit_nano - budget.spent_nano) / 1e9,
                    "resets_at": iso(budget.end),
                }
            )
        return found


async def asgi_post(
    app: ASGIApp,
    path: str,
    body: bytes,
    extra_headers: list[tuple[bytes, bytes]],
    abandoned: set[asyncio.Future[None]],
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One POST through an ASGI app in process: no socket, no second HTTP stack.

    The app runs in a task of its own, as under an HTTP server, so that a cancelled
    caller reaches it the way a closed connection does: told through `ON_DEPARTURE` (the
    request ends as `cancelled`, not as a server shutting down), it finishes on its own,
    in `abandoned` until then (a model call in flight is answered and billed)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", b"mcp_" + secrets.token_hex(10).encode()),
        *extra_headers,
    ]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("metergate-mcp", 0),
    }
    finished = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status = 500
    response_headers: dict[bytes, bytes] = {}
    chunks: list[bytes] = []

    async def receive() -> MutableMapping[str, Any]:
        if pending:
            return pending.pop()
        await finished.wait()  # the "client" stays until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers.update(message.get("headers") or [])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                finished.set()

    handler = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.shield(handler)
    except asyncio.CancelledError:
        departed = scope.pop(ON_DEPARTURE, None)
        if departed is not None:
            departed()
        if not handler.done():
            abandoned.add(handler)
            handler.add_done_callback(abandoned.discard)
        raise
    finally:
        finished.set()  # and receive() tells the handler its caller is gone
    return status, response_headers, b"".join(chunks)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
