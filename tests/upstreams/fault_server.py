"""A fault-injecting upstream speaking OpenAI's chat-completions wire format (JSON and SSE).

A test holds the server's `FaultPlan` and sets, at runtime, what the next requests get:

    server = FaultServer(bg, "p")
    server.plan.then(Fault.error(503), Fault.error(503))  # the next two fail, then healthy
    server.plan.fail_until_cleared(Fault.error(503))      # down until `plan.clear()`
    server.stop_listening() / server.start_listening()    # connections refused, then back

Faults: `error` (any status, OpenAI error body), `rate_limited` (429 + Retry-After),
`drop` (close the connection without answering), `reset` (headers and part of the body,
then abort the connection), `hang` (nothing, not even headers, for a while), `stall`
(a few SSE chunks, or part of a JSON body, then silence), `malformed` (200 with broken
JSON), `answered` (200 with a given body), `cut` (some SSE chunks, then a clean end
without `[DONE]`), `garbage` (a stream with an event that is not JSON), `pings` (a
stream kept open by keep-alive comments alone), `failed_midway` (a stream whose event
reports an error after its 200), `unstreamed` (a whole answer to a streamed request),
`bare` (a stream whose events lack `data: `).
Anything else gets a healthy answer with usage. The plan records every request's
arrival time and body.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tests.harness import BackgroundLoop, free_port

USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 4,
    "total_tokens": 15,
    "prompt_tokens_details": {"cached_tokens": 0},
}


@dataclass(frozen=True, slots=True)
class Fault:
    """What one request gets. Build with the class methods."""

    kind: str = "healthy"
    status: int = 200
    retry_after: str | None = None
    seconds: float = 0.0  # hang / stall / pings duration
    after: int = 0  # stall / cut / reset (streams): SSE events sent first
    body: bytes = b""  # what `answered` sends
    done: bool = True  # failed_midway: `[DONE]` follows the error event
    param: str | None = None  # error: the field its body blames

    @classmethod
    def healthy(cls) -> Fault:
        return cls()

    @classmethod
    def error(cls, status: int, retry_after: str | None = None, param: str | None = None) -> Fault:
        return cls("error", status, retry_after, param=param)

    @classmethod
    def page(cls, status: int, body: bytes) -> Fault:
        """An error status with an HTML page, as a proxy, load balancer or CDN in front
        of the upstream answers."""
        return cls("page", status, body=body)

    @classmethod
    def rate_limited(cls, retry_after: str) -> Fault:
        return cls("error", 429, retry_after)

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")

    @classmethod
    def reset(cls, after: int = 2) -> Fault:
        return cls("reset", after=after)

    @classmethod
    def hang(cls, seconds: float = 3.0) -> Fault:
        return cls("hang", seconds=seconds)

    @classmethod
    def stall(cls, seconds: float = 3.0, after: int = 2) -> Fault:
        return cls("stall", seconds=seconds, after=after)

    @classmethod
    def pings(cls, seconds: float = 30.0, after: int = 2) -> Fault:
        """A stream that stops generating after `after` events but keeps its connection
        busy with SSE keep-alive comments, 10 a second, for `seconds`; then the rest."""
        return cls("pings", seconds=seconds, after=after)

    @classmethod
    def failed_midway(cls, after: int = 2, done: bool = True) -> Fault:
        """A stream whose event number `after` reports an error, as OpenRouter sends one
        once the answer began: a chunk with an `error` beside `finish_reason: "error"`;
        then `[DONE]` if `done`, and the end."""
        return cls("failed_midway", after=after, done=done)

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def answered(cls, body: bytes) -> Fault:
        """A 200 with this JSON body, whatever was asked (an answer that is none)."""
        return cls("answered", body=body)

    @classmethod
    def cut(cls, after: int = 3) -> Fault:
        return cls("cut", after=after)

    @classmethod
    def unstreamed(cls) -> Fault:
        """A whole JSON answer to a streamed request (a server that cannot stream)."""
        return cls("unstreamed")

    @classmethod
    def bare(cls) -> Fault:
        """A stream whose events are sent without `data: `: each a JSON object alone."""
        return cls("bare")

    @classmethod
    def garbage(cls, after: int = 0) -> Fault:
        """A stream whose event number `after` is not JSON; the others as usual."""
        return cls("garbage", after=after)


HEALTHY = Fault()
_DROPPED = web.RequestKey("dropped", bool)  # a `drop` fault's own hang-up


class FaultPlan:
    """The faults the next requests get (a queue, then `default`), and what arrived.

    Mutated from the test thread, read on the server's loop: every operation is a single
    deque or attribute operation, atomic under the GIL.
    """

    def __init__(self) -> None:
        self.default = HEALTHY
        self._queue: deque[Fault] = deque()
        self.arrivals: list[float] = []  # time.monotonic() of each request
        self.bodies: list[dict[str, Any]] = []
        self.served: Counter[str] = Counter()  # fault kind -> requests that got it
        self.hung_up = 0  # requests the gateway hung up on before their answer was sent

    @property
    def requests(self) -> int:
        return len(self.arrivals)

    def then(self, *faults: Fault) -> FaultPlan:
        """The next requests get these faults, in order; later ones get `default`."""
        self._queue.extend(faults)
        return self

    def fail_next(self, count: int, fault: Fault) -> FaultPlan:
        return self.then(*[fault] * count)

    def fail_until_cleared(self, fault: Fault) -> None:
        self.default = fault

    def clear(self) -> None:
        """Healthy from now on."""
        self._queue.clear()
        self.default = HEALTHY

    def next_fault(self) -> Fault:
        try:
            return self._queue.popleft()
        except IndexError:
            return self.default


class FaultServer:
    """The fault upstream on a loopback port; it can stop and resume accepting connections."""

    def __init__(self, bg: BackgroundLoop, name: str = "fault") -> None:
        self.bg = bg
        self.name = name
        self.plan = FaultPlan()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Handlers are cancelled when the gateway hangs up, so a hang or stall ends with it.
        self._runner = web.AppRunner(
            create_app(self.plan, name), handler_cancellation=True, shutdown_timeout=1.0
        )
        self._site: web.TCPSite | None = None
        bg.run(self._runner.setup())
        self.start_listening()

    def start_listening(self) -> None:
        async def start() -> None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await self._site.start()

        self.bg.run(start())

    def stop_listening(self) -> None:
        """Refuse new connections and close the open (keep-alive) ones."""

        async def stop() -> None:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            server = self._runner.server
            for handler in server.connections if server is not None else []:
                if handler.transport is not None:
                    handler.transport.close()

        self.bg.run(stop())

    def close(self) -> None:
        self.bg.run(self._runner.cleanup())


def _error(
    status: int, message: str, retry_after: str | None = None, param: str | None = None
) -> web.Response:
    kind = {429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "")
    kind = kind or "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    headers = {"retry-after": retry_after} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


def _completion(name: str, model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-fault",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"Hello from {name}."},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": USAGE,
        }
    )


def _events(name: str, model: str, include_usage: bool) -> list[bytes]:
    """A whole healthy stream, one SSE event per item, `[DONE]` last."""
    base = {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": word}) for word in ("Hello", " from", f" {name}", ".")]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": USAGE}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def create_app(plan: FaultPlan, name: str) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            return await answer(request)
        except asyncio.CancelledError:
            if not request.get(_DROPPED):
                plan.hung_up += 1  # aiohttp cancels a handler when its client hangs up
            raise

    async def answer(request: web.Request) -> web.StreamResponse:
        plan.arrivals.append(time.monotonic())
        body = await request.json()
        plan.bodies.append(body)
        fault = plan.next_fault()
        plan.served[fault.kind] += 1
        model = str(body.get("model"))
        if fault.kind == "hang":
            await asyncio.sleep(fault.seconds)
        if fault.kind == "error":
            return _error(
                fault.status,
                f"fault server {name} says {fault.status}",
                fault.retry_after,
                fault.param,
            )
        if fault.kind == "page":
            return web.Response(body=fault.body, status=fault.status, content_type="text/html")
        if fault.kind == "drop":
            assert request.transport is not None
            request.transport.close()
            request[_DROPPED] = True
            raise asyncio.CancelledError  # nothing more to send on a closed connection
        if fault.kind == "answered":
            return web.Response(body=fault.body, status=200, content_type="application/json")
        if fault.kind == "malformed":
            return web.Response(
                body=b'{"id": "chatcmpl-broken", "choices": [',
                status=200,
                content_type="application/json",
            )
        if body.get("stream") and fault.kind != "unstreamed":
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await _stream(request, fault, _events(name, model, include_usage))
        return await _answer(request, fault, _completion(name, model))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _answer(request: web.Request, fault: Fault, payload: bytes) -> web.StreamResponse:
    if fault.kind not in ("reset", "stall"):
        return web.Response(body=payload, content_type="application/json")
    # Headers (with the full Content-Length) and half the body, then the fault.
    response = web.StreamResponse(headers={"content-type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    await asyncio.sleep(0.05)  # let the bytes leave before the connection goes
    if fault.kind == "stall":
        await asyncio.sleep(fault.seconds)
    else:
        assert request.transport is not None
        request.transport.abort()
    return response


async def _stream(request: web.Request, fault: Fault, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    if fault.kind in ("stall", "cut", "reset"):
        # The first events in one write, so they reach the gateway as one network read.
        await response.write(b"".join(events[: fault.after]))
        if fault.kind == "stall":
            await asyncio.sleep(fault.seconds)
        elif fault.kind == "reset":
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
        return response  # cut: the chunked body ends cleanly, without [DONE]
    if fault.kind == "pings":
        await response.write(b"".join(events[: fault.after]))
        until = time.monotonic() + fault.seconds
        while time.monotonic() < until:
            await asyncio.sleep(0.1)
            try:
                await response.write(b": keep-alive\n\n")
            except ConnectionError:  # the gateway gave up on this stream
                return response
        events = events[fault.after :]
    if fault.kind == "failed_midway":
        failed = {
            "id": "gen-fault",
            "object": "chat.completion.chunk",
            "error": {"code": 502, "message": "Provider disconnected unexpectedly"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
        events = [*events[: fault.after], b"data: " + orjson.dumps(failed) + b"\n\n"]
        if fault.done:
            events.append(b"data: [DONE]\n\n")
    if fault.kind == "garbage":
        events = [*events[: fault.after], b"data: {not json\n\n", *events[fault.after :]]
    if fault.kind == "bare":
        events = [event.removeprefix(b"data: ") for event in events]
    for event in events:
        await response.write(event)
    return response
