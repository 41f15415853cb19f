"""One step of the hot path, in process, this tree against another commit's module.

    .venv/bin/python bench/steps.py head-read --baseline bde508d [--count 20000] [--rounds 7]
    .venv/bin/python bench/steps.py stream-send --baseline 736cb88 [--count 2000] [--rounds 7]
    .venv/bin/python bench/steps.py relay-layer [--count 2000] [--rounds 7]

- `head-read`: one connection of the upstream client (`providers/h1.py`) reads the same
  whole answer `--count` times (reset, feed, take; no socket, no event-loop turn), with
  nginx's 9 header lines as the suite's upstream sends them, and with 24, about what
  OpenAI's API sends (rate limits, processing time, proxy headers). µs per answer.
- `stream-send`: an app streams `--count` SSE events of ~200 bytes, one `send` each,
  through the gateway's HTTP protocol (`api/protocol.py`) with each tree's request
  cycle (`api/cycle.py`), to a transport that counts what is written. An upstream such
  as OpenAI's sends a token an event, so a long answer is this many sends. µs per chunk.

- `relayed-text`: a stream's 2,000 OpenAI token events, one `add` each, through the
  relayed-text count that bills a cut stream (`metering/estimate.py`: `RelayedText`).
  µs per event.

- `relay-layer`: an OpenAI stream of `--count` reads, one event each, through the
  pass-through's `relay` as the adapters now return it, and wrapped in the one async
  generator that re-yielded it until 2026-12-07 (`async for out in chunks: yield out`).
  No baseline commit: both sides are this tree's. µs per read.

The baseline's module is loaded from the commit beside this tree's
(`benchlib.baseline.module_at`); rounds alternate the two; medians of `--rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.server import ServerState

import metergate.api.protocol as protocol
from benchlib.baseline import module_at
from metergate.api import cycle
from metergate.metering import estimate
from metergate.providers import h1
from metergate.providers.base import StreamState
from metergate.providers.openai import _PassThrough
from metergate.providers.translation import relay
from protocol_overhead import REQUEST, Transport

# --- head-read ---------------------------------------------------------------------------

ANSWER_BODY = b"x" * 300
NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 300\r\nConnection: keep-alive\r\n"
    b"Keep-Alive: timeout=60\r\nX-Request-Id: abc\r\nCache-Control: no-cache\r\n\r\n" + ANSWER_BODY
)
MANY = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Header-%d: value-%d-abcdefghijkl\r\n" % (n, n) for n in range(22))
    + b"Content-Type: application/json\r\nContent-Length: 300\r\n\r\n"
    + ANSWER_BODY
)


async def head_read_us(module: Any, answer: bytes, count: int) -> float:
    conn = module._Connection(asyncio.get_running_loop(), 1 << 20)
    conn.transport = Transport()
    began = time.perf_counter()
    for _ in range(count):
        conn._reset(False)
        conn.idle_since = 0.0
        conn.data_received(answer)
        conn.take()
    assert conn.status == 200 and conn.done.done()
    return (time.perf_counter() - began) / count * 1e6


# --- stream-send -------------------------------------------------------------------------

EVENT = b"data: " + b"x" * 200 + b"\n\n"


class _Counting(Transport):
    """The protocol bench's transport, counting the bytes written."""

    written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)


