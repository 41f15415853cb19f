"""The MCP gateway beyond tools, end to end: resources, templates, subscriptions, prompts,
progress and cancellation, through a real metergate in front of real MCP servers.

Behind the gateway: `search` (streamable HTTP, its own process, 2026-07-28), `files`
(stdio, 2026-07-28, publishes updates on listen streams) and `memos` (stdio, a
handshake-era server with `resources/subscribe` and paged resource lists). Clients are
the official `mcp` client in both protocol eras (`mode="auto"` negotiates 2026-07-28;
`mode="legacy"` opens a handshake session).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.subscriptions import ResourceUpdated
from mcp.shared.exceptions import MCPError

from metergate.mcp.gateway import McpGateway
from tests.harness import BackgroundLoop, Gateway, free_port, simulated_config, start_gateway
from tests.mcp_servers.support import (
    FILES_SERVER,
    LEGACY_SERVER,
    SEARCH_SERVER,
    HttpMcpServer,
    Samples,
    connect,
    delta,
    eventually,
    eventually_async,
    mcp_url,
    registry_samples,
    running,
)

CLIENT_OP = "mcp_client_operation_duration_seconds_count"
SERVER_OP = "mcp_server_operation_duration_seconds_count"
README = "metergate://files/file:///readme.md"
NOTES = "metergate://files/file:///notes.txt"
STATS = "metergate://search/search://stats"
TODO = "metergate://files/file:///todo.txt"  # written by the tests, read nowhere else
LATER = "metergate://files/file:///later.txt"
MEMO_A = "metergate://memos/memo://a"
MEMO_B = "metergate://memos/memo://b"
ALL_RESOURCES = {README, NOTES, STATS, MEMO_A, MEMO_B}
ERAS = ["auto", "legacy"]


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpMcpServer]:
    with running(SEARCH_SERVER, tmp_path_factory.mktemp("s")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    bg: BackgroundLoop, search: HttpMcpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, dict[str, str]]]:
    config = simulated_config()
    config["mcp"] = {
        "servers": {
            "search": {"url": search.url, "timeout_seconds": 10},
            "files": {"command": sys.executable, "args": [str(FILES_SERVER), str(free_port())]},
            "memos": {"command": sys.executable, "args": [str(LEGACY_SERVER)]},
        },
        "access": {
            "test": {"servers": ["search", "files", "memos"]},
            "reader": {"tools": ["files.read"], "resources": [README], "prompts": ["files.review"]},
            "browser": {"resources": ["metergate://files/file:///*", "memos.*"]},
        },
        "health_interval_seconds": 0.5,
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.4,
    }
    gateway = start_gateway(bg, config, tmp_path_factory.mktemp("gw"))
    keys = {
        "test": gateway.key,
        "reader": gateway.new_key("reader"),
        "browser": gateway.new_key("browser"),
        "nobody": gateway.new_key("nobody"),
    }
    yield gateway, keys
    gateway.stop()


def samples_of(gateway: Gateway) -> Samples:
    return registry_samples(gateway.runtime.metrics.registry)


def upstream_count(samples: Samples, server: str, method: str, error_type: str = "") -> float:
    labels = {
        "mcp_server_name": server,
        "mcp_method_name": method,
        "gen_ai_tool_name": "",
        "error_type": error_type,
    }
    return samples.get((CLIENT_OP, frozenset(labels.items())), 0.0)


def front_count(samples: Samples, method: str, error_type: str = "", tool: str = "") -> float:
    labels = {"mcp_method_name": method, "gen_ai_tool_name": tool, "error_type": error_type}
    return samples.get((SERVER_OP, frozenset(labels.items())), 0.0)


def text(result: Any) -> str:
    return result.content[0].text


async def all_resources(client: Any) -> tuple[list[types.Resource], int]:
    """Every resource, page after page; and how many pages it took."""
    found: list[types.Resource] = []
    cursor: str | None = None
    for pages in range(1, 20):
        page = await client.list_resources(cursor=cursor)
        found += page.resources
        cursor = page.next_cursor
        if cursor is None:
            return found, pages
    raise AssertionError("the listing never ended")


@pytest.mark.parametrize("mode", ERAS)
async def test_resources_are_listed_namespaced_and_read_through(stack: Any, mode: str) -> None:
    gateway, keys = stack
    before = samples_of(gateway)
    async with connect(mcp_url(gateway), keys["test"], mode=mode) as client:
        resources, pages = await all_resources(client)
        # memos pages its list one resource at a time; the others fit the first page
        assert pages == 2 and {r.uri for r in resources} == ALL_RESOURCES
        assert {r.name for r in resources if r.uri.startswith("metergate://memos/")} == {"a", "b"}
        templates = (await client.list_resource_templates()).resource_templates
        assert {t.uri_template for t in templates} == {
            "metergate://search/search://results/{topic}",
            "metergate://files/file:///{name}",
        }
        read = await client.read_resource(README)
        assert [(c.uri, c.text) for c in read.contents] == [(README, "# hello")]
        assert (await client.read_resource(STATS)).contents[0].text == '{"queries": 3}'
        assert (await client.read_resource(MEMO_B)).contents[0].text == "second"
        # a template expanded by the client reads through the server's own template
        topic = "metergate://search/search://results/cats"
        assert (await client.read_resource(topic)).contents[0].text == "results about cats"
    after = samples_of(gateway)
    for server, reads in (("files", 1), ("search", 2), ("memos", 1)):
        assert delta(upstream_count, before, after, server, "resources/read") == reads
    # one listing upstream per server, and the second page only from memos
    for server, listings in (("memos", 2), ("files", 1), ("search", 1)):
        assert delta(upstream_count, before, after, server, "resources/list") == listings
    assert delta(front_count, before, after, "resources/read") == 4
    assert delta(front_count, before, after, "resources/list") == 2
    assert delta(front_count, before, after, "resources/templates/list") == 1


@pytest.mark.parametrize("mode", ERAS)
async def test_prompts_are_listed_namespaced_and_got(stack: Any, mode: str) -> None:
    gateway, keys = stack
    before = samples_of(gateway)
    async with connect(mcp_url(gateway), keys["test"], mode=mode) as client:
        prompts = (await client.list_prompts()).prompts
        assert {p.name for p in prompts} == {"search.summarize", "files.review"}
        (summarize,) = [p for p in prompts if p.name == "search.summarize"]
        assert [a.name for a in summarize.arguments or []] == ["topic"]
        got = await client.get_prompt("search.summarize", {"topic": "owls"})
        assert [m.content.text for m in got.messages] == ["Summarize what is known about owls."]
        got = await client.get_prompt("files.review", {"path": "notes.txt"})
        assert got.messages[0].content.text == "Review notes.txt, please."
    after = samples_of(gateway)
    for server in ("search", "files"):
        assert delta(upstream_count, before, after, server, "prompts/get") == 1
        assert delta(upstream_count, before, after, server, "prompts/list") == 1
    # memos offers no prompts: it is not asked
    assert upstream_count(after, "memos", "prompts/list") == 0
    assert delta(front_count, before, after, "prompts/get") == 2


async def test_a_key_sees_and_uses_only_what_its_allow_list_names(stack: Any) -> None:
    gateway, keys = stack
    before = samples_of(gateway)
    async with connect(mcp_url(gateway), keys["reader"]) as client:
        assert [r.uri for r in (await client.list_resources()).resources] == [README]
        # an exact URI does not cover a template, whose expansions could be anything
        assert (await client.list_resource_templates()).resource_templates == []
        assert (await client.read_resource(README)).contents[0].text == "# hello"
        refused = []
        for uri in (NOTES, STATS, "metergate://files/file:///missing.txt", "metergate://x/y"):
            with pytest.raises(MCPError) as raised:
                await client.read_resource(uri)
            refused.append((raised.value.code, raised.value.message, raised.value.data))
        # not allowed, not there and no such server are refused alike
        assert refused == [
            (-32602, f"Unknown resource: {uri}", {"uri": uri})
            for uri in (NOTES, STATS, "metergate://files/file:///missing.txt", "metergate://x/y")
        ]
        assert [p.name for p in (await client.list_prompts()).prompts] == ["files.review"]
        for name in ("search.summarize", "nothing.here"):
            with pytest.raises(MCPError) as raised:
                await client.get_prompt(name, {"topic": "x"})
            assert (raised.value.code, raised.value.message) == (-32602, f"Unknown prompt: {name}")
    async with connect(mcp_url(gateway), keys["browser"]) as client:
        resources, _ = await all_resources(client)
        assert {r.uri for r in resources} == {README, NOTES, MEMO_A, MEMO_B}
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["metergate://files/file:///{name}"]
        assert (await client.read_resource(NOTES)).contents[0].text == "buy milk"
        # a prefix grant covers no dot segment, which a server could resolve to outside it
        for uri in ("metergate://files/file:///../readme.md", "metergate://files/file:///%2E%2e/x"):
            with pytest.raises(MCPError) as raised:
                await client.read_resource(uri)
            assert (raised.value.code, raised.value.data) == (-32602, {"uri": uri})
        assert (await client.list_prompts()).prompts == []
    async with connect(mcp_url(gateway), keys["nobody"]) as client:
        assert (await client.list_resources()).resources == []
        assert (await client.list_prompts()).prompts == []
    after = samples_of(gateway)
    # refusals never reached the servers: reader read once, browser once
    assert delta(upstream_count, before, after, "files", "resources/read") == 2
    assert delta(upstream_count, before, after, "files", "resources/read", "-32602") == 0
    assert delta(upstream_count, before, after, "search", "resources/read") == 0
    assert delta(front_count, before, after, "resources/read", "-32602") == 6


async def test_an_unknown_resource_is_a_json_rpc_error_from_the_server(stack: Any) -> None:
    gateway, keys = stack
    before = samples_of(gateway)
    missing = "metergate://files/file:///missing.txt"
    async with connect(mcp_url(gateway), keys["test"]) as client:
        with pytest.raises(MCPError) as raised:
            await client.read_resource(missing)
        assert raised.value.code == -32602
        assert raised.value.message == f"Unknown resource: {missing}"
        assert raised.value.data == {"uri": missing}
        with pytest.raises(MCPError) as raised:  # a URI the gateway does not namespace
            await client.read_resource("file:///readme.md")
        assert raised.value.code == -32602
        with pytest.raises(MCPError) as raised:
            await client.list_resources(cursor="not a cursor")
        assert (raised.value.code, raised.value.message) == (-32602, "Invalid cursor")
    after = samples_of(gateway)
    # the server said so (and is counted with its error code); the other never got there
    assert delta(upstream_count, before, after, "files", "resources/read", "-32602") == 1
    assert delta(front_count, before, after, "resources/read", "-32602") == 2


async def test_resource_links_in_tool_results_are_namespaced(stack: Any) -> None:
    gateway, keys = stack
    async with connect(mcp_url(gateway), keys["test"]) as client:
        result = await client.call_tool("search.link", {})
        (link,) = result.content
        assert isinstance(link, types.ResourceLink) and link.uri == STATS
        assert (await client.read_resource(link.uri)).contents[0].text == '{"queries": 3}'


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_reaches_the_caller_under_its_own_token(stack: Any, mode: str) -> None:
    """The client's callback fires only for its own request's token: the gateway turned
    the upstream's progress (under the token the gateway gave it) into the caller's."""
    gateway, keys = stack
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with connect(mcp_url(gateway), keys["test"], mode=mode) as client:
        result = await client.call_tool("search.steps", {"count": 3}, progress_callback=on_progress)
        assert text(result) == "3 steps done"
        await eventually(lambda: len(seen) == 3, within=5)
        # without a token of its own the caller gets no progress, and the call works
        assert text(await client.call_tool("search.steps", {"count": 2})) == "2 steps done"
    assert sorted(seen) == [(float(n), 3.0, f"step {n} of 3") for n in (1, 2, 3)]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_cancelled_call_is_cancelled_upstream(stack: Any, mode: str) -> None:
    """2026-07-28 clients cancel by closing the request's stream, handshake-era ones with
    notifications/cancelled; either way the server's handler is cancelled, and the call is
    counted as `cancelled` (the caller's doing, not a timeout of the server)."""
    gateway, keys = stack
    label = f"hold-{mode}"
    before = samples_of(gateway)
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    async def was_cancelled() -> bool:
        result = await client.call_tool("search.cancelled", {})
        return label in result.structured_content["result"]

    def hold() -> Any:
        arguments = {"label": label}
        return client.call_tool("search.hold", arguments, progress_callback=on_progress)

    async with connect(mcp_url(gateway), keys["test"], mode=mode) as client:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold)
            with anyio.fail_after(10):
                await started.wait()  # the server is holding it
            tasks.cancel_scope.cancel()
        await eventually_async(was_cancelled, within=10)
    after = samples_of(gateway)
    labels = {
        "mcp_server_name": "search",
        "mcp_method_name": "tools/call",
        "gen_ai_tool_name": "hold",
        "error_type": "cancelled",
    }
    key = (CLIENT_OP, frozenset(labels.items()))
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert delta(front_count, before, after, "tools/call", "cancelled", "search.hold") == 1
    timeouts = {**labels, "error_type": "timeout"}
    assert after.get((CLIENT_OP, frozenset(timeouts.items())), 0) == before.get(
        (CLIENT_OP, frozenset(timeouts.items())), 0
    )
    assert delta(front_count, before, after, "tools/call", "timeout", "search.hold") == 0


