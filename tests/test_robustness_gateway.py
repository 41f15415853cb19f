"""No caller can hurt another, and no reload or new key fails a request.

- Input bounds are enforced once, at parse time (JSON depth), and whatever was accepted
  can be encoded by every later stage; a gateway bug is `gateway_error`, never charged
  to the upstream, so one key cannot open a circuit that every other key depends on.
- A request keeps the plan it arrived on: a reload while its body arrives, during a
  retry's wait, or mid-stream changes nothing for it, and the old plan's adapters close
  only when its last request ends.
- A key works on its first request the moment it is created, on every worker.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
import yaml
from aiohttp import web

from metergate.providers.openai import OpenAIAdapter
from tests.harness import (
    BackgroundLoop,
    Gateway,
    UpstreamServer,
    eventually,
    simulated_config,
    write_config,
)
from tests.services import GatewayProcess, create_key_sync
from tests.upstreams.fault_server import Fault, FaultServer

ASK = [{"role": "user", "content": "hi"}]
ATTEMPTS = "metergate_upstream_attempts_total"
CIRCUIT = "metergate_circuit_state"


def _config(url: str, **provider: Any) -> dict[str, Any]:
    return {
        "providers": {
            "p": {"type": "openai", "base_url": f"{url}/v1", "api_key": "sk-x", **provider}
        },
        "upstreams": {"up": {"provider": "p", "model": "up-model", "price": {"input": 1}}},
        "models": {"m": {"upstreams": ["up"], "retry": {"max_retries": 2, "backoff_base": 0.01}}},
    }


def _nested(depth: int) -> Any:
    """A JSON value `depth` levels of arrays deep."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def servers(bg: BackgroundLoop) -> Any:
    made: list[FaultServer] = []

    def make(name: str) -> FaultServer:
        server = FaultServer(bg, name)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


# --- 4. input bounds and gateway faults ----------------------------------------------------


def test_json_nested_too_deep_is_refused_at_parse_time(gateway_factory, servers):
    upstream = servers("a")
    gateway = gateway_factory(_config(upstream.url))
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=ASK, extra_body={"x": _nested(300)})
    assert caught.value.code == "json_too_deep"
    assert "more than 100 levels" in caught.value.message
    assert "server.max_json_depth" in caught.value.message
    assert upstream.plan.requests == 0
    # What the parser accepts, every stage can encode: 99 levels under the body object.
    reply = client.chat.completions.create(model="m", messages=ASK, extra_body={"x": _nested(99)})
    assert reply.choices[0].message.content == "Hello from a."
    assert upstream.plan.bodies[-1]["x"] == _nested(99)


