"""How the gateway names what its upstream servers offer: one namespace per server.

Tools and prompts are `SERVER.NAME` (`search.query`). Resources are
`metergate://SERVER/URI`, the server's own URI appended verbatim
(`metergate://files/file:///readme.md`). Both are plain prefixes, so they round-trip
exactly and need no escaping: server names cannot hold `.` or `/`, so the first of
either ends the server's name. The resource prefix also commutes with URI templates:
`file:///{path}` becomes `metergate://files/file:///{path}`, whose expansion is the
namespaced form of the server's own expansion. The result is a valid URI (scheme
`metergate`, authority the server's name, the server's URI as its path).

No `mcp` SDK import: the config module validates allow-lists with these.
"""

from __future__ import annotations

SEPARATOR = "."
"""Between a server's name and its tool's or prompt's name: `search.query`."""

RESOURCE_PREFIX = "metergate://"
"""Namespaced resource URIs and URI templates start with this, then `SERVER/`."""


def qualify(server: str, name: str) -> str:
    """`search` + `query` -> `search.query`."""
    return f"{server}{SEPARATOR}{name}"


def split_name(qualified: str) -> tuple[str, str] | None:
    """`search.query` -> (`search`, `query`); None when it names no server's item."""
    server, sep, name = qualified.partition(SEPARATOR)
    return (server, name) if sep and server and name else None


def qualify_uri(server: str, uri: str) -> str:
    """`files` + `file:///readme.md` -> `metergate://files/file:///readme.md` (templates too)."""
    return f"{RESOURCE_PREFIX}{server}/{uri}"


def split_uri(namespaced: str) -> tuple[str, str] | None:
    """The inverse of `qualify_uri`: (server, the server's own URI, maybe empty), or None."""
    if not namespaced.startswith(RESOURCE_PREFIX):
        return None
    server, sep, uri = namespaced[len(RESOURCE_PREFIX) :].partition("/")
    return (server, uri) if sep and server else None
