"""Upstream quirks that production reaches daily must not become failures or outages.

Through a served gateway with the official openai SDK: answers larger than the stream
buffer, upstreams that close every connection after answering, a full connection pool
and a connect timeout (the gateway's own limits, never the upstream's fault), oversized
upstream headers, and egress through a real HTTP proxy (tinyproxy, CONNECT for TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
import pytest
from aiohttp import web

from metergate.config.model import ProviderConfig
from metergate.errors import UpstreamProtocolError
from metergate.providers.anthropic_translate import usage_of as anthropic_usage
from metergate.providers.base import Usage
from metergate.providers.bedrock_translate import usage_of as bedrock_usage
from metergate.providers.gemini_translate import usage_of as gemini_usage
from metergate.providers.http import HttpTransport, redact
from metergate.providers.openai_native import responses_usage
from tests.harness import BackgroundLoop, UpstreamServer, eventually
from tests.services import ServerProcess, binary, free_port
from tests.upstreams.fault_server import Fault, FaultServer

ASK = [{"role": "user", "content": "hi"}]
ATTEMPTS = "metergate_upstream_attempts_total"
CIRCUIT = "metergate_circuit_state"
REQUESTS = "metergate_requests_total"


def _config(url: str, *, model: str = "m", **provider: Any) -> dict[str, Any]:
    return {
        "providers": {
            "p": {
                "type": "openai",
                "base_url": f"{url}/v1",
                "api_key": "sk-robustness",
                **provider,
            }
        },
        "upstreams": {"up": {"provider": "p", "model": "up-model", "price": {"input": 1}}},
        "models": {model: {"upstreams": ["up"]}},
    }


# --- 1. whole answers larger than the stream buffer ----------------------------------------


def _embeddings_app(vectors: int) -> web.Application:
    draw = random.Random(7)
    floats = [[draw.uniform(-1, 1) for _ in range(1536)] for _ in range(vectors)]

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        data = [{"object": "embedding", "index": i, "embedding": floats[i]} for i in range(vectors)]
        usage = {"prompt_tokens": 7 * vectors, "total_tokens": 7 * vectors}
        payload = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def test_a_3_mib_embeddings_answer_passes_whole(bg: BackgroundLoop, gateway_factory):
    """100 vectors of 1536 floats (a normal batch, ~3 MiB of JSON) used to end in a 504."""
    app = _embeddings_app(100)
    upstream = UpstreamServer(bg, app)
    gateway = gateway_factory(_config(upstream.url))
    raw = gateway.client().embeddings.with_raw_response.create(model="m", input=["x"] * 100)
    assert len(raw.content) > 2.5 * 1024 * 1024  # far over the 1 MiB stream buffer
    reply = raw.parse()
    assert len(reply.data) == 100 and len(reply.data[99].embedding) == 1536
    assert gateway.metric(CIRCUIT, upstream="up") == 0
    assert gateway.ledger_rows()[-1]["outcome"] == "success"
    upstream.close()


# --- 2. upstreams that close every connection after answering ------------------------------


class ClosingUpstream:
    """An OpenAI-format upstream that answers each request, then closes the connection
    a few milliseconds later without `Connection: close`, as servers and the load
    balancers in front of them do: a request sent on it meanwhile is dropped unanswered."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.bg = bg
        self.requests = 0
        self.connections = 0

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self.server = bg.run(start())
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            body = orjson.loads(await reader.readexactly(length))
            self.requests += 1
            answer = orjson.dumps(
                {
                    "id": "chatcmpl-close",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "closing"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
                }
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(answer), answer)
            )
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.close()

    def close(self) -> None:
        self.bg.close_server(self.server)


def test_an_upstream_closing_every_connection_fails_no_request(bg: BackgroundLoop, gateway_factory):
    upstream = ClosingUpstream(bg)
    gateway = gateway_factory(_config(upstream.url))

    async def burst() -> list[int]:
        client = gateway.async_client()
        semaphore = asyncio.Semaphore(64)

        async def one() -> int:
            async with semaphore:
                reply = await client.chat.completions.with_raw_response.create(
                    model="m", messages=ASK
                )
                return int(reply.headers["x-metergate-attempts"])

        try:
            return await asyncio.gather(*(one() for _ in range(300)))
        finally:
            await client.close()

    attempts = asyncio.run(burst())
    assert attempts == [1] * 300  # a dead pooled connection is not an attempt
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="connection_error") == 0
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="success") == 300
    assert upstream.requests == 300
    upstream.close()


