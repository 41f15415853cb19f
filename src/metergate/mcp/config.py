"""Configuration of the MCP gateway: upstream servers, and what each key may use of them.

Plain pydantic, no `mcp` SDK import, so a config file can be checked without the
`metergate[mcp]` extra installed. The base is its own copy of config.model's `Strict`
(unknown keys are errors) rather than an import of it: config.model imports this module
for its `mcp:` section, and importing back would be a cycle.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import unquote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from metergate.mcp.naming import RESOURCE_PREFIX, SEPARATOR, qualify_uri, split_uri

__all__ = ["BUILTIN_TOOLS", "SEPARATOR", "McpAccess", "McpConfig", "McpServerConfig"]

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
    max_connections: int = Field(
        default=100,
        ge=1,
        description="HTTP: requests in flight at once; more wait, within their timeout_seconds",
    )
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="largest answer accepted (SSE: each event; stdio: each line); larger fail",
    )

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
    """What one key may list and use upstream; metergate's own tools are always allowed.

    `servers: [search]` allows everything of `search`: its tools, resources and prompts.
    `tools` and `prompts` name single items as `server.name`, or `server.*` for all of a
    server's tools or prompts. `resources` holds `server.*` (all of a server's
    resources), namespaced URIs (`metergate://files/file:///readme.md`), or namespaced
    URI prefixes ending in `*` (`metergate://files/file:///public/*`).
    """

    servers: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    resources: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)

    @field_validator("tools", "prompts")
    @classmethod
    def _namespaced(cls, value: list[str], info: ValidationInfo) -> list[str]:
        kind = "TOOL" if info.field_name == "tools" else "PROMPT"
        for entry in value:
            server, sep, name = entry.partition(SEPARATOR)
            if not sep or not server or not name:
                raise ValueError(f"{entry!r}: name them as SERVER{SEPARATOR}{kind} or SERVER.*")
            if "*" in server or ("*" in name and name != "*"):
                raise ValueError(
                    f"{entry!r}: only a whole SERVER.* is a wildcard (no prefix patterns "
                    "such as search.get_*); list the names one by one"
                )
        return value

    @field_validator("resources")
    @classmethod
    def _resource_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not (entry.endswith(f"{SEPARATOR}*") or _resource_server(entry)):
                raise ValueError(
                    f"{entry!r}: give SERVER.*, a URI {RESOURCE_PREFIX}SERVER/URI, or a URI "
                    f"prefix ending in *"
                )
        return value

    def allows(self, server: str, tool: str) -> bool:
        """Whether the key may list and call `tool` of `server`."""
        return _named(server, tool, self.servers, self.tools)

    def may_use(self, server: str) -> bool:
        """Whether any tool of `server` may be allowed (a cheap filter before `allows`)."""
        return _any_named(server, self.servers, self.tools)

    def allows_prompt(self, server: str, prompt: str) -> bool:
        return _named(server, prompt, self.servers, self.prompts)

    def may_use_prompts(self, server: str) -> bool:
        return _any_named(server, self.servers, self.prompts)

    def allows_resource(self, server: str, uri: str) -> bool:
        """Whether the key may read (and subscribe to) `uri`, the server's own URI."""
        if server in self.servers or f"{server}{SEPARATOR}*" in self.resources:
            return True
        namespaced = qualify_uri(server, uri)
        return any(
            _under_prefix(namespaced, entry[:-1]) if entry.endswith("*") else namespaced == entry
            for entry in self.resources
        )

    def allows_template(self, server: str, uri_template: str) -> bool:
        """Whether every URI the template can produce is allowed: the whole server's
        resources, or a URI prefix that the template's literal start already carries."""
        if self._all_resources(server):
            return True
        literal = qualify_uri(server, uri_template.partition("{")[0])
        return any(
            entry.endswith("*") and literal.startswith(entry[:-1]) for entry in self.resources
        )

    def may_use_resources(self, server: str) -> bool:
        return self._all_resources(server) or any(
            _resource_server(entry) == server for entry in self.resources
        )

    def _all_resources(self, server: str) -> bool:
        return server in self.servers or f"{server}{SEPARATOR}*" in self.resources

    def named_servers(self) -> list[str]:
        """Every server this allow-list mentions, for the config's reference check."""
        named = [*self.servers]
        named += [entry.partition(SEPARATOR)[0] for entry in (*self.tools, *self.prompts)]
        for entry in self.resources:
            named.append(_resource_server(entry) or entry.partition(SEPARATOR)[0])
        return named


def _named(server: str, name: str, servers: list[str], entries: list[str]) -> bool:
    return (
        server in servers
        or f"{server}{SEPARATOR}*" in entries
        or f"{server}{SEPARATOR}{name}" in entries
    )


def _any_named(server: str, servers: list[str], entries: list[str]) -> bool:
    prefix = f"{server}{SEPARATOR}"
    return server in servers or any(entry.startswith(prefix) for entry in entries)


def _under_prefix(namespaced: str, prefix: str) -> bool:
    """Whether a URI lies under a prefix grant. A `.` or `..` segment after the prefix
    (also percent-encoded, or between backslashes) is refused: a server that resolves it
    would serve what lies outside, `file:///public/../secret` from a `file:///public/*`
    grant."""
    if not namespaced.startswith(prefix):
        return False
    rest = namespaced[len(prefix) :]
    for _ in range(3):  # %252e%252e is %2e%2e once decoded, `..` twice
        decoded = unquote(rest)
        if decoded == rest:
            break
        rest = decoded
    else:
        return False  # still encoded after three passes: no honest URI looks like that
    return not any(segment in (".", "..") for segment in _SEGMENT_SEPARATORS.split(rest))


_SEGMENT_SEPARATORS = re.compile(r"[/\\?#]")


def _resource_server(entry: str) -> str | None:
    """The server of a namespaced URI (or URI prefix) entry: `metergate://files/...`."""
    found = split_uri(entry)
    return found[0] if found else None


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
    stateless: bool | None = Field(
        default=None,
        description="serve handshake-era clients without sessions, each request on its "
        "own; default: so when several processes share the port (serve --workers N), "
        "where a session held in one worker's memory is unknown to the others",
    )

    @model_validator(mode="after")
    def _references(self) -> McpConfig:
        for name in self.servers:
            if not _NAME.match(name):
                raise ValueError(
                    f"server name {name!r}: use 1-64 letters, digits, '_' or '-' (no "
                    f"{SEPARATOR!r}: it separates server and tool in tool names)"
                )
        for owner, access in [*self.access.items(), ("default_access", self.default_access)]:
            for server in access.named_servers():
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
