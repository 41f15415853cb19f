"""The `mcp:` config section: what is accepted, what is refused and why."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from metergate.config.model import GatewayConfig
from metergate.mcp.config import McpAccess, McpConfig
from metergate.mcp.naming import qualify_uri, split_name, split_uri

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
        ({"servers": SERVERS, "access": {"k": {"prompts": ["review"]}}}, "SERVER.PROMPT"),
        ({"servers": SERVERS, "access": {"k": {"resources": ["file:///a"]}}}, "SERVER.\\*, a URI"),
        ({"servers": SERVERS, "access": {"k": {"resources": ["metergate://mail/x"]}}}, "'mail'"),
        ({"servers": SERVERS, "access": {"k": {"resources": ["mail.*"]}}}, "unknown server 'mail'"),
        ({"servers": SERVERS, "access": {"k": {"prompts": ["mail.draft"]}}}, "unknown server"),
        # only a whole SERVER.* is a wildcard: these matched nothing, silently
        ({"servers": SERVERS, "access": {"k": {"tools": ["search.e*"]}}}, "whole SERVER.\\*"),
        ({"servers": SERVERS, "access": {"k": {"tools": ["search.*.x"]}}}, "whole SERVER.\\*"),
        ({"servers": SERVERS, "access": {"k": {"prompts": ["*.review"]}}}, "whole SERVER.\\*"),
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


def test_resource_and_prompt_allow_lists() -> None:
    """`servers:` grants a server's resources and prompts too; `resources` takes exact
    namespaced URIs, URI prefixes ending in `*`, or `SERVER.*`; `prompts` is like `tools`."""
    config = McpConfig.model_validate(
        {
            "servers": SERVERS,
            "access": {
                "whole": {"servers": ["files"]},
                "some": {
                    "resources": ["metergate://files/file:///readme.md", "search.*"],
                    "prompts": ["files.review"],
                },
                "prefix": {"resources": ["metergate://files/file:///public/*"]},
            },
        }
    )
    whole, some, prefix = (config.access_for(k) for k in ("whole", "some", "prefix"))
    assert whole.allows_resource("files", "file:///x") and whole.allows_prompt("files", "any")
    assert whole.allows_template("files", "file:///{path}")
    assert not whole.may_use_resources("search") and not whole.may_use_prompts("search")

    assert some.allows_resource("files", "file:///readme.md")
    assert not some.allows_resource("files", "file:///readme.md.bak")
    assert some.allows_resource("search", "anything://at/all")
    assert some.may_use_resources("files") and some.may_use_resources("search")
    assert not some.allows_template("files", "file:///{path}")  # could produce anything
    assert some.allows_prompt("files", "review") and not some.allows_prompt("files", "other")
    assert not some.may_use("files")  # tools are granted separately, as before

    assert prefix.allows_resource("files", "file:///public/a.txt")
    assert not prefix.allows_resource("files", "file:///private/a.txt")
    assert prefix.allows_resource("files", "file:///public/a..b/.hidden")
    for outside in (
        "file:///public/../secret",
        "file:///public/./../secret",
        "file:///public/%2E%2E/secret",
        "file:///public/%252e%252e/secret",
        "file:///public/..\\secret",
        "file:///public/..",
    ):
        assert not prefix.allows_resource("files", outside), outside
    assert prefix.allows_template("files", "file:///public/{name}")
    assert not prefix.allows_template("files", "file:///{dir}/a.txt")
    assert not prefix.may_use_prompts("files")


def test_an_allow_list_of_before_still_means_what_it_meant() -> None:
    """Configs written for the tools-only gateway parse, and grant the same tools."""
    access = McpConfig.model_validate(
        {"servers": SERVERS, "access": {"k": {"tools": ["files.read", "search.*"]}}}
    ).access_for("k")
    assert access.allows("files", "read") and access.allows("search", "x")
    assert not access.allows("files", "write")
    assert not access.may_use_resources("files") and not access.may_use_prompts("search")


@pytest.mark.parametrize(
    "uri", ["file:///a b/c.txt", "db://host/t?q=1#frag", "x:", "metergate://files/nested", "/"]
)
def test_namespaced_resource_uris_round_trip(uri: str) -> None:
    namespaced = qualify_uri("files", uri)
    assert namespaced == f"metergate://files/{uri}"
    assert split_uri(namespaced) == ("files", uri)


def test_names_and_uris_that_name_no_server() -> None:
    assert split_name("files.read.all") == ("files", "read.all")
    assert [split_name(n) for n in ("files", "files.", ".read")] == [None, None, None]
    assert [split_uri(u) for u in ("file:///a", "metergate://files", "metergate:///a")] == [
        None,
        None,
        None,
    ]