async def test_a_listen_stream_gets_updates_of_what_it_may_read(stack: Any) -> None:
    """2026-07-28 clients: `subscriptions/listen`, relayed from the server's own stream
    (files) or from a handshake-era server's resources/subscribe (memos)."""
    gateway, keys = stack
    before = samples_of(gateway)
    async with connect(mcp_url(gateway), keys["test"]) as client:
        async with client.listen(resource_subscriptions=[TODO, MEMO_A, "file:///x"]) as stream:
            # a URI the gateway does not serve is not honored
            assert stream.honored.resource_subscriptions == [TODO, MEMO_A]
            assert await memos_subscribed(client) == "memo://a"
            await client.call_tool("files.write", {"path": "todo.txt", "text": "call mum"})
            with anyio.fail_after(10):
                assert await anext(stream) == ResourceUpdated(uri=TODO)
            assert (await client.read_resource(TODO)).contents[0].text == "call mum"
            await client.call_tool("memos.touch", {"uri": "memo://a"})
            with anyio.fail_after(10):
                assert await anext(stream) == ResourceUpdated(uri=MEMO_A)
        # the stream's end releases the gateway's subscription upstream
        await eventually_async(lambda: nothing_subscribed(client), within=10)
    async with (
        connect(mcp_url(gateway), keys["reader"]) as client,
        client.listen(resource_subscriptions=[README, NOTES, MEMO_A]) as stream,
    ):
        assert stream.honored.resource_subscriptions == [README]
    after = samples_of(gateway)
    assert delta(upstream_count, before, after, "files", "subscriptions/listen") >= 1
    for method in ("resources/subscribe", "resources/unsubscribe"):
        assert delta(upstream_count, before, after, "memos", method) == 1
    # each stream is timed when it ends, which the gateway sees a moment after the client
    opened = front_count(before, "subscriptions/listen")
    await eventually(
        lambda: front_count(samples_of(gateway), "subscriptions/listen") - opened == 2, within=10
    )