def test_lone_surrogate_escapes_are_taken_as_replacement_characters(gateway_factory, servers):
    """A client that cuts a string between the halves of an emoji (JavaScript's
    `slice` on UTF-16) sends `"\\ud83d"`: valid JSON, but no UTF-8 text. The request is
    served with U+FFFD in its place, as Go's encoding/json reads it; a body broken
    otherwise is still refused with the parser's reason."""
    upstream = servers("a")
    gateway = gateway_factory(_config(upstream.url))
    url = f"{gateway.base_url}/chat/completions"
    headers = {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "cut \\ud83d here, '
        b'and a pair \\ud83d\\ude00 kept"}], "metadata": {"\\ude00": "\\udc00"}}'
    )
    reply = httpx2.post(url, content=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "Hello from a."
    sent = upstream.plan.bodies[-1]
    assert sent["messages"][0]["content"] == "cut \ufffd here, and a pair \U0001f600 kept"
    assert sent["metadata"] == {"\ufffd": "\ufffd"}
    broken = httpx2.post(url, content=body[:-1] + b",}", headers=headers, timeout=30)
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    assert "surrogate" in broken.json()["error"]["message"]
    assert upstream.plan.requests == 1


def test_nesting_at_the_limit_is_translated_for_other_providers(bg, gateway_factory):
    """The Anthropic translation wraps the caller's JSON (tool schemas) a few levels
    deeper; a request at the depth limit must still be encoded and sent."""
    from tests.upstreams.anthropic_server import API_KEY, create_app

    upstream = UpstreamServer(bg, create_app())
    gateway = gateway_factory(
        {
            "providers": {"c": {"type": "anthropic", "base_url": upstream.url, "api_key": API_KEY}},
            "upstreams": {"c-up": {"provider": "c", "model": "claude-test-1"}},
            "models": {"claude": {"upstreams": ["c-up"]}},
        }
    )
    schema: Any = {"type": "string"}
    for _ in range(47):  # 2 levels per step: 94 + the tool's own wrapping < 100
        schema = {"type": "object", "properties": {"inner": schema}}
    tool = {"type": "function", "function": {"name": "deep", "parameters": schema}}
    reply = gateway.client().chat.completions.create(model="claude", messages=ASK, tools=[tool])
    assert reply.choices[0].message is not None
    upstream.close()


def test_a_gateway_bug_is_a_gateway_error_and_never_opens_the_circuit(
    gateway_factory, servers, monkeypatch
):
    """One key's requests hit a bug of the gateway: they fail as `gateway_error`, and
    every other key keeps being served by the same, healthy upstream."""
    upstream = servers("a")
    gateway = gateway_factory(_config(upstream.url))
    real_chat = OpenAIAdapter.chat

    async def chat_with_a_bug(self: OpenAIAdapter, call: Any) -> Any:
        if call.body.get("user") == "trips-the-bug":
            raise RuntimeError("a bug in the gateway")
        return await real_chat(self, call)

    monkeypatch.setattr(OpenAIAdapter, "chat", chat_with_a_bug)
    client = gateway.client()
    for _ in range(8):  # more than the breaker's failure_threshold (5)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=ASK, user="trips-the-bug")
        assert caught.value.status_code == 500
        assert "quote request id" in caught.value.message
    assert gateway.metric(CIRCUIT, upstream="up") == 0
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="gateway_error") == 8
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="upstream_error") == 0
    other = openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.new_key("other"), max_retries=0
    )
    assert other.chat.completions.create(model="m", messages=ASK).choices[0].message.content
    outcomes = [row["outcome"] for row in gateway.ledger_rows()]
    assert outcomes == ["gateway_error"] * 8 + ["success"]


# --- 5. reloads at every await point -------------------------------------------------------


def _reload(gateway: Gateway, config: dict[str, Any]) -> None:
    path = Path(gateway.runtime.source)
    ledger = gateway.runtime.plan.config.ledger.model_dump()
    path.write_text(yaml.safe_dump({**config, "ledger": ledger}, sort_keys=False))
    assert gateway.bg.run(gateway.runtime.reload_from_source("test"))


def _adapter_closed(gateway: Gateway, adapter: Any) -> bool:
    return gateway.bg.run(eventually(lambda: adapter.transport.client is None))


def test_a_reload_while_the_body_arrives_serves_it_on_the_plan_it_arrived_on(
    gateway_factory, servers
):
    a, b = servers("a"), servers("b")
    gateway = gateway_factory(_config(a.url))
    old_plan = gateway.runtime.plan
    old_adapter = old_plan.adapters["p"]
    body = orjson.dumps({"model": "m", "messages": ASK})
    port = int(gateway.base_url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (gateway.key.encode(), len(body), body[:10])
        )
        assert gateway.bg.run(eventually(lambda: old_plan.active == 1))  # it has arrived
        _reload(gateway, _config(b.url))  # the provider now points elsewhere
        sock.sendall(body[10:])
        answer = _read_answer(sock)
    assert b" 200 OK" in answer.split(b"\r\n", 1)[0]
    assert b"Hello from a." in answer  # the plan it arrived on, not the new one
    assert (a.plan.requests, b.plan.requests) == (1, 0)
    assert _adapter_closed(gateway, old_adapter)
    reply = gateway.client().chat.completions.create(model="m", messages=ASK)
    assert reply.choices[0].message.content == "Hello from b."


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_a_reload_during_a_retry_wait_does_not_fail_the_retry(gateway_factory, servers):
    """The old adapter must stay open until the request that still needs it ends."""
    a = servers("a")
    gateway = gateway_factory(_config(a.url))
    old_adapter = gateway.runtime.plan.adapters["p"]
    a.plan.then(Fault.error(503, retry_after="1"))  # the retry waits 1 s
    result: dict[str, Any] = {}

    def call() -> None:
        client = gateway.client()
        result["reply"] = client.chat.completions.with_raw_response.create(model="m", messages=ASK)

    caller = threading.Thread(target=call)
    caller.start()
    assert gateway.bg.run(eventually(lambda: a.plan.requests == 1))
    _reload(gateway, _config(a.url, headers={"x-config": "2"}))  # replaces the adapter
    assert gateway.runtime.plan.adapters["p"] is not old_adapter
    caller.join(30)
    raw = result["reply"]
    assert raw.headers["x-metergate-attempts"] == "2"
    assert raw.parse().choices[0].message.content == "Hello from a."
    assert "x-config" not in {k.lower() for k in a.plan.bodies[-1]}  # sanity: a body, no header
    assert _adapter_closed(gateway, old_adapter)