# --- 3. the gateway's own limits -----------------------------------------------------------


@pytest.fixture
def fault_server(bg: BackgroundLoop) -> Iterator[FaultServer]:
    server = FaultServer(bg, "p")
    yield server
    server.close()


def test_a_full_connection_pool_is_a_503_of_the_gateway_not_an_upstream_failure(
    bg: BackgroundLoop, gateway_factory, fault_server: FaultServer
):
    gateway = gateway_factory(
        _config(
            fault_server.url,
            max_connections=1,
            timeouts={"connect": 2, "first_byte": 30, "total": 30, "pool": 0.2},
        )
    )
    fault_server.plan.default = Fault.hang(8)  # the one connection stays busy for 8 s
    client = gateway.client()
    holder = threading.Thread(
        target=lambda: client.chat.completions.create(model="m", messages=ASK)
    )
    holder.start()
    assert asyncio.run(eventually(lambda: fault_server.plan.requests == 1))
    refused = []
    for _ in range(6):  # more than the breaker's failure_threshold (5)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=ASK)
        refused.append(caught.value)
    fault_server.plan.clear()
    holder.join(30)
    error = refused[0]
    assert error.status_code == 503
    assert error.code == "gateway_pool_exhausted"
    assert "max_connections: 1" in error.message and "timeouts.pool" in error.message
    assert "gateway's connection limit" in error.message
    assert fault_server.plan.requests == 1  # never retried: the upstream saw one request
    assert gateway.metric(CIRCUIT, upstream="up") == 0  # the breaker stays closed
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="gateway_error") == 6
    assert gateway.metric(REQUESTS, model="m", outcome="gateway_error") == 6
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="upstream_error") == 0
    assert client.chat.completions.create(model="m", messages=ASK).choices[0].message.content


@contextlib.contextmanager
def _no_descriptor_left() -> Iterator[None]:
    """This process (the gateway's, in these tests) at its limit of open files: every
    number below a lowered soft limit taken, so the next socket fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    taken: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
    try:
        with contextlib.suppress(OSError):
            while len(taken) < 4096:
                taken.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_running_out_of_open_files_is_a_503_of_the_gateway_not_an_upstream_failure(
    gateway_factory, fault_server: FaultServer
):
    """A gateway at its limit of open files cannot open an upstream connection: its own
    limit, to be said as such (and raised), never a failure held against the upstream
    (its breaker opening on a healthy provider)."""
    config = _config(fault_server.url)
    config["providers"]["sim"] = {"type": "simulated"}
    config["upstreams"]["sim-up"] = {"provider": "sim", "model": "sim-model"}
    config["models"]["warm"] = {"upstreams": ["sim-up"]}
    gateway = gateway_factory(config)
    client = gateway.client()
    client.chat.completions.create(model="warm", messages=ASK)  # the caller's connection
    refused = []
    with _no_descriptor_left():
        for _ in range(6):  # more than the breaker's failure_threshold (5)
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(model="m", messages=ASK)
            refused.append(caught.value)
    error = refused[0]
    assert error.status_code == 503
    assert error.code == "gateway_out_of_files"
    assert "no file descriptor left" in error.message and "LimitNOFILE" in error.message
    assert fault_server.plan.requests == 0  # nothing reached the upstream
    assert gateway.metric(CIRCUIT, upstream="up") == 0  # the breaker stays closed
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="gateway_error") == 6
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="connection_error") == 0
    assert client.chat.completions.create(model="m", messages=ASK).choices[0].message.content


@contextlib.contextmanager
def _unresponsive_listener() -> Iterator[int]:
    """A port whose accept queue is full: connecting to it hangs (the SYN is dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_a_connect_timeout_is_its_own_kind(gateway_factory):
    with _unresponsive_listener() as port:
        gateway = gateway_factory(
            _config(
                f"http://127.0.0.1:{port}",
                timeouts={"connect": 0.3, "first_byte": 30, "total": 60},
            )
        )
        config = gateway.runtime.plan.config.models["m"]
        assert config.retry.max_retries == 2
        with pytest.raises(openai.APIStatusError) as caught:
            gateway.client().chat.completions.create(model="m", messages=ASK)
    error = caught.value
    assert error.status_code == 502  # not 504: nothing was sent, nothing timed out reading
    assert error.code == "connection_error"
    assert "took longer than 0.3s" in error.message and "timeouts.connect" in error.message
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="connection_error") == 3
    assert gateway.metric(ATTEMPTS, upstream="up", outcome="timeout") == 0