async def memos_subscribed(client: Any) -> str:
    return text(await client.call_tool("memos.subscribed", {}))


async def nothing_subscribed(client: Any) -> bool:
    return await memos_subscribed(client) == ""


async def test_a_session_subscribes_and_unsubscribes(stack: Any) -> None:
    """Handshake-era clients: resources/subscribe on the session, updates on its stream."""
    gateway, keys = stack
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(message.params.uri)

    url = mcp_url(gateway)
    async with connect(url, keys["test"], mode="legacy", message_handler=on_message) as client:
        await subscribe(client, LATER)
        await subscribe(client, MEMO_B)
        assert await memos_subscribed(client) == "memo://b"
        # the session's update stream opens on its own schedule: write until one arrives

        async def written_and_told() -> bool:
            await client.call_tool("files.write", {"path": "later.txt", "text": "soon"})
            return LATER in updates

        await eventually_async(written_and_told, within=10, interval=0.1)
        await client.call_tool("memos.touch", {"uri": "memo://b"})
        await eventually(lambda: MEMO_B in updates, within=10)
        await client.session.send_request(
            types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=MEMO_B)),
            types.EmptyResult,
        )
        await eventually_async(lambda: nothing_subscribed(client), within=10)
        with pytest.raises(MCPError) as raised:  # a server without subscriptions
            await subscribe(client, STATS)
        assert raised.value.code == -32602
        assert "does not support resource subscriptions" in raised.value.message
    async with connect(mcp_url(gateway), keys["reader"], mode="legacy") as client:
        with pytest.raises(MCPError) as raised:
            await subscribe(client, NOTES)
        assert raised.value.message == f"Unknown resource: {NOTES}"
    assert set(updates) == {LATER, MEMO_B}


