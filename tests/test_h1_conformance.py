"""The hot path's HTTP/1.1 client against real servers, not only hand-written ones.

nginx (keep-alive closed after 1 s idle and after 3 requests, static bodies of 1, 16 and
60 MiB, gzip, TLS with a self-signed CA), uvicorn and aiohttp (chunked and slow bodies,
answers cut short), and a full pool. What a real server does between requests (closing
idle connections without a word) must never fail a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from aiohttp import web

from metergate.providers.h1 import (
    ConnectError,
    Deadlines,
    Disconnected,
    HttpClient,
    PoolTimeout,
    ReadTimeout,
)
from tests.services import ServerProcess, binary, certificates, free_port

WHOLE = Deadlines(connect=5, first_byte=10, total=60, idle=None)
STREAM = Deadlines(connect=5, first_byte=10, total=None, idle=10)
HEAD = b"content-type: application/json\r\naccept-encoding: gzip\r\n"
SIZES = {"1m": 1, "16m": 16, "60m": 60}  # MiB


def _body(mib: int) -> bytes:
    block = hashlib.sha256(b"%d" % mib).digest() * 32  # 1 KiB, not compressible to nothing
    return block * (1024 * mib)


# --- nginx ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int, Path]]:
    """nginx serving static answers to POST, plain and TLS: (server, TLS port, CA file)."""
    workdir = tmp_path_factory.mktemp("nginx")
    site = workdir / "site"
    site.mkdir()
    for name, mib in SIZES.items():
        (site / f"{name}.bin").write_bytes(_body(mib))
    (site / "usage.json").write_text('{"usage": {"prompt_tokens": 3}, "pad": "%s"}' % ("x" * 4096))
    ca, cert, key = certificates(workdir)
    tls_port = free_port()
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    locations = f"""
        root {site};
        keepalive_timeout 1s;
        keepalive_requests 3;
        gzip on;
        gzip_types application/json;
        gzip_min_length 100;
        location / {{
            error_page 405 =200 $uri;  # POST to a static file answers the file
        }}
        location = /ready {{ return 200 "ok"; }}"""

    def command(port: int) -> list[str]:
        (workdir / "nginx.conf").write_text(
            f"""daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    types {{ application/json json; application/octet-stream bin; }}
{temp}
    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
{locations}
    }}
}}
"""
        )
        return [binary("nginx"), "-p", str(workdir), "-c", str(workdir / "nginx.conf")]

    server = ServerProcess("nginx", workdir, command, "/ready").start()
    yield server, tls_port, ca
    server.stop()


async def test_nginx_idle_and_request_limits_never_fail_a_request(nginx):
    """keepalive_requests 3 closes every third connection; keepalive_timeout 1s closes idle
    ones without a word. Requests before and after both must succeed."""
    server, _, _ = nginx
    client = HttpClient(server.url, max_connections=2)
    expected = (Path(server.workdir) / "site" / "usage.json").read_bytes()
    for _ in range(10):
        assert (await client.post("/usage.json", HEAD, b"{}", WHOLE)).body == expected
    idle = client._idle[-1]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not idle.looks_dead():  # nginx closes it once it has been idle for 1 s
        assert loop.time() < deadline, "nginx kept the idle connection open"
        await asyncio.sleep(0.05)
    for _ in range(4):
        assert (await client.post("/usage.json", HEAD, b"{}", WHOLE)).body == expected
    await client.close()


@pytest.mark.parametrize("name", list(SIZES))
async def test_nginx_large_static_bodies_arrive_whole(nginx, name: str):
    server, _, _ = nginx
    client = HttpClient(server.url, max_connections=1)
    response = await client.post(f"/{name}.bin", HEAD, b"{}", WHOLE)
    assert response.status == 200
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(_body(SIZES[name])).digest()
    await client.close()


async def test_nginx_gzip_is_decoded(nginx):
    server, _, _ = nginx
    client = HttpClient(server.url, max_connections=1)
    response = await client.post("/usage.json", HEAD, b"{}", WHOLE)
    assert response.headers.get(b"content-encoding") == b"gzip"
    assert response.body.startswith(b'{"usage": {"prompt_tokens": 3}')
    await client.close()


async def test_nginx_tls_with_an_operators_ca(nginx, monkeypatch):
    _, tls_port, ca = nginx
    url = f"https://127.0.0.1:{tls_port}"
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await HttpClient(url, 1).post("/usage.json", HEAD, b"{}", WHOLE)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    client = HttpClient(url, max_connections=1)
    for _ in range(5):  # across keepalive_requests: TLS connections are renewed too
        response = await client.post("/16m.bin", HEAD, b"{}", WHOLE)
        assert len(response.body) == 16 * 1024 * 1024
    await client.close()


# --- uvicorn and aiohttp -------------------------------------------------------------------


async def _asgi_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if path == "/cut":
        await send({"type": "http.response.body", "body": b"data: partial\n\n", "more_body": True})
        raise RuntimeError("the application fails mid-answer")  # uvicorn drops the connection
    delay = 0.2 if path == "/slow" else 0.0
    for number in range(5):
        chunk = b"data: %d\n\n" % number
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if delay:
            await asyncio.sleep(delay)
    await send({"type": "http.response.body", "body": b""})


@contextlib.asynccontextmanager
async def _uvicorn() -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(_asgi_app, host="127.0.0.1", port=port, log_level="critical",
                            http="httptools", timeout_keep_alive=1)  # fmt: skip
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve())
    while not served.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        served.should_exit = True
        await task


async def _aiohttp_stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse()
    if request.path == "/gzip":
        response.enable_compression()
    await response.prepare(request)
    if request.path == "/cut":
        await response.write(b"data: partial\n\n")
        assert request.transport is not None
        request.transport.abort()
        return response
    for number in range(5):
        await response.write(b"data: %d\n\n" % number)
        if request.path == "/slow":
            await asyncio.sleep(0.2)
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def _aiohttp() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", _aiohttp_stream)
    runner = web.AppRunner(app, keepalive_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


SERVERS = {"uvicorn": _uvicorn, "aiohttp": _aiohttp}
EXPECTED = b"".join(b"data: %d\n\n" % n for n in range(5))


@pytest.mark.parametrize("kind", list(SERVERS))
async def test_chunked_and_slow_bodies_whole_and_streamed(kind: str):
    async with SERVERS[kind]() as url:
        client = HttpClient(url, max_connections=2)
        for path in ("/chunked", "/slow"):
            assert (await client.post(path, HEAD, b"{}", WHOLE)).body == EXPECTED
            stream = await client.stream(path, HEAD, b"{}", STREAM)
            chunks = [chunk async for chunk in stream]
            stream.close()
            assert b"".join(chunks) == EXPECTED
        await client.close()


async def test_aiohttp_gzip_stream_is_decoded():
    async with _aiohttp() as url:
        client = HttpClient(url, max_connections=1)
        response = await client.post("/gzip", HEAD, b"{}", WHOLE)
        assert response.headers.get(b"content-encoding") == b"gzip"
        assert response.body == EXPECTED
        await client.close()


@pytest.mark.parametrize("kind", list(SERVERS))
async def test_answers_cut_short_are_partial_failures(kind: str):
    async with SERVERS[kind]() as url:
        client = HttpClient(url, max_connections=1)
        with pytest.raises(Disconnected) as cut:
            await client.post("/cut", HEAD, b"{}", WHOLE)
        assert cut.value.partial is True
        stream = await client.stream("/cut", HEAD, b"{}", STREAM)
        received = []
        with pytest.raises(Disconnected):
            async for chunk in stream:
                received.append(chunk)
        stream.close()
        assert received == [b"data: partial\n\n"]
        # the pool is not poisoned: the next request works
        assert (await client.post("/chunked", HEAD, b"{}", WHOLE)).body == EXPECTED
        await client.close()


@pytest.mark.parametrize("kind", list(SERVERS))
async def test_idle_connections_closed_by_the_server_are_not_reused(kind: str):
    """Both servers close keep-alive connections idle for 1 s."""
    async with SERVERS[kind]() as url:
        client = HttpClient(url, max_connections=1)
        assert (await client.post("/chunked", HEAD, b"{}", WHOLE)).body == EXPECTED
        idle = client._idle[-1]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not idle.looks_dead():
            assert loop.time() < deadline, f"{kind} kept the idle connection open"
            await asyncio.sleep(0.05)
        assert (await client.post("/chunked", HEAD, b"{}", WHOLE)).body == EXPECTED
        await client.close()


async def test_a_full_pool_waits_then_fails_as_the_pools_own_limit():
    async with _aiohttp() as url:
        client = HttpClient(url, max_connections=2)
        slow = [asyncio.create_task(client.post("/slow", HEAD, b"{}", WHOLE)) for _ in range(2)]
        await asyncio.sleep(0)
        waiting = Deadlines(connect=5, first_byte=10, total=60, idle=None, pool=0.1)
        with pytest.raises(PoolTimeout, match="all 2 connections"):
            await client.post("/chunked", HEAD, b"{}", waiting)
        patient = Deadlines(connect=5, first_byte=10, total=60, idle=None, pool=30)
        third = asyncio.create_task(client.post("/chunked", HEAD, b"{}", patient))
        assert [r.body for r in await asyncio.gather(*slow, third)] == [EXPECTED] * 3
        await client.close()


async def test_a_stalled_stream_times_out_between_chunks():
    async with _aiohttp() as url:
        client = HttpClient(url, max_connections=1)
        stalled = Deadlines(connect=5, first_byte=10, total=None, idle=0.05)
        stream = await client.stream("/slow", HEAD, b"{}", stalled)
        with pytest.raises(ReadTimeout):
            async for _ in stream:
                pass
        stream.close()
        await client.close()


async def test_waiters_for_a_full_pool_are_all_served_even_when_one_gives_up():
    """10 slow requests through 2 connections: each waits its turn; a waiter cancelled
    while queued (its caller left) does not take a turn that the next one needs."""
    async with _aiohttp() as url:
        client = HttpClient(url, max_connections=2)
        patient = Deadlines(connect=5, first_byte=10, total=60, idle=None, pool=60)
        tasks = [asyncio.create_task(client.post("/slow", HEAD, b"{}", patient)) for _ in range(10)]
        await asyncio.sleep(0)
        tasks[5].cancel()  # queued behind the first two
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[5], asyncio.CancelledError)
        assert [r.body for i, r in enumerate(done) if i != 5] == [EXPECTED] * 9
        assert client._busy == 0 and not client._waiting
        await client.close()