def _paced_stream_app(release: asyncio.Event, names: list[str]) -> web.Application:
    """An OpenAI-format stream: two chunks, then the rest once `release` is set."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        names.append(request.headers.get("x-config", "1"))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        def event(payload: dict[str, Any]) -> bytes:
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        base = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        words = ["one", " two", " three", " four"]
        for index, word in enumerate(words):
            if index == 2:
                await release.wait()
            choice = {"index": 0, "delta": {"content": word}, "finish_reason": None}
            await response.write(event({**base, "choices": [choice]}))
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        await response.write(event({**base, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def test_a_reload_mid_stream_lets_the_stream_finish(bg: BackgroundLoop, gateway_factory):
    release = asyncio.Event()
    seen: list[str] = []
    upstream = UpstreamServer(bg, _paced_stream_app(release, seen))
    gateway = gateway_factory(_config(upstream.url))
    old_adapter = gateway.runtime.plan.adapters["p"]
    client = gateway.client()
    stream = client.chat.completions.create(model="m", messages=ASK, stream=True)
    first = next(iter(stream))
    _reload(gateway, _config(upstream.url, headers={"x-config": "2"}))
    assert old_adapter.transport.client is not None  # still relaying: not closed under it
    bg.loop.call_soon_threadsafe(release.set)
    text = first.choices[0].delta.content + "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )
    assert text == "one two three four"
    assert _adapter_closed(gateway, old_adapter)
    assert gateway.ledger_rows()[-1]["outcome"] == "success"
    assert gateway.ledger_rows()[-1]["output_tokens"] == 4
    release.clear()
    bg.loop.call_soon_threadsafe(release.set)
    client.chat.completions.create(model="m", messages=ASK, stream=True).close()
    assert seen[0] == "1"
    upstream.close()


# --- 6. a new key works at once, on every worker -------------------------------------------


def test_a_new_key_works_on_its_first_request_on_every_worker(tmp_path: Path):
    config = write_config(simulated_config(), tmp_path)
    ledger = yaml.safe_load(config.read_text())["ledger"]["url"]
    gateway = GatewayProcess(config, tmp_path, workers=2)
    try:
        gateway.wait_ready()
        with httpx2.Client(timeout=30) as http:
            for number in range(30):
                secret = create_key_sync(ledger, f"fresh-{number}")
                reply = http.post(  # a new connection each time: either worker may answer
                    f"{gateway.base_url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                    json={"model": "sim", "messages": ASK},
                )
                assert reply.status_code == 200, (number, reply.text)
            wrong = "mgk_" + "x" * 43
            refused = http.post(
                f"{gateway.base_url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {wrong}"},
                json={"model": "sim", "messages": ASK},
            )
            assert refused.status_code == 401 and "unknown API key" in refused.text
    finally:
        gateway.kill_all()


async def test_handshake_era_mcp_clients_work_with_several_workers(tmp_path: Path):
    """A handshake-era MCP session is held in one worker's memory; with two workers on
    the port its requests reach either. Served without sessions there (each request on
    its own), every call of such a client is answered, not 'Session not found'."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from tests.mcp_servers.support import SEARCH_SERVER, running

    with running(SEARCH_SERVER, tmp_path) as search:
        config = simulated_config()
        config["mcp"] = {"servers": {"search": {"url": search.url}}}
        config["mcp"]["access"] = {"agent": {"servers": ["search"]}}
        path = write_config(config, tmp_path)
        secret = create_key_sync(yaml.safe_load(path.read_text())["ledger"]["url"], "agent")
        gateway = GatewayProcess(path, tmp_path, workers=2)
        try:
            gateway.wait_ready()
            http = httpx2.AsyncClient(  # a new connection per request: either worker answers
                headers={"Authorization": f"Bearer {secret}"},
                limits=httpx2.Limits(max_keepalive_connections=0),
                timeout=30,
            )
            transport = streamable_http_client(f"{gateway.base_url}/mcp", http_client=http)
            async with http, Client(transport, mode="legacy") as client:
                for number in range(12):
                    result = await client.call_tool("search.query", {"text": f"q{number}"})
                    assert not result.is_error, result
                    assert f"q{number}" in result.content[0].text
            # no sessions there: a handshake is one request, not a session to time
            async with httpx2.AsyncClient(timeout=30) as scraper:
                exposition = (await scraper.get(f"{gateway.base_url}/metrics")).text
            sessions = [
                float(line.rsplit(" ", 1)[1])
                for line in exposition.splitlines()
                if line.startswith("mcp_server_session_duration_seconds_count")
            ]
            assert sum(sessions) == 0, sessions
        finally:
            gateway.kill_all()


