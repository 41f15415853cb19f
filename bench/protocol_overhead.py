"""What the slow-client limits cost a request: uvicorn's httptools protocol against
metergate's guarded subclass (`metergate.api.protocol`), in process on uvloop.

One kept-alive connection with an in-memory transport, a trivial ASGI app, and a
typical chat request (headers and body in one read, as a service's client sends it):
only the protocol differs. Best and median of `--rounds` timings of `--count` requests,
alternating the two, so machine noise inflates neither side more than the other.

    .venv/bin/python bench/protocol_overhead.py [--rounds 15] [--count 5000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from metergate.api.protocol import GuardedHttpToolsProtocol

BODY = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
    b"Authorization: Bearer mgk_" + b"x" * 43 + b"\r\n"
    b"Content-Type: application/json\r\nUser-Agent: OpenAI/Python 1.50\r\n"
    b"Accept: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
)


async def app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class Transport:
    """Enough of an asyncio transport for the protocol: writes are dropped."""

    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 4000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


async def per_request_ns(protocol_class: type[HttpToolsProtocol], count: int) -> float:
    config = Config(
        app,
        http=protocol_class,
        lifespan="off",
        proxy_headers=False,
        access_log=False,
        log_level="warning",
    )
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(Transport())  # type: ignore[arg-type]
    started = time.perf_counter_ns()
    for _ in range(count):
        protocol.data_received(REQUEST)
        for task in list(protocol.tasks):  # the request's ASGI task
            await task
    elapsed = (time.perf_counter_ns() - started) / count
    protocol.connection_lost(None)
    return elapsed


async def main(rounds: int, count: int) -> None:
    timings: dict[str, list[float]] = {"httptools": [], "guarded": []}
    for _ in range(rounds):
        timings["httptools"].append(await per_request_ns(HttpToolsProtocol, count))
        timings["guarded"].append(await per_request_ns(GuardedHttpToolsProtocol, count))
    for name, values in timings.items():
        print(
            f"{name:10} best {min(values) / 1000:6.2f} us  median "
            f"{statistics.median(values) / 1000:6.2f} us per request"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--count", type=int, default=5000)
    arguments = parser.parse_args()
    uvloop.run(main(arguments.rounds, arguments.count))
