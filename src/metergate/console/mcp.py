"""The MCP page: each MCP server behind the gateway, from the gateway's own metric samples.

It reads only the metric contract (`metergate_mcp_server_up`, and the histogram
`mcp_client_operation_duration_seconds`), never the MCP gateway's objects, so it works
with whatever registers those metrics. The counters are cumulative; a rate needs two
readings. Once the page has been read, the view samples the counters every few seconds
on its own, and each rate is over the last minute, whenever the page is read again;
until a minute of samples exists it is the average since the process started. (It used
to be against the previous read, so the window was the time since the last visit.)
Sampling stops ten minutes after the last read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from metergate.console.samples import samples
from metergate.mcp.metrics import CANCELLED

UP = "metergate_mcp_server_up"
OPERATION = "mcp_client_operation_duration_seconds"
TOOL_CALL = "tools/call"
RATE_WINDOW = 60.0  # seconds: what a rate on the page is the average over
SAMPLE_EVERY = 5.0
IDLE_STOP = 600.0  # no read for this long: stop sampling
SLOW_TOOLS = 5

log = logging.getLogger("metergate.console")


@dataclass
class _Tool:
    count: float = 0.0
    total_seconds: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


@dataclass
class _Server:
    up: float | None = None
    methods: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    errors_by_type: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tools: dict[str, _Tool] = field(default_factory=lambda: defaultdict(_Tool))

    @property
    def tool_calls(self) -> float:
        return sum(tool.count for tool in self.tools.values())

    @property
    def tool_errors(self) -> float:
        return sum(tool.errors for tool in self.tools.values())


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """`histogram_quantile` over cumulative buckets: linear within the bucket it falls in."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def _read(registry: CollectorRegistry) -> dict[str, _Server]:
    """The servers behind the gateway now: those with an up series. The gateway makes one
    for each configured server and drops it when a reload removes the server, whose
    cumulative operation counts stay (counters never go away) but are no longer shown."""
    servers: dict[str, _Server] = defaultdict(_Server)
    names = {UP, f"{OPERATION}_count", f"{OPERATION}_sum", f"{OPERATION}_bucket"}
    for sample in samples(registry, names):
        labels = sample.labels
        server = servers[labels.get("mcp_server_name", "")]
        if sample.name == UP:
            server.up = sample.value
            continue
        method, error = labels.get("mcp_method_name", ""), labels.get("error_type", "")
        tool = server.tools[labels.get("gen_ai_tool_name", "")] if method == TOOL_CALL else None
        if sample.name.endswith("_count"):
            server.methods[method] += sample.value
            failed = bool(error) and error != CANCELLED  # a caller's cancel is not the server's
            if failed:
                server.errors_by_type[error] += sample.value
            if tool is not None:
                tool.count += sample.value
                tool.errors += sample.value if failed else 0.0
        elif sample.name.endswith("_sum"):
            if tool is not None:
                tool.total_seconds += sample.value
        elif tool is not None:
            bound = float(labels["le"])
            tool.buckets[bound] = tool.buckets.get(bound, 0.0) + sample.value
    return {name: server for name, server in servers.items() if server.up is not None}


class McpView:
    """Keeps the samples rates are computed from; one per gateway app."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        window: float | None = None,
        every: float | None = None,
    ) -> None:
        self._clock = clock
        self._window = RATE_WINDOW if window is None else window
        self._every = SAMPLE_EVERY if every is None else every
        self._started = clock()
        self._snapshots: deque[tuple[float, dict[str, float]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._sampling: asyncio.Task[None] | None = None  # a sample being read in a thread
        self._last_read = self._started

    def sample(self, registry: CollectorRegistry) -> None:
        """Record each server's tool calls so far, keeping what the window needs."""
        now = self._clock()
        calls = {name: server.tool_calls for name, server in _read(registry).items()}
        self._append(now, calls)

    def _append(self, now: float, calls: dict[str, float]) -> None:
        self._snapshots.append((now, calls))
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self._window:
            self._snapshots.popleft()  # one sample at or before the window's start stays

    def _rate_base(self, now: float) -> tuple[float, dict[str, float]]:
        """The newest sample at least a window old, else the process start."""
        base: tuple[float, dict[str, float]] = (self._started, {})
        for taken, calls in self._snapshots:
            if taken > now - self._window:
                break
            base = (taken, calls)
        return base

    def _keep_sampling(self, registry: CollectorRegistry) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a direct call): whoever calls samples
            return

        def tick() -> None:
            self._timer = None
            self._sampling = loop.create_task(self._sample_off_loop(registry))

        self._timer = loop.call_later(self._every, tick)

    async def _sample_off_loop(self, registry: CollectorRegistry) -> None:
        try:
            servers = await asyncio.to_thread(_read, registry)
        except Exception:
            log.exception("could not sample the MCP metrics for the console")
        else:
            self._append(self._clock(), {name: s.tool_calls for name, s in servers.items()})
        if self._clock() - self._last_read < IDLE_STOP:
            self._keep_sampling(registry)

    async def read_off_loop(self, registry: CollectorRegistry) -> dict[str, Any]:
        """`read`, the samples read in a thread: with several workers that merges every
        worker's metric files (~15 ms, most of a second the first time in a process),
        which must not hold the requests this worker serves meanwhile."""
        return self.read(registry, await asyncio.to_thread(_read, registry))

    def read(
        self, registry: CollectorRegistry, servers: dict[str, _Server] | None = None
    ) -> dict[str, Any]:
        """The page's rows (`servers`: the samples, when already read)."""
        now = self._clock()
        self._last_read = now
        if servers is None:
            servers = _read(registry)
        since, before = self._rate_base(now)
        self._append(now, {name: s.tool_calls for name, s in servers.items()})
        self._keep_sampling(registry)
        elapsed = max(now - since, 1e-9)
        rows = []
        for name, server in sorted(servers.items()):
            calls = server.tool_calls
            slow = sorted(
                (
                    {
                        "tool": tool_name,
                        "calls": tool.count,
                        "errors": tool.errors,
                        "mean_seconds": tool.total_seconds / tool.count if tool.count else None,
                        "p95_seconds": quantile(0.95, tool.buckets),
                    }
                    for tool_name, tool in server.tools.items()
                    if tool.count
                ),
                key=lambda t: (-float(t["p95_seconds"] or 0.0), -float(t["mean_seconds"] or 0.0)),
            )
            rows.append(
                {
                    "name": name,
                    "up": server.up is not None and server.up >= 1,
                    "tool_calls": calls,
                    "tool_calls_per_second": max(0.0, calls - before.get(name, 0.0)) / elapsed,
                    "tool_error_rate": server.tool_errors / calls if calls else None,
                    "errors_by_type": dict(sorted(server.errors_by_type.items())),
                    "requests_by_method": dict(sorted(server.methods.items())),
                    "slow_tools": slow[:SLOW_TOOLS],
                }
            )
        return {"now": now, "rate_window_seconds": round(elapsed, 3), "servers": rows}
