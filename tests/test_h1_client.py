"""The hot path's HTTP/1.1 client against raw servers that control every byte."""

from __future__ import annotations

import asyncio
import gc
import gzip
import shutil
import ssl
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from metergate.providers.h1 import (
    ConnectError,
    Deadlines,
    Disconnected,
    HttpClient,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
)

FAST = Deadlines(connect=1, first_byte=0.5, total=2, idle=None)
STREAM = Deadlines(connect=1, first_byte=0.5, total=None, idle=0.3)
HEAD = b"content-type: application/json\r\n"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    return head + await reader.readexactly(length)


@asynccontextmanager
async def server(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, list[int]]]:
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", connections
    finally:
        srv.close()


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection():
    async def handler(reader, writer):
        while True:
            request = await read_request(reader)
            writer.write(answer(b'{"echo": %d}' % len(request)))

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=4)
        for _ in range(5):
            response = await client.post("/v1/x", HEAD, b"{}", FAST)
            assert response.status == 200 and response.body.startswith(b'{"echo"')
        assert len(connections) == 1
        await client.close()


async def test_chunked_gzip_and_close_delimited_bodies():
    payload = b'{"usage": {"prompt_tokens": 3}}'
    packed = gzip.compress(payload)

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
        )
        for piece in (packed[:5], packed[5:]):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + payload)
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, max_connections=1)
        assert (await client.post("/", HEAD, b"{}", FAST)).body == payload
        assert (await client.post("/", HEAD, b"{}", FAST)).body == payload
        await client.close()


async def test_a_head_that_arrives_in_pieces_is_read_as_one():
    """The head is read once it is complete, however the reads cut it: byte by byte,
    after blank lines a server may send first, behind an interim answer, with names and
    codings in any case and whitespace around values."""
    payload = b'{"id": "x"}'
    packed = gzip.compress(payload)
    head = (
        b"\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Chunked\r\nContent-Encoding: GZIP \t\r\n"
        b"X-Spaced:   v  \r\nX-Empty:\r\n\r\n"
    )

    async def handler(reader, writer):
        await read_request(reader)
        for i in range(len(head)):
            writer.write(head[i : i + 1])
            await writer.drain()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed))
        await writer.drain()
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # no header lines at all
        await writer.drain()

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=1)
        response = await client.post("/", HEAD, b"{}", FAST)
        assert (response.status, response.body) == (200, payload)
        assert response.headers == {
            b"transfer-encoding": b"Chunked",
            b"content-encoding": b"GZIP",
            b"x-spaced": b"v",
            b"x-empty": b"",
        }
        empty = await client.post("/", HEAD, b"{}", FAST)
        assert (empty.status, empty.body, empty.headers) == (204, b"", {})
        assert len(connections) == 1  # the chunked answer ended where its chunks did
        await client.close()


async def test_headers_are_read_by_lowercase_name_and_bounded_in_number():
    many = b"".join(b"X-Filler-%d: %d\r\n" % (n, n) for n in range(125))

    async def handler(reader, writer):
        await read_request(reader)  # 128 header lines in all: the most accepted
        writer.write(answer(b"{}", b"Retry-After: 1\r\nRETRY-AFTER: 7\r\n" + many))
        await read_request(reader)  # 129: one too many
        writer.write(answer(b"{}", b"X-One: 1\r\nX-Two: 2\r\nRetry-After: 1\r\n" + many))
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, max_connections=1)
        response = await client.post("/", HEAD, b"{}", FAST)
        assert response.status == 200 and response.body == b"{}"
        assert response.headers[b"retry-after"] == b"7"  # a repeated name: its last value
        assert response.headers[b"x-filler-124"] == b"124"
        assert response.headers[b"content-length"] == b"2"
        with pytest.raises(ProtocolError, match="more than 128 headers") as refused:
            await client.post("/", HEAD, b"{}", FAST)
        assert refused.value.partial is True
        await client.close()


