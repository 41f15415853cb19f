"""The `mcp:` config section: what is accepted, what is refused and why."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from metergate.config.model import GatewayConfig
from metergate.mcp.config import McpAccess, McpConfig

SERVERS = {
    "search": {"url": "http://127.0.0.1:9001/mcp", "headers": {"Authorization": "Bearer t"}},
    "files": {"command": "files-mcp", "args": ["--root", "/srv"], "env": {"A": "1"}},
}


def test_a_full_section_parses_with_defaults() -> None:
    config = McpConfig.model_validate(
        {"servers": SERVERS, "access": {"agent": {"servers": ["search"], "tools": ["files.read"]}}}
    )
    assert config.servers["search"].transport == "streamable_http"
    assert config.servers["files"].transport == "stdio"
    assert config.servers["files"].timeout_seconds == 30
    agent = config.access_for("agent")
    assert agent.allows("search", "anything") and agent.allows("files", "read")
    assert not agent.allows("files", "write")
    assert config.access_for("stranger") == McpAccess()  # default: only metergate's tools
    assert not config.access_for("stranger").may_use("search")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"servers": {"x": {}}}, "exactly one of `url`"),
        ({"servers": {"x": {"url": "http://a/mcp", "command": "c"}}}, "exactly one of `url`"),
        ({"servers": {"x": {"url": "ftp://a"}}}, "http:// or https://"),
        ({"servers": {"x": {"url": "http://a/mcp", "args": ["-v"]}}}, "stdio servers"),
        ({"servers": {"x": {"command": "c", "headers": {"a": "b"}}}}, "streamable HTTP"),
        ({"servers": {"a.b": {"command": "c"}}}, "server name 'a.b'"),
        ({"servers": SERVERS, "access": {"k": {"servers": ["nope"]}}}, "unknown server 'nope'"),
        ({"servers": SERVERS, "access": {"k": {"tools": ["read"]}}}, "SERVER.TOOL"),
        ({"servers": SERVERS, "default_access": {"tools": ["mail.send"]}}, "unknown server 'mail'"),
        ({"servers": SERVERS, "timeout": 3}, "Extra inputs are not permitted"),
        ({"servers": {"x": {"command": "c", "timeout_seconds": 0}}}, "greater than 0"),
    ],
)
def test_mistakes_are_refused_with_a_reason(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        McpConfig.model_validate(section)


def test_the_section_nests_in_the_gateway_config_as_the_wiring_proposes() -> None:
    """`mcp: McpConfig | None = None` on GatewayConfig: no import cycle, strictness kept."""

    class Wired(GatewayConfig):
        mcp: McpConfig | None = None

    assert Wired.model_validate({}).mcp is None
    assert (
        Wired.model_validate({"mcp": {"servers": SERVERS}}).mcp.servers["files"].args[0] == "--root"
    )
    with pytest.raises(ValidationError, match="Extra inputs"):
        Wired.model_validate({"mcp": {"sevrers": {}}})


def test_the_config_needs_no_mcp_sdk() -> None:
    """Checking a config must work without the `metergate[mcp]` extra installed."""
    code = (
        "import sys, metergate.mcp.config, metergate.mcp; "
        "assert not [m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')], sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
