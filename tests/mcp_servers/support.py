"""Helpers for the MCP tests: server processes, the gateway wired in, metric samples.

`wire` does to a running GatewayApp exactly what the wiring lines proposed for
api/app.py and runtime.py do, so the tests exercise the gateway as it will be mounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Gateway, free_port

HERE = Path(__file__).parent
SEARCH_SERVER = HERE / "search_server.py"
FILES_SERVER = HERE / "files_server.py"
LEGACY_SERVER = HERE / "legacy_server.py"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class HttpMcpServer:
    """A streamable-HTTP MCP server in its own process on a loopback port."""

    def __init__(self, script: Path, port: int, log: Path) -> None:
        self.script = script
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}/mcp"
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(self.script), str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for_port(self.port, timeout, self.process)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """Die without a goodbye, as a crashed server does."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)
        self.process = None


@contextlib.contextmanager
def running(script: Path, workdir: Path) -> Iterator[HttpMcpServer]:
    """A streamable-HTTP server from `script` on a free port, for a fixture's lifetime."""
    server = HttpMcpServer(script, free_port(), workdir / "log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def mcp_url(gateway: Gateway) -> str:
    return gateway.base_url.removesuffix("/v1") + "/mcp"


@contextlib.asynccontextmanager
async def connect(url: str, key: str | None, **options: Any) -> AsyncIterator[Client]:
    """The official client, sending `Authorization: Bearer KEY` on every request;
    `options` go to `Client` (`mode="legacy"` for a handshake-era session)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(10)) as http,
        Client(streamable_http_client(url, http_client=http), **options) as client,
    ):
        yield client


async def on_the_server(
    client: Client, tool: str, arguments: dict[str, Any], within: float = 30
) -> asyncio.Task[Any]:
    """Start a call to a tool that reports progress as it starts (the test servers' `nap`,
    `hold`, `slow` of files) and return its task once the server is running it."""
    started = asyncio.Event()

    async def on_progress(done: float, total: float | None, note: str | None) -> None:
        started.set()

    call = asyncio.create_task(client.call_tool(tool, arguments, progress_callback=on_progress))
    await asyncio.wait_for(started.wait(), within)
    return call


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse(response.read().decode())


def registry_samples(registry: CollectorRegistry) -> Samples:
    samples: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample with exactly these labels (None when absent)."""
    return samples.get((name, frozenset(labels.items())))


def delta(count: Any, before: Samples, after: Samples, *labels: str) -> float:
    """How much `count(samples, *labels)` grew between two readings."""
    return count(after, *labels) - count(before, *labels)


def buckets(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts by `le`, for one label set."""
    found: dict[str, float] = {}
    for (sample, sample_labels), count in samples.items():
        got = dict(sample_labels)
        le = got.pop("le", None)
        if sample == f"{name}_bucket" and le is not None and got == labels:
            found[le] = count
    return found


async def eventually(check: Any, within: float, interval: float = 0.05) -> Any:
    """Poll `check()` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


async def eventually_async(
    check: Callable[[], Awaitable[Any]], within: float, interval: float = 0.05
) -> Any:
    """`eventually` for a check that must await (a call through an MCP client)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


def names(tools: Iterable[Any]) -> set[str]:
    return {tool.name for tool in tools}
