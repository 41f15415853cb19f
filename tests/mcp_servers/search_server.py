"""A streamable-HTTP MCP server instrumented exactly as docs/mcp.md shows.

Run: python search_server.py PORT. Tools: query (an answer), slow (sleeps), nap (reports
that it started, then sleeps), big (a large answer), fail (a tool error), echo, steps
(reports progress), hold (reports progress, then waits to be cancelled, which it
remembers), cancelled (the holds that were cancelled), link (a resource link). Resource
`search://stats`, template `search://results/{topic}`, prompt `summarize`. No resource
subscriptions (`subscriptions/listen` is not served).
"""

from __future__ import annotations

import asyncio
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ResourceLink

from metergate.mcp import instrument

mcp = MCPServer("search", log_level="WARNING", subscriptions=False)
CANCELLED: list[str] = []


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
async def nap(seconds: float, ctx: Context) -> str:
    """Report that it started, then answer after `seconds`."""
    await ctx.report_progress(0, 1, "napping")
    await asyncio.sleep(seconds)
    return f"napped {seconds}"


@mcp.tool()
async def big(kib: int, ctx: Context, progress: bool = False) -> str:
    """`kib` KiB of text; reporting progress first (an SSE answer) when `progress`."""
    if progress:
        await ctx.report_progress(0, 1, "writing")
    return "x" * (kib * 1024)


@mcp.tool()
def fail(reason: str = "no results") -> str:
    """Always fails, in-band (isError)."""
    raise ToolError(reason)


@mcp.tool()
def echo(text: str) -> str:
    """Return `text` unchanged."""
    return text


@mcp.tool()
async def steps(count: int, ctx: Context) -> str:
    """Report progress `count` times, then answer."""
    for step in range(1, count + 1):
        await ctx.report_progress(step, count, f"step {step} of {count}")
    return f"{count} steps done"


@mcp.tool()
async def hold(label: str, ctx: Context) -> str:
    """Report that it started, then wait for a minute unless cancelled first."""
    await ctx.report_progress(0, 1, f"holding {label}")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        CANCELLED.append(label)
        raise
    return "held to the end"


@mcp.tool()
def cancelled() -> list[str]:
    """The labels of the holds that were cancelled."""
    return CANCELLED


@mcp.tool()
def link() -> list[ResourceLink]:
    """A link to the stats resource."""
    return [ResourceLink(type="resource_link", name="stats", uri="search://stats")]


@mcp.resource("search://stats", mime_type="application/json")
def stats() -> str:
    """Search statistics."""
    return '{"queries": 3}'


@mcp.resource("search://results/{topic}")
def results(topic: str) -> str:
    """The results for a topic."""
    return f"results about {topic}"


@mcp.prompt()
def summarize(topic: str) -> str:
    """Ask for a summary of `topic`."""
    return f"Summarize what is known about {topic}."


instrument(mcp)

if __name__ == "__main__":
    mcp.run("streamable-http", port=int(sys.argv[1]))