# --- 7. upstream headers are bounded -------------------------------------------------------


def test_oversized_upstream_headers_are_an_upstream_error(bg: BackgroundLoop, gateway_factory):
    sent: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
            for _ in range(64):  # up to 64 MiB of one header, unless the gateway hangs up
                writer.write(b"h" * (1024 * 1024))
                await writer.drain()
                sent.append(1)
        writer.close()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handler, "127.0.0.1", 0)

    server = bg.run(start())
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    gateway = gateway_factory(
        {**_config(url), "models": {"m": {"upstreams": ["up"], "retry": {"max_retries": 0}}}}
    )
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="m", messages=ASK)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert "more than 64 KiB of status line and headers" in caught.value.message
    assert len(sent) < 16  # the gateway hung up long before 64 MiB
    bg.close_server(server)


# --- 7b. token counts an answer cannot be priced by --------------------------------------


def _usage_app(usage: dict[str, Any]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        payload = {
            "id": "chatcmpl-odd",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": usage,
        }
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize(
    ("usage", "named"),
    [
        ({"prompt_tokens": -500, "completion_tokens": 4}, "prompt_tokens: '-500'"),
        ({"prompt_tokens": 11, "completion_tokens": "4"}, "completion_tokens: '4'"),
        ({"prompt_tokens": 11, "completion_tokens": 2.5}, "completion_tokens: '2.5'"),
    ],
)
def test_unusable_token_counts_fail_the_attempt_and_refund_nothing(
    bg: BackgroundLoop, gateway_factory, usage: dict[str, Any], named: str
):
    """A negative count used to reach the budget (a refund), the counters (a ValueError
    after the answer was priced: a 500) and the ledger."""
    upstream = UpstreamServer(bg, _usage_app(usage))
    config = {**_config(upstream.url), "budgets": {"all": {"limit_usd": 100}}}
    config["models"]["m"]["retry"] = {"max_retries": 0}
    gateway = gateway_factory(config)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="m", messages=ASK)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert f"unusable token count ({named})" in caught.value.message
    [row] = gateway.ledger_rows()
    assert row["outcome"] == "upstream_error" and row["cost_nano"] == 0
    assert min(row["input_tokens"], row["output_tokens"]) == 0
    assert gateway.metric("metergate_tokens_total") == 0
    assert gateway.metric("metergate_budget_spent_usd", budget="all") == 0


@pytest.mark.parametrize(
    ("usage_of", "usage", "named"),
    [
        (anthropic_usage, {"input_tokens": 5, "output_tokens": -1}, "output_tokens"),
        (anthropic_usage, {"input_tokens": 5, "cache_read_input_tokens": "9"}, "cache_read"),
        (bedrock_usage, {"inputTokens": -3, "outputTokens": 1}, "inputTokens"),
        (gemini_usage, {"promptTokenCount": 4, "thoughtsTokenCount": -2}, "thoughtsTokenCount"),
        (responses_usage, {"input_tokens": 4, "output_tokens": [1]}, "output_tokens"),
    ],
)
def test_every_provider_refuses_unusable_counts(usage_of: Any, usage: Any, named: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=f"unusable token count \\({named}"):
        usage_of(usage)


def test_more_cached_than_sent_is_all_cached() -> None:
    usage = Usage.from_openai({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}})
    assert (usage.input_tokens, usage.cached_input_tokens) == (0, 5)
    usage = gemini_usage({"promptTokenCount": 5, "cachedContentTokenCount": 9})
    assert (usage.input_tokens, usage.cached_input_tokens) == (0, 5)


