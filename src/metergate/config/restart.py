"""What a reload cannot change in a running process.

A reload swaps the plan (providers, routes, budgets, limits, ...) without dropping a
request, but a few settings are fixed when the process starts: the address it listens
on and its connections' limits (the HTTP protocol reads them once), the database it
records to, and whether it serves MCP at all. A reload that changes one of them is
applied for the rest and says which wait for a restart, rather than seeming to work.
"""

from __future__ import annotations

from metergate.config.model import GatewayConfig

_SERVER_AT_START = (
    "host",
    "port",
    "max_header_bytes",
    "header_timeout_seconds",
    "body_timeout_seconds",
    "idle_timeout_seconds",
    "send_timeout_seconds",
    "shutdown_grace_seconds",
    "trusted_proxies",
)


def restart_needed(started: GatewayConfig, running: GatewayConfig) -> list[str]:
    """The settings of `running` that differ from those the process `started` with and
    take effect only at the next start, as config paths (`server.port`, `ledger`)."""
    pending = [
        f"server.{name}"
        for name in _SERVER_AT_START
        if getattr(started.server, name) != getattr(running.server, name)
    ]
    if started.ledger != running.ledger:
        pending.append("ledger")
    if (started.mcp is None) != (running.mcp is None):
        pending.append("mcp (added or removed)")
    elif started.mcp and running.mcp and started.mcp.stateless != running.mcp.stateless:
        pending.append("mcp.stateless")
    return pending
