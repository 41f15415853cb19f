"""What the MCP metrics middleware adds to a call: the same trivial tool, with and without.

Three measurements, each interleaving the two variants in rounds so drift hits both:

1. the middleware alone: `MetricsMiddleware(ctx, call_next)` around a no-op `call_next`;
2. in process: the official client calling an `MCPServer` directly (no transport);
3. streamable HTTP on 127.0.0.1: two server processes, one instrumented.

    .venv/bin/python bench/mcp_overhead.py [--calls 500] [--rounds 10] [--no-http]

Prints the median per-call time of each variant and their difference. Every process it
starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from mcp import Client
from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from prometheus_client import CollectorRegistry

from metergate.mcp.metrics import server_metrics
from metergate.mcp.middleware import MetricsMiddleware, instrument


def make_server(metered: bool) -> MCPServer:
    server = MCPServer("bench", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Return `text`."""
        return text

    if metered:
        instrument(server, registry=CollectorRegistry())
    return server


async def interleave(
    variants: dict[str, Callable[[], Awaitable[Any]]], calls: int, rounds: int
) -> dict[str, list[float]]:
    """Per-call seconds of each variant, taking turns call by call (first mover alternating
    by round), so that drift and noise fall on both alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for round_ in range(rounds):
        turn = order if round_ % 2 == 0 else order[::-1]
        for _ in range(calls):
            for name, call in turn:
                started = time.perf_counter()
                await call()
                times[name].append(time.perf_counter() - started)
    return times


async def bench_middleware_alone(calls: int, rounds: int) -> dict[str, list[float]]:
    middleware = MetricsMiddleware(server_metrics(CollectorRegistry()), known_tool=lambda _: True)
    ctx: Any = ServerRequestContext(
        session=None,  # type: ignore[arg-type]
        lifespan_context={},
        protocol_version="2026-07-28",
        method="tools/call",
        params={"name": "echo", "arguments": {"text": "x"}},
        request_id=1,
    )
    result = {"content": [], "isError": False}

    async def call_next(_: Any) -> dict[str, Any]:
        return result

    return await interleave(
        {"without": lambda: call_next(ctx), "with": lambda: middleware(ctx, call_next)},
        calls * 10,
        rounds,
    )


async def bench_in_process(calls: int, rounds: int) -> dict[str, list[float]]:
    async with (
        Client(make_server(False)) as plain,
        Client(make_server(True)) as metered,
    ):
        args = {"text": "hello"}
        await plain.call_tool("echo", args)
        await metered.call_tool("echo", args)
        return await interleave(
            {
                "without": lambda: plain.call_tool("echo", args),
                "with": lambda: metered.call_tool("echo", args),
            },
            calls,
            rounds,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bench server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"bench server on {port} did not start")


@contextlib.contextmanager
def http_servers() -> Iterator[dict[str, str]]:
    """Two copies of the bench server in their own processes, one instrumented."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        urls = {}
        for name, flag in (("without", []), ("with", ["--metered"])):
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, str(Path(__file__)), "--serve", str(port), *flag],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(process)
            wait_for_port(port, process)
            urls[name] = f"http://127.0.0.1:{port}/mcp"
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


async def bench_http(urls: dict[str, str], calls: int, rounds: int) -> dict[str, list[float]]:
    async with Client(urls["without"]) as plain, Client(urls["with"]) as metered:
        args = {"text": "hello"}
        for client in (plain, metered):
            for _ in range(50):  # warm up both servers
                await client.call_tool("echo", args)
        return await interleave(
            {
                "without": lambda: plain.call_tool("echo", args),
                "with": lambda: metered.call_tool("echo", args),
            },
            calls,
            rounds,
        )


def report(title: str, times: dict[str, list[float]]) -> str:
    without = statistics.median(times["without"]) * 1e6
    with_ = statistics.median(times["with"]) * 1e6
    return (
        f"| {title} | {len(times['with'])} | {without:,.1f} µs | {with_:,.1f} µs "
        f"| {with_ - without:+,.1f} µs |"
    )


async def main(args: argparse.Namespace, urls: dict[str, str] | None) -> None:
    lines = [
        "| measurement | calls per variant | median without | median with | added |",
        "|---|---|---|---|---|",
        report("middleware alone", await bench_middleware_alone(args.calls, args.rounds)),
        report("in process (Client(server))", await bench_in_process(args.calls, args.rounds)),
    ]
    if urls is not None:
        times = await bench_http(urls, args.calls, args.rounds)
        lines.append(report("streamable HTTP, loopback", times))
    print("\n".join(lines))


def serve(port: int, metered: bool) -> None:
    make_server(metered).run("streamable-http", port=port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP measurement")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metered", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve, options.metered)
    elif options.no_http:
        asyncio.run(main(options, None))
    else:
        with http_servers() as urls:
            asyncio.run(main(options, urls))
