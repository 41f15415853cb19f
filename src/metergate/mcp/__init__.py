"""MCP for metergate: metrics middleware for MCP servers, and a metered MCP gateway.

Needs the `mcp` extra (`pip install metergate[mcp]`). Importing this package does not
import the SDK, so `metergate.mcp.config` works without it; `instrument` is loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metergate.mcp.middleware import Instrumentation, MetricsMiddleware, instrument

__all__ = ["Instrumentation", "MetricsMiddleware", "instrument"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from metergate.mcp import middleware

        return getattr(middleware, name)
    raise AttributeError(f"module 'metergate.mcp' has no attribute {name!r}")
