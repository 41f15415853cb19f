"""An OpenAI upstream that streams a token an event, each event its own write, as
OpenAI's API does: `--events` chunks `--gap-ms` apart, then a usage chunk and
`[DONE]`. Any other request gets a small whole answer. Also the bare byte relay that is
the floor of a stream's cost (`relay` below).

    python bench/benchlib/token_upstream.py serve PORT EVENTS GAP_MS
    python bench/benchlib/token_upstream.py relay PORT UPSTREAM_PORT

nginx cannot pace a stream event by event without `limit_rate`, which paces bytes, not
events; this server is the suite's stand-in for a model that generates as it sends.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import orjson
import uvloop

TOKEN = " word"


def _event(chunk: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def token_event() -> bytes:
    """One chunk of a stream as OpenAI sends it: one token's delta."""
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-model",
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": TOKEN},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    )


def closing_events(events: int) -> bytes:
    usage = {"prompt_tokens": 10, "completion_tokens": events, "total_tokens": 10 + events}
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [],
        "usage": usage,
    }
    return _event(chunk) + b"data: [DONE]\n\n"


_WHOLE = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }
)


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: int, gap: float
) -> None:
    event = _chunked(token_event())
    closing = _chunked(closing_events(events)) + b"0\r\n\r\n"
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if b'"stream":true' not in body.replace(b" ", b""):
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_WHOLE), _WHOLE)
                )
                continue
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for _ in range(events):
                writer.write(event)
                await writer.drain()
                await asyncio.sleep(gap)
            writer.write(closing)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(port: int, events: int, gap: float) -> None:
    server = await asyncio.start_server(lambda r, w: _answer(r, w, events, gap), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class _ToCaller(asyncio.Protocol):
    def __init__(self, caller: asyncio.Transport) -> None:
        self.caller = caller

    def data_received(self, data: bytes) -> None:
        self.caller.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.caller.close()


class _FromCaller(asyncio.Protocol):
    """A caller's connection, relayed byte for byte to its own upstream connection:
    what any relay of a stream must do (a read and a write per event), and nothing else."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.caller = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(
            lambda: _ToCaller(self.caller), "127.0.0.1", self.upstream_port
        )
        self.upstream = cast(asyncio.Transport, upstream)
        for data in self.early:
            upstream.write(data)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def relay(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FromCaller(upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    what, *values = sys.argv[1:]
    if what == "serve":
        uvloop.run(serve(int(values[0]), int(values[1]), float(values[2]) / 1000))
    else:
        uvloop.run(relay(int(values[0]), int(values[1])))