async def test_timeouts_and_failures_say_whether_the_answer_had_started():
    async def hang(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    async def reset_mid_body(reader, writer):
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"par')
        await writer.drain()
        writer.transport.abort()

    async with server(hang) as (url, _):
        with pytest.raises(ReadTimeout) as timed_out:
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
        assert timed_out.value.partial is False
    async with server(reset_mid_body) as (url, _):
        with pytest.raises(Disconnected) as cut:
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
        assert cut.value.partial is True
    with pytest.raises(ConnectError):
        await HttpClient("http://127.0.0.1:9", 1).post("/", HEAD, b"{}", FAST)


async def test_a_reused_connection_still_times_out_a_silent_upstream():
    """The connection's timer outlives a quick answer; on its next request it still
    enforces that request's own deadline (first byte, then the total)."""

    async def answer_once(reader, writer):
        await read_request(reader)
        writer.write(answer(b"{}"))
        await read_request(reader)  # the second request: never answered
        await asyncio.sleep(5)

    async def trickle_after_one(reader, writer):
        await read_request(reader)
        writer.write(answer(b"{}"))
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(40):  # a byte every 0.1 s: never idle for first_byte, past total
            await asyncio.sleep(0.1)
            writer.write(b" ")

    for handler, deadlines, partial in (
        (answer_once, FAST, False),
        (trickle_after_one, Deadlines(connect=1, first_byte=0.5, total=1, idle=None), True),
    ):
        async with server(handler) as (url, connections):
            client = HttpClient(url, 1)
            assert (await client.post("/", HEAD, b"{}", deadlines)).body == b"{}"
            with pytest.raises(ReadTimeout) as timed_out:
                await asyncio.wait_for(client.post("/", HEAD, b"{}", deadlines), 10)
            assert timed_out.value.partial is partial and len(connections) == 1
            await client.close()


async def test_stream_idle_timeout_applies_after_the_first_chunk():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.4)  # within first_byte (0.5)
        writer.write(b"5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.45)  # beyond stream idle (0.3)
        writer.write(b"4\r\nlate\r\n0\r\n\r\n")
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, 1)
        response = await client.stream("/", HEAD, b"{}", STREAM)
        received = []
        with pytest.raises(ReadTimeout) as stalled:
            async for chunk in response:
                received.append(chunk)
        response.close()
        assert received == [b"first"] and stalled.value.partial is True


async def test_pool_limit_makes_callers_wait_then_gives_up():
    release = asyncio.Event()

    async def handler(reader, writer):
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(answer(b"{}"))

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=2)
        slow = [asyncio.create_task(client.post("/", HEAD, b"{}", FAST)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(PoolTimeout, match="all 2 connections"):
            await client.post("/", HEAD, b"{}", Deadlines(1, 0.5, 2, None, pool=0.1))
        release.set()
        assert [r.status for r in await asyncio.gather(*slow)] == [200, 200]
        assert len(connections) == 2


async def test_tls_with_certificate_checks(tmp_path: Path, monkeypatch):
    openssl = shutil.which("openssl")
    assert openssl, "openssl ships with Debian"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await made.wait() == 0
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(b'{"secure": true}'))

    async with server(handler, tls) as (url, _):
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust it, as an operator's CA
        response = await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
        assert response.body == b'{"secure": true}'


async def test_a_whole_answer_larger_than_the_stream_buffer_is_read_at_once():
    """A 3 MiB answer (a normal embeddings batch) is more than the stream back-pressure
    mark; a whole answer must still be read to its end, not paused until it times out."""
    payload = b'{"data": "' + b"x" * (3 * 1024 * 1024) + b'"}'

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(payload))
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, 1)
        response = await client.post("/", HEAD, b"{}", FAST)
        assert response.body == payload
        await client.close()


async def test_an_answer_over_the_configured_maximum_is_refused():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(b"x" * (2 * 1024 * 1024)))
        await writer.drain()

    async with server(handler) as (url, _):
        with pytest.raises(ProtocolError, match="larger than 1 MiB"):
            await HttpClient(url, 1, max_body=1024 * 1024).post("/", HEAD, b"{}", FAST)


