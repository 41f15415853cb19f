"""Configuration of the MCP gateway: upstream servers and which key may use which tools.

Plain pydantic, no `mcp` SDK import, so a config file can be checked without the
`metergate[mcp]` extra installed. The base is its own copy of config.model's `Strict`
(unknown keys are errors) rather than an import of it: config.model imports this module
for its `mcp:` section, and importing back would be a cycle.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEPARATOR = "."
"""Between a server's name and its tool's name in the gateway's tool names: `search.query`."""

BUILTIN_TOOLS = ("chat", "list_models", "usage")
"""metergate's own tools on the MCP endpoint; un-namespaced, so they never clash."""

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Strict(BaseModel):
    """Unknown keys are typos in a config file, so they are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class McpServerConfig(_Strict):
    """One upstream MCP server: streamable HTTP (`url`) or a stdio subprocess (`command`)."""

    url: str | None = Field(default=None, description="streamable HTTP endpoint, e.g. …/mcp")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every request")
    command: str | None = Field(default=None, description="stdio: the executable to start")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(
        default_factory=dict, description="stdio: added to a minimal safe environment"
    )
    cwd: str | None = None
    timeout_seconds: float = Field(default=30, gt=0, description="per proxied call")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of `url` (streamable HTTP) or `command` (stdio)")
        if self.url is not None and (self.args or self.env or self.cwd):
            raise ValueError("`args`, `env` and `cwd` apply to stdio servers (`command`) only")
        if self.command is not None and self.headers:
            raise ValueError("`headers` apply to streamable HTTP servers (`url`) only")
        return self

    @property
    def transport(self) -> Literal["streamable_http", "stdio"]:
        return "streamable_http" if self.url is not None else "stdio"


class McpAccess(_Strict):
    """Upstream tools one key may list and call; metergate's own tools are always allowed.

    `servers: [search]` allows every tool of `search`; `tools` names single tools as
    `server.tool`, or `server.*` (the same as listing the server).
    """

    servers: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)

    @field_validator("tools")
    @classmethod
    def _namespaced(cls, value: list[str]) -> list[str]:
        for entry in value:
            server, sep, tool = entry.partition(SEPARATOR)
            if not sep or not server or not tool:
                raise ValueError(f"{entry!r}: name tools as SERVER{SEPARATOR}TOOL or SERVER.*")
        return value

    def allows(self, server: str, tool: str) -> bool:
        return (
            server in self.servers
            or f"{server}{SEPARATOR}*" in self.tools
            or f"{server}{SEPARATOR}{tool}" in self.tools
        )

    def may_use(self, server: str) -> bool:
        """Whether any tool of `server` may be allowed (a cheap filter before `allows`)."""
        prefix = f"{server}{SEPARATOR}"
        return server in self.servers or any(t.startswith(prefix) for t in self.tools)


class McpConfig(_Strict):
    """The `mcp:` section: upstream servers, per-key access, health checks and reconnection."""

    servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    access: dict[str, McpAccess] = Field(
        default_factory=dict, description="by gateway key name (`metergate keys create --name`)"
    )
    default_access: McpAccess = Field(
        default_factory=McpAccess, description="keys not named in `access`; default: none"
    )
    health_interval_seconds: float = Field(default=15, gt=0, description="tools/list probe")
    connect_timeout_seconds: float = Field(default=10, gt=0)
    reconnect_min_seconds: float = Field(default=0.5, gt=0)
    reconnect_max_seconds: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _references(self) -> McpConfig:
        for name in self.servers:
            if not _NAME.match(name):
                raise ValueError(
                    f"server name {name!r}: use 1-64 letters, digits, '_' or '-' (no "
                    f"{SEPARATOR!r}: it separates server and tool in tool names)"
                )
        for owner, access in [*self.access.items(), ("default_access", self.default_access)]:
            for server in [*access.servers, *(t.partition(SEPARATOR)[0] for t in access.tools)]:
                if server not in self.servers:
                    known = ", ".join(self.servers) or "none"
                    raise ValueError(
                        f"access for {owner!r} names unknown server {server!r}; servers: {known}"
                    )
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ValueError("reconnect_max_seconds must be >= reconnect_min_seconds")
        return self

    def access_for(self, key_name: str) -> McpAccess:
        return self.access.get(key_name, self.default_access)
