"""A stdio MCP server, instrumented with its metrics on a port of its own.

Run: python files_server.py METRICS_PORT (stdio). Tools: read, list, slow, pid.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from metergate.mcp import instrument

FILES = {"readme.md": "# hello", "notes.txt": "buy milk"}

mcp = MCPServer("files", log_level="WARNING")


@mcp.tool()
def read(path: str) -> str:
    """The content of a file."""
    if path not in FILES:
        raise ToolError(f"no such file: {path}")
    return FILES[path]


@mcp.tool(name="list")
def list_files() -> list[str]:
    """The names of all files."""
    return sorted(FILES)


@mcp.tool()
async def slow(seconds: float) -> str:
    """Answer after `seconds`."""
    await asyncio.sleep(seconds)
    return "done"


@mcp.tool()
def pid() -> int:
    """This process's id, so a test can kill it."""
    return os.getpid()


instrument(mcp, metrics_port=int(sys.argv[1]))

if __name__ == "__main__":
    mcp.run()