def test_a_whole_float_count_is_taken_as_the_integer(bg: BackgroundLoop, gateway_factory):
    upstream = UpstreamServer(bg, _usage_app({"prompt_tokens": 11.0, "completion_tokens": 4.0}))
    gateway = gateway_factory(_config(upstream.url))
    answer = gateway.client().chat.completions.create(model="m", messages=ASK)
    assert answer.usage is not None and answer.usage.prompt_tokens == 11
    [row] = gateway.ledger_rows()
    assert (row["input_tokens"], row["output_tokens"]) == (11, 4)


# --- 8. egress through an HTTP proxy -------------------------------------------------------


@pytest.fixture(scope="module")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real tinyproxy on loopback, logging every connection it makes for a client."""
    workdir = tmp_path_factory.mktemp("tinyproxy")

    def command(port: int) -> list[str]:
        (workdir / "tinyproxy.conf").write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Connect\n"
            f'LogFile "{workdir}/tinyproxy.log"\nPidFile "{workdir}/tinyproxy.pid"\n'
            "MaxClients 50\nAllow 127.0.0.1\n"  # no ConnectPort line: CONNECT to any port
        )
        return [binary("tinyproxy"), "-d", "-c", str(workdir / "tinyproxy.conf")]

    proxy = ServerProcess("tinyproxy", workdir, command, ready_path="")
    proxy.ready_path = ""
    started = _start_tcp(proxy)
    yield started
    started.stop()


def _start_tcp(server: ServerProcess) -> ServerProcess:
    """tinyproxy answers no health URL: ready when its port accepts connections."""
    for _ in range(3):
        server.port = free_port()
        server.process = subprocess.Popen(
            server.command(server.port),
            cwd=server.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if asyncio.run(eventually(lambda: _accepts(server.port), within=10)):
            return server
        server.stop()
    raise RuntimeError("tinyproxy did not start")


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _proxy_log(proxy: ServerProcess) -> str:
    path = Path(proxy.workdir) / "tinyproxy.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_requests_reach_the_upstream_through_the_configured_proxy(
    gateway_factory, fault_server: FaultServer, tinyproxy: ServerProcess
):
    gateway = gateway_factory(_config(fault_server.url, proxy=tinyproxy.url))
    client = gateway.client()
    assert client.chat.completions.create(model="m", messages=ASK).choices[0].message.content
    stream = client.chat.completions.create(model="m", messages=ASK, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert fault_server.plan.requests == 2
    port = fault_server.url.rsplit(":", 1)[1]
    assert asyncio.run(eventually(lambda: f"127.0.0.1:{port}" in _proxy_log(tinyproxy)))


def _tls_upstream(bg: BackgroundLoop, workdir: Path) -> tuple[str, Path, web.AppRunner]:
    openssl = binary("openssl")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    from tests.upstreams.fault_server import FaultPlan, create_app

    runner = web.AppRunner(create_app(FaultPlan(), "tls"))
    port = free_port()

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()

    bg.run(start())
    return f"https://127.0.0.1:{port}", cert, runner


def test_tls_goes_through_a_connect_tunnel_from_the_environment(
    bg: BackgroundLoop, gateway_factory, tinyproxy: ServerProcess, tmp_path: Path, monkeypatch
):
    """HTTPS_PROXY from the environment; the proxy sees only a CONNECT to host:port."""
    url, cert, runner = _tls_upstream(bg, tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    monkeypatch.setenv("NO_PROXY", "example.internal")
    gateway = gateway_factory(_config(url))
    reply = gateway.client().chat.completions.create(model="m", messages=ASK)
    assert reply.choices[0].message.content == "Hello from tls."
    port = url.rsplit(":", 1)[1]
    assert asyncio.run(eventually(lambda: f"CONNECT 127.0.0.1:{port}" in _proxy_log(tinyproxy)))
    bg.run(runner.cleanup())


def test_no_proxy_and_direct_bypass_the_proxy(
    gateway_factory, fault_server: FaultServer, monkeypatch
):
    """A dead proxy in the environment: NO_PROXY, or `proxy: direct`, must not use it."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTP_PROXY", dead)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    exempt = gateway_factory(_config(fault_server.url))
    assert exempt.client().chat.completions.create(model="m", messages=ASK).choices
    monkeypatch.setenv("NO_PROXY", "")
    own = httpx2.Client(trust_env=False)  # the test's own client goes to the gateway direct
    direct = gateway_factory(_config(fault_server.url, proxy="direct"))
    assert direct.client(http_client=own).chat.completions.create(model="m", messages=ASK)
    no_retry = {"m": {"upstreams": ["up"], "retry": {"max_retries": 0}}}
    proxied = gateway_factory({**_config(fault_server.url), "models": no_retry})
    with pytest.raises(openai.APIStatusError) as caught:
        proxied.client(http_client=own).chat.completions.create(model="m", messages=ASK)
    assert caught.value.code == "connection_error" and "through proxy" in caught.value.message


