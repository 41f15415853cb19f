"""Fake provider APIs for tests: each speaks its provider's real wire format.

`anthropic_server` and `gemini_server` build aiohttp apps; `running(app)` serves one on
127.0.0.1 with a free port. Every app records what it received in `app[RECORDER]`, so
tests can assert on an adapter's translation. Behaviour is steered by trigger words, see
`trigger()` and each server's docstring.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

ANSWER = "The quick brown fox jumps over the lazy dog."  # the fakes' plain text answer
_TRIGGER = re.compile(r"TRIGGER:([a-z0-9_]+)")


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any


@dataclass
class Recorder:
    requests: list[Received] = field(default_factory=list)

    @property
    def last(self) -> Received:
        return self.requests[-1]

    async def record(self, request: web.Request) -> Any:
        """Store the request and return its JSON body (None when it is not JSON)."""
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(Received(request.path, dict(request.query), headers, body))
        return body


RECORDER = web.AppKey("recorder", Recorder)


def trigger(text: str) -> str | None:
    """The word after `TRIGGER:` in a prompt, e.g. "overloaded" for "TRIGGER:overloaded"."""
    match = _TRIGGER.search(text)
    return match.group(1) if match else None


def answer_within(limit: int | None, stops: list[str]) -> tuple[str, str | None, bool]:
    """ANSWER cut like a model would: (text, the stop sequence hit, cut by the word limit).

    One word counts as one token.
    """
    for stop in stops:
        if stop and stop in ANSWER:
            return ANSWER[: ANSWER.index(stop)], stop, False
    words = ANSWER.split(" ")
    if limit is not None and limit < len(words):
        return " ".join(words[:limit]), None, True
    return ANSWER, None, False


async def stall(request: web.Request, most: float = 60) -> None:
    """Send nothing more until the client leaves (aiohttp does not cancel the handler
    when it does), for at most `most` seconds."""
    deadline = asyncio.get_running_loop().time() + most
    while request.transport is not None and not request.transport.is_closing():
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1 (free port) and yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def parse_sse(data: bytes) -> list[Any]:
    """The payloads of an OpenAI SSE stream: JSON chunks, and the string "[DONE]"."""
    events: list[Any] = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[6:]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def assert_stream_holds(events: list[Any], answer: dict[str, Any]) -> None:
    """The chat stream `events` (`parse_sse`'s, its usage chunk and `[DONE]` last) says
    what the whole chat completion `answer` says: text, tool calls, finish reason, usage."""
    assert events[-1] == "[DONE]" and events[-2]["usage"] == answer["usage"]
    deltas = [c["choices"][0]["delta"] for c in events[:-2]]
    message, reason = answer["choices"][0]["message"], answer["choices"][0]["finish_reason"]
    assert "".join(d.get("content") or "" for d in deltas) == (message["content"] or "")
    calls: dict[int, list[str]] = {}
    for call in (call for d in deltas for call in d.get("tool_calls") or []):
        named = calls.setdefault(call["index"], ["", ""])
        named[0] += call["function"].get("name") or ""
        named[1] += call["function"]["arguments"]
    expected = [
        [c["function"]["name"], c["function"]["arguments"]] for c in message.get("tool_calls") or []
    ]
    assert [calls[index] for index in sorted(calls)] == expected
    assert events[-3]["choices"][0]["finish_reason"] == reason


async def assert_relayed_once(
    recorder: Recorder,
    chat: Callable[..., Awaitable[tuple[dict[str, Any], Any]]],
    stream: Callable[..., Awaitable[tuple[list[Any], Any]]],
    body: dict[str, Any],
) -> None:
    """`body` streamed (`stream`, the usage asked for) makes one upstream request and says
    what its whole answer (`chat`) says; the stream's state holds the same usage."""
    answer, usage = await chat(body)
    sent = len(recorder.requests)
    events, state = await stream(body, include_usage=True)
    assert len(recorder.requests) == sent + 1
    assert_stream_holds(events, answer)
    assert (state.usage, state.finish_reason) == (usage, answer["choices"][0]["finish_reason"])


async def send_stream(
    request: web.Request, content_type: str, parts: list[bytes], abort: bool = False
) -> web.StreamResponse:
    """Write a streamed answer: the fourth part split across two writes (as TCP may
    deliver it), then a clean end, or a dropped connection when `abort`."""
    response = web.StreamResponse(headers={"content-type": content_type})
    await response.prepare(request)
    for number, data in enumerate(parts):
        if number == 3:
            await response.write(data[:9])
            data = data[9:]
        await response.write(data)
    if abort:
        assert request.transport is not None
        request.transport.abort()
        return response
    await response.write_eof()
    return response