async def subscribe(client: Any, uri: str) -> None:
    request = types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
    await client.session.send_request(request, types.EmptyResult)


@pytest.mark.parametrize("mode", ERAS)
async def test_the_gateway_announces_what_its_servers_offer(
    bg: BackgroundLoop, tmp_path: Path, stack: Any, mode: str
) -> None:
    gateway, keys = stack
    async with connect(mcp_url(gateway), keys["test"], mode=mode) as client:
        capabilities = client.server_capabilities
        assert capabilities.resources is not None and capabilities.resources.subscribe is True
        assert capabilities.prompts is not None and capabilities.tools is not None
    # only the handshake-era memos server: resources with subscriptions, no prompts
    config = simulated_config()
    config["mcp"] = {
        "servers": {"memos": {"command": sys.executable, "args": [str(LEGACY_SERVER)]}},
        "default_access": {"servers": ["memos"]},
    }
    only_memos = start_gateway(bg, config, tmp_path / "memos")
    config["mcp"] = {"servers": {}}
    no_servers = start_gateway(bg, config, tmp_path / "none")
    try:
        async with connect(mcp_url(only_memos), only_memos.key, mode=mode) as client:
            capabilities = client.server_capabilities
            assert capabilities.resources == types.ResourcesCapability(
                subscribe=True, list_changed=False
            )
            assert capabilities.prompts is None
        async with connect(mcp_url(no_servers), no_servers.key, mode=mode) as client:
            capabilities = client.server_capabilities
            assert capabilities.resources is None and capabilities.prompts is None
            assert capabilities.tools is not None  # metergate's own
    finally:
        only_memos.stop()
        no_servers.stop()


