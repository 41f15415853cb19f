"""A streamable-HTTP MCP server instrumented exactly as docs/mcp.md shows.

Run: python search_server.py PORT. Tools: query (an answer), slow (sleeps), fail
(a tool error), echo.
"""

from __future__ import annotations

import asyncio
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from metergate.mcp import instrument

mcp = MCPServer("search", log_level="WARNING")


@mcp.tool()
def query(text: str) -> str:
    """Search for `text`."""
    return f"3 results for {text!r}"


@mcp.tool()
async def slow(seconds: float) -> str:
    """Answer after `seconds`."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@mcp.tool()
def fail(reason: str = "no results") -> str:
    """Always fails, in-band (isError)."""
    raise ToolError(reason)


@mcp.tool()
def echo(text: str) -> str:
    """Return `text` unchanged."""
    return text


instrument(mcp)

if __name__ == "__main__":
    mcp.run("streamable-http", port=int(sys.argv[1]))