async def test_a_compressed_answer_is_refused_before_it_inflates_past_the_maximum():
    """512 MiB of zeros gzip to half a MiB: the client must stop at the 1 MiB maximum,
    not inflate each read (up to 256 KiB, 256 MiB inflated) before it counts."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    zeros = bytes(1024 * 1024)
    packed = b"".join(packer.compress(zeros) for _ in range(512)) + packer.flush()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(packed, b"Content-Encoding: gzip\r\n"))
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, 1, max_body=1024 * 1024)
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="larger than 1 MiB"):
                await client.post("/", HEAD, b"{}", FAST)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await client.close()
    assert peak < 32 * 1024 * 1024, f"{peak / 2**20:.0f} MiB allocated at the peak"


async def test_an_answer_refused_as_too_large_is_not_kept():
    """The refused body (up to the maximum) goes with the failure, not with the dropped
    connection, which the error's traceback keeps in a cycle: with the collector as
    rarely run as the gateway runs it, each refusal kept a whole maximum before."""

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(b"x" * (3 * 1024 * 1024)))
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, 4, max_body=2 * 1024 * 1024)
        gc.disable()
        tracemalloc.start()
        try:
            for _ in range(5):
                with pytest.raises(ProtocolError, match="larger than 2 MiB"):
                    await client.post("/", HEAD, b"{}", FAST)
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            gc.enable()
        await client.close()
    assert held < 4 * 1024 * 1024, f"{held / 2**20:.0f} MiB still held after 5 refusals"


async def test_a_slow_reader_does_not_make_the_upstream_look_idle():
    """Reading pauses while the stream's reader is behind (its caller reads slowly);
    the upstream, blocked meanwhile, is not idle: its gap starts when reading resumes."""
    payload = b"y" * (3 * 1024 * 1024)

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(payload), 64 * 1024):
            piece = payload[start : start + 64 * 1024]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with server(handler) as (url, _):
        client = HttpClient(url, 1)
        response = await client.stream("/", HEAD, b"{}", STREAM)  # stream idle 0.3 s
        received = bytearray()
        async for chunk in response:
            received += chunk
            await asyncio.sleep(0.4)  # a caller slower than the idle gap, read by read
        response.close()
        await client.close()
    assert received == payload


async def test_servers_that_close_after_every_answer_silently_fail_no_request():
    """The server closes each connection after answering, without `Connection: close`:
    a pooled connection may be dead when reused. Back-to-back requests must all succeed."""

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(b'{"ok": true}'))
        await writer.drain()
        await asyncio.sleep(0.002)  # then closed, whatever the client sent meanwhile

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=4)
        for _ in range(50):
            response = await client.post("/", HEAD, b"{}", FAST)
            assert response.body == b'{"ok": true}'
        for _ in range(10):
            stream = await client.stream("/", HEAD, b"{}", STREAM)
            assert b"".join([chunk async for chunk in stream]) == b'{"ok": true}'
            stream.close()
        assert len(connections) == 60  # each request on a connection of its own
        await client.close()


async def test_a_reused_connection_closed_as_the_request_goes_out_is_retried_once():
    """The race no readability check can close: the server takes the request on a
    kept-alive connection, then drops it unanswered. The client sends it once more on a
    fresh connection; a fresh connection that fails the same way is an error."""
    seen: list[int] = []

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(b"{}"))  # first request on the connection: answered
        await writer.drain()
        await read_request(reader)  # second: dropped without an answer
        seen.append(1)

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=1)
        assert (await client.post("/", HEAD, b"{}", FAST)).status == 200
        assert (await client.post("/", HEAD, b"{}", FAST)).status == 200
        assert len(connections) == 2 and len(seen) == 1
        await client.close()

    async def never_answer(reader, writer):
        await read_request(reader)

    async with server(never_answer) as (url, connections):
        with pytest.raises(Disconnected, match="before answering") as dropped:
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
        assert dropped.value.partial is False and len(connections) == 1


async def test_a_connection_the_server_sent_bytes_on_while_idle_is_not_reused():
    """Bytes after an answer (the start of one nobody asked for), in its read or later
    while the connection is idle, would be read as the head of the next request's
    answer: the connection is dropped as they arrive, and the next request goes out on
    a fresh one."""
    stray_sent = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        if stray_sent.is_set():  # a later connection: answered plainly
            writer.write(answer(b'{"again": true}'))
            await writer.drain()
            return
        writer.write(answer(b'{"first": true}'))
        await writer.drain()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # unasked, and cut short
        await writer.drain()
        stray_sent.set()
        while True:  # answers further requests, if the client still sends them here
            await read_request(reader)
            writer.write(answer(b'{"again": true}'))

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=1)
        assert (await client.post("/", HEAD, b"{}", FAST)).body == b'{"first": true}'
        await stray_sent.wait()
        deadline = asyncio.get_running_loop().time() + 5
        while not all(idle.closed for idle in client._idle):  # with the answer, or after
            assert asyncio.get_running_loop().time() < deadline, "the connection was kept"
            await asyncio.sleep(0.01)
        second = await client.post("/", HEAD, b"{}", FAST)
        assert second.body == b'{"again": true}' and len(connections) == 2
        await client.close()


async def test_interim_answers_before_the_final_one_are_skipped():
    """HTTP/1.1 lets a server send 1xx answers before the final one, asked for or not
    (`103 Early Hints` from a CDN, `100 Continue`): the client reads past them, whole
    answer or stream, and the connection stays usable. `101 Switching Protocols`, which
    the client never asks for, is a broken answer."""

    async def handler(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"ok": true}', HEAD))
            await writer.drain()

    async with server(handler) as (url, connections):
        client = HttpClient(url, max_connections=1)
        for _ in range(3):
            response = await client.post("/", HEAD, b"{}", FAST)
            assert (response.status, response.body) == (200, b'{"ok": true}')
            assert response.headers[b"content-type"] == b"application/json"
            assert b"link" not in response.headers  # the interim answer's
        stream = await client.stream("/", HEAD, b"{}", STREAM)
        assert stream.status == 200
        assert b"".join([chunk async for chunk in stream]) == b'{"ok": true}'
        stream.close()
        assert len(connections) == 1
        await client.close()

    async def switching(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client leaves

    async with server(switching) as (url, _):
        with pytest.raises(ProtocolError, match="switched protocols") as refused:
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
        assert refused.value.partial is True


async def test_header_bytes_and_count_are_bounded():
    async def huge_header(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(64):  # 64 MiB, unless the client hangs up first
            writer.write(b"a" * (1024 * 1024))
            await writer.drain()

    async def many_headers(reader, writer):
        await read_request(reader)
        lines = b"".join(b"X-H%d: v\r\n" % i for i in range(500))
        writer.write(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\n{}")
        await writer.drain()

    async def endless_interim(reader, writer):  # interim answers count toward the bound
        await read_request(reader)
        for _ in range(100_000):  # ~3 MiB, unless the client hangs up first
            writer.write(b"HTTP/1.1 100 Continue\r\nX-Pad: 0123456789\r\n\r\n")
            await writer.drain()

    async with server(huge_header) as (url, _):
        with pytest.raises(ProtocolError, match="64 KiB"):
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)
    async with server(endless_interim) as (url, _):
        with pytest.raises(ProtocolError, match="64 KiB"):
            await HttpClient(url, 1).stream("/", HEAD, b"{}", STREAM)
    async with server(many_headers) as (url, _):
        with pytest.raises(ProtocolError, match="headers"):
            await HttpClient(url, 1).post("/", HEAD, b"{}", FAST)


async def test_a_trickling_answer_is_bounded_by_the_total_deadline():
    """Bytes arriving within every gap keep an answer alive, but not past its total."""

    async def trickle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with server(trickle) as (url, _):
        trickling = Deadlines(connect=1, first_byte=0.5, total=1.0, idle=None)
        with pytest.raises(ReadTimeout, match="did not finish") as late:
            await HttpClient(url, 1).post("/", HEAD, b"{}", trickling)
        assert late.value.partial is True