def _streaming_app(count: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunk = {"type": "http.response.body", "body": EVENT, "more_body": True}
        for _ in range(count):
            await send(chunk)
        await send({"type": "http.response.body", "body": b""})

    return app


async def stream_send_us(module: Any, _: None, count: int) -> float:
    protocol.Cycle = module.Cycle  # type: ignore[attr-defined]
    try:
        config = Config(_streaming_app(count), lifespan="off", access_log=False)
        config.load()
        server = protocol.GuardedHttpToolsProtocol(
            config=config, server_state=ServerState(), app_state={}
        )
        transport = _Counting()
        server.connection_made(transport)  # type: ignore[arg-type]
        began = time.perf_counter()
        server.data_received(REQUEST)
        for task in list(server.tasks):  # the request's ASGI task
            await task
        spent = time.perf_counter() - began
        server.connection_lost(None)
    finally:
        protocol.Cycle = cycle.Cycle  # type: ignore[attr-defined]
    assert transport.written > count * len(EVENT)
    return spent / count * 1e6


# --- relay-layer ---------------------------------------------------------------------------

CHAT_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'


class _Reads:
    """An upstream stream as its network reads, one event each, then the end."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def __aiter__(self) -> Any:
        for _ in range(self.count):
            yield CHAT_EVENT
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        pass


async def _opened(count: int) -> Any:
    return _Reads(count)


async def _re_yielded(chunks: Any) -> Any:
    async for out in chunks:
        yield out


async def relay_layer_us(wrapped: bool, _: None, count: int) -> float:
    transport: Any = None  # only names a failure, and none comes
    chunks = relay(transport, _opened(count), _PassThrough(False, StreamState()))
    if wrapped:
        chunks = _re_yielded(chunks)
    began = time.perf_counter()
    reads = 0
    async for _ in chunks:
        reads += 1
    spent = time.perf_counter() - began
    assert reads == count + 1 or reads == count
    return spent / count * 1e6


# --- relayed-text ----------------------------------------------------------------------------


def _token_events(count: int, model: str) -> list[bytes]:
    """An OpenAI stream as a caller gets it: a token an event, one event a send."""
    words = [" the", " gateway", " relays", " every", " token", ",", " and", " bills", " it"]
    return [
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-AbC123",
                "object": "chat.completion.chunk",
                "created": 1765000000,
                "model": model,
                "system_fingerprint": "fp_1a2b3c",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": words[n % len(words)]},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        + b"\n\n"
        for n in range(count)
    ]


async def relayed_text_us(module: Any, events: list[bytes], count: int) -> float:
    relayed = module.RelayedText()
    began = time.perf_counter()
    for event in events:
        relayed.add(event)
    relayed.tokens()
    return (time.perf_counter() - began) / len(events) * 1e6


# --- the A/B -----------------------------------------------------------------------------

Timed = Callable[[Any, Any, int], Awaitable[float]]
STEPS: dict[str, tuple[str, Any, Timed, tuple[tuple[str, Any], ...], str]] = {
    "head-read": (
        "providers/h1.py",
        h1,
        head_read_us,
        (("9 header lines (nginx)", NGINX), ("24 header lines (about OpenAI's)", MANY)),
        "µs per answer",
    ),
    "stream-send": ("api/cycle.py", cycle, stream_send_us, (("a streamed chunk", None),), "µs"),
    # no module: the "baseline" side is the same relay wrapped in one re-yielding layer
    "relay-layer": ("", False, relay_layer_us, (("an upstream read, relayed", None),), "µs"),
    "relayed-text": (
        "metering/estimate.py",
        estimate,
        relayed_text_us,
        (
            (
                "an OpenAI token event, measured for the cut-stream bound",
                _token_events(2_000, "gpt-4.1"),
            ),
        ),
        "µs",
    ),
}


async def measure(step: str, baseline: Any, count: int, rounds: int) -> list[str]:
    _, current, timed, cases, unit = STEPS[step]
    rows = []
    for name, case in cases:
        before: list[float] = []
        after: list[float] = []
        for _ in range(rounds):
            before.append(await timed(baseline, case, count))
            after.append(await timed(current, case, count))
        old, new = statistics.median(before), statistics.median(after)
        rows.append(f"| {name}, {unit} | {old:.3f} | {new:.3f} | {new / old:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--baseline", help="the commit to compare with (not for relay-layer)")
    parser.add_argument("--count", type=int, default=0, help="answers or chunks per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    count = args.count or (20_000 if args.step == "head-read" else 2_000)
    path = STEPS[args.step][0]
    if path and not args.baseline:
        parser.error(f"{args.step} needs --baseline")
    with tempfile.TemporaryDirectory() as workdir:
        baseline = module_at(args.baseline, path, Path(workdir)) if path else True
        rows = asyncio.run(measure(args.step, baseline, count, args.rounds))
    before = args.baseline or "re-yielded"
    print(f"| {args.step} | {before} | this tree | this tree / baseline |")
    print("| --- | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