# --- credentials an upstream echoes back -----------------------------------------------------


def _echo_app() -> web.Application:
    """Refuses every request, quoting the headers it was sent (as some proxies do), in a
    whole error answer or, when streamed, in an error event after one chunk."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sent = request.headers
        quoted = f"auth was {sent.get('authorization')}; token {sent.get('x-team-token')}"
        error = orjson.dumps({"error": {"message": quoted, "type": "invalid_request_error"}})
        if not body.get("stream"):  # `user: ok` asks for the error under a 200
            status = 200 if body.get("user") == "ok" else 400
            return web.Response(status=status, body=error, content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": "x"}, "finish_reason": None}
            ],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: " + error + b"\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("way", ["error", "stream", "error under a 200"])
def test_credentials_an_upstream_echoes_never_reach_the_caller(
    bg: BackgroundLoop, gateway_factory, way: str
):
    """A credential in the provider's configured headers (a proxy's bearer token, a team
    token), not only its api_key, is taken out of the upstream's messages."""
    upstream = UpstreamServer(bg, _echo_app())
    token, team = "proxytoken0a1b2c3d4e5f6789", "teamtoken-0123456789"
    headers = {"Authorization": f"Bearer {token}", "X-Team-Token": team}
    config = _config(upstream.url, headers=headers)
    del config["providers"]["p"]["api_key"]
    gateway = gateway_factory(config)
    client = gateway.client()
    with pytest.raises(openai.APIError) as raised:
        if way == "stream":
            list(client.chat.completions.create(model="m", messages=ASK, stream=True))
        else:
            user = "ok" if way == "error under a 200" else "x"
            client.chat.completions.create(model="m", messages=ASK, user=user)
    message = str(raised.value.message) + str(getattr(raised.value, "body", ""))
    assert "auth was" in message  # the upstream's message is kept, but for the secrets
    assert token not in message and team not in message
    assert "***" in message
    upstream.close()


def test_tokens_fetched_at_run_time_are_hidden_while_they_may_be_valid() -> None:
    """Entra and Google access tokens are fetched by the gateway and sent as bearer
    headers: once fetched, upstream text that quotes one loses it, like a configured
    key; after two refreshes the oldest is no longer valid and no longer looked for."""
    config = ProviderConfig.model_validate({"type": "openai", "base_url": "http://127.0.0.1:9"})
    transport = HttpTransport(config, {}, "http://127.0.0.1:9")
    tokens = [f"eyJ0eXAiOiJKV1QifQ.token-number-{n}" for n in range(3)]
    text = f"tokens {tokens[0]} and {tokens[1]}"
    assert redact(text) == text
    transport.hide_bearer(f"authorization: Bearer {tokens[0]}\r\n".encode())
    assert redact(text) == f"tokens *** and {tokens[1]}"
    transport.hide_bearer(f"authorization: Bearer {tokens[1]}\r\n".encode())
    assert redact(text) == "tokens *** and ***"
    transport.hide_bearer(f"authorization: Bearer {tokens[2]}\r\n".encode())
    assert redact(f"{text} {tokens[2]}") == f"tokens {tokens[0]} and *** ***"