async def test_a_flood_of_unknown_keys_costs_one_lookup_at_a_time():
    from metergate.auth.index import KeyIndex
    from metergate.errors import Unauthorized

    running = 0
    most = 0
    calls = 0

    async def lookup(digests: Any) -> list[Any]:
        nonlocal running, most, calls
        calls += 1
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        return []

    async def load(since: int) -> tuple[list[Any], int]:
        return [], since

    index = KeyIndex(load, lookup)
    keys = [b"Bearer mgk_" + (b"%043d" % n) for n in range(2000)]

    async def attempt(header: bytes) -> None:
        with pytest.raises(Unauthorized):
            await index.authenticate({b"authorization": header})

    await asyncio.gather(*(attempt(k) for k in keys))
    assert most == 1  # never more than one query at a time
    assert calls <= 10  # 2000 misses answered in a handful of batched queries
    before = calls
    await asyncio.gather(*(attempt(k) for k in keys[:500]))  # the same wrong keys again
    assert calls == before  # proven unknown: the database is not asked again


def test_an_adapter_carried_through_reloads_stays_open_for_the_oldest_request(
    bg: BackgroundLoop, gateway_factory
):
    """Reload twice mid-stream: the adapter is carried into the second plan (its provider
    did not change), then replaced in the third. The second plan draining must not close
    it while the first plan's stream still uses it."""
    release = asyncio.Event()
    upstream = UpstreamServer(bg, _paced_stream_app(release, []))
    config = _config(upstream.url)
    gateway = gateway_factory(config)
    first_adapter = gateway.runtime.plan.adapters["p"]
    stream = gateway.client().chat.completions.create(model="m", messages=ASK, stream=True)
    first = next(iter(stream))
    carried = {**config, "models": {"m": {**config["models"]["m"], "description": "v2"}}}
    _reload(gateway, carried)
    assert gateway.runtime.plan.adapters["p"] is first_adapter  # carried over
    _reload(gateway, _config(upstream.url, headers={"x-config": "3"}))
    assert gateway.runtime.plan.adapters["p"] is not first_adapter
    assert first_adapter.transport.client is not None
    bg.loop.call_soon_threadsafe(release.set)
    rest = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert first.choices[0].delta.content + rest == "one two three four"
    assert _adapter_closed(gateway, first_adapter)
    upstream.close()
