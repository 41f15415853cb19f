"""A handshake-era stdio MCP server (protocol 2025-11-25 and before), as servers written
before 2026 are: the low-level `Server`, served by the handshake-only loop, with
`resources/subscribe` and updates on the session.

Run: python legacy_server.py (stdio), or python legacy_server.py PORT (streamable HTTP,
where it refuses `server/discover` as servers of that era do, and keeps its sessions in
memory: a restart forgets them). Resources `memo://a` and `memo://b`, listed one per
page; tools `touch` (changes a memo and tells its subscribers) and `subscribed` (the
URIs subscribed to now).
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.runner import serve_loop
from mcp.server.session import ServerSession
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

MEMOS = {"memo://a": "first", "memo://b": "second"}
SUBSCRIBERS: dict[str, list[ServerSession]] = {}

TOOLS = [
    types.Tool(
        name="touch",
        description="Change a memo and tell its subscribers.",
        input_schema={"type": "object", "properties": {"uri": {"type": "string"}}},
    ),
    types.Tool(
        name="subscribed",
        description="The memos somebody subscribes to.",
        input_schema={"type": "object", "properties": {}},
    ),
]


async def list_tools(ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(
    ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    if params.name == "touch":
        uri = (params.arguments or {})["uri"]
        MEMOS[uri] = MEMOS.get(uri, "") + "!"
        for session in SUBSCRIBERS.get(uri, []):
            await session.send_resource_updated(uri)
        text = "touched"
    else:
        text = " ".join(sorted(uri for uri, sessions in SUBSCRIBERS.items() if sessions))
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


async def list_resources(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams
) -> types.ListResourcesResult:
    uris = sorted(MEMOS)
    at = int(params.cursor or 0)
    page = [types.Resource(name=uri[7:], uri=uri) for uri in uris[at : at + 1]]
    more = str(at + 1) if at + 1 < len(uris) else None
    return types.ListResourcesResult(resources=page, next_cursor=more)


async def read_resource(
    ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
) -> types.ReadResourceResult:
    if params.uri not in MEMOS:
        raise ValueError(f"no memo {params.uri}")
    content = types.TextResourceContents(uri=params.uri, text=MEMOS[params.uri])
    return types.ReadResourceResult(contents=[content])


async def subscribe(
    ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams
) -> types.EmptyResult:
    SUBSCRIBERS.setdefault(params.uri, []).append(ctx.session)
    return types.EmptyResult()


async def unsubscribe(
    ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
) -> types.EmptyResult:
    SUBSCRIBERS.pop(params.uri, None)
    return types.EmptyResult()


server: Server[Any] = Server(
    "legacy",
    on_list_tools=list_tools,
    on_call_tool=call_tool,
    on_list_resources=list_resources,
    on_read_resource=read_resource,
    on_subscribe_resource=subscribe,
    on_unsubscribe_resource=unsubscribe,
)


async def no_discover(ctx: ServerRequestContext[Any], params: Any) -> types.EmptyResult:
    raise MCPError(types.METHOD_NOT_FOUND, "Method not found")


async def main() -> None:
    async with stdio_server() as (read, write):
        await serve_loop(server, read, write, lifespan_state={})


if __name__ == "__main__":
    if len(sys.argv) > 1:
        server.add_request_handler("server/discover", types.RequestParams, no_discover)
        app = server.streamable_http_app()
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    else:
        anyio.run(main)
