"""A stdio MCP server, instrumented with its metrics on a port of its own.

Run: python files_server.py METRICS_PORT (stdio). Tools: read, list, slow, pid, big (a
text of `kib` KiB), write (changes a file and publishes its update). Resources
`file:///NAME` for every file (a template, so files written later can be read too),
prompt `review`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

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
async def slow(seconds: float, ctx: Context) -> str:
    """Answer after `seconds` (with a progress report first, so a caller that asks for
    progress knows the call has arrived)."""
    await ctx.report_progress(0, seconds)
    await asyncio.sleep(seconds)
    return "done"


@mcp.tool()
def pid() -> int:
    """This process's id, so a test can kill it."""
    return os.getpid()


@mcp.tool()
def big(kib: int) -> str:
    """A text of `kib` KiB."""
    return "x" * (kib * 1024)


@mcp.tool()
async def write(path: str, text: str, ctx: Context) -> str:
    """Replace a file's content, and tell its subscribers."""
    FILES[path] = text
    await ctx.notify_resource_updated(f"file:///{path}")
    return "written"


def _static(name: str) -> None:
    @mcp.resource(f"file:///{name}", name=name, mime_type="text/plain")
    def content() -> str:
        return FILES[name]


for _name in list(FILES):
    _static(_name)


@mcp.resource("file:///{name}", mime_type="text/plain")
def any_file(name: str) -> str:
    """Any file, by name."""
    if name not in FILES:
        raise ResourceNotFoundError(f"no such file: {name}")
    return FILES[name]


@mcp.prompt()
def review(path: str) -> str:
    """Ask for a review of a file."""
    return f"Review {path}, please."


instrument(mcp, metrics_port=int(sys.argv[1]))

if __name__ == "__main__":
    mcp.run()