async def test_a_server_that_is_down_fails_fast_and_is_counted(
    bg: BackgroundLoop, tmp_path: Path
) -> None:
    flaky = HttpMcpServer(SEARCH_SERVER, free_port(), tmp_path / "flaky.log")
    flaky.start()
    config = simulated_config()
    config["mcp"] = {
        "servers": {
            "flaky": {"url": flaky.url, "timeout_seconds": 5},
            "memos": {"command": sys.executable, "args": [str(LEGACY_SERVER)]},
        },
        "default_access": {"servers": ["flaky", "memos"]},
        "health_interval_seconds": 0.2,
        "reconnect_min_seconds": 0.1,
        "reconnect_max_seconds": 0.3,
    }
    gateway = start_gateway(bg, config, tmp_path / "gw")
    stats = "metergate://flaky/search://stats"
    try:
        mcp: McpGateway = gateway.runtime.mcp
        async with connect(mcp_url(gateway), gateway.key) as client:
            assert (await client.read_resource(stats)).contents[0].text == '{"queries": 3}'
            flaky.kill()
            await eventually(lambda: not mcp.upstreams["flaky"].up, within=5)
            before = samples_of(gateway)
            with pytest.raises(MCPError) as raised:
                await client.read_resource(stats)
            assert raised.value.code == -32000 and "unavailable" in raised.value.message
            with pytest.raises(MCPError) as raised:
                await client.get_prompt("flaky.summarize", {"topic": "x"})
            assert raised.value.code == -32000
            # the listing still answers, with what the other server has
            listed = {r.uri for r in (await all_resources(client))[0]}
            assert listed == {MEMO_A, MEMO_B}
            async with client.listen(resource_subscriptions=[stats, MEMO_A]) as stream:
                assert stream.honored.resource_subscriptions == [MEMO_A]
            after = samples_of(gateway)
            for method in ("resources/read", "prompts/get", "resources/list"):
                transport = delta(upstream_count, before, after, "flaky", method, "transport")
                assert transport == 1, method
            assert delta(front_count, before, after, "resources/read", "transport") == 1
            # the gauge says so, unchanged
            up = samples_of(gateway).get(
                ("metergate_mcp_server_up", frozenset({("mcp_server_name", "flaky")}))
            )
            assert up == 0
    finally:
        gateway.stop()
        flaky.stop()


async def test_subscriptions_are_taken_up_again_when_a_server_comes_back(stack: Any) -> None:
    """Last in this module: it kills the stdio `files` server (the gateway restarts it)."""
    gateway, keys = stack
    events: list[Any] = []

    async def collect(stream: Any) -> None:
        async for event in stream:
            events.append(event)

    async def written_and_told() -> bool:
        try:
            await client.call_tool("files.write", {"path": "todo.txt", "text": "again"})
        except MCPError:  # the server is not back yet
            return False
        return ResourceUpdated(uri=TODO) in events

    async with (
        connect(mcp_url(gateway), keys["test"]) as client,
        client.listen(resource_subscriptions=[TODO]) as stream,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(collect, stream)
        first = int(text(await client.call_tool("files.pid", {})))
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: not gateway.runtime.mcp.upstreams["files"].up, within=10)
        await eventually_async(written_and_told, within=15, interval=0.1)
        assert int(text(await client.call_tool("files.pid", {}))) != first
        tasks.cancel_scope.cancel()
