"""A local server speaking OpenAI's chat-completions, embeddings, Responses and legacy
completions wire formats (`responses_api.py` has the last two).

It plays a real OpenAI-compatible provider: it checks the bearer key, answers in
OpenAI's JSON and SSE shapes (with `usage: null` on every chunk and a final usage
chunk when `stream_options.include_usage` is set), and returns OpenAI error bodies.

Control words in the last user message choose the behaviour:
  TRIGGER:500 / TRIGGER:503 / TRIGGER:400  answer with that status and an OpenAI error body
  TRIGGER:429                              429 with `retry-after: 2`
  TRIGGER:cached                           report 1024 of the prompt tokens as cached
  TRIGGER:cache_write                      report 1500 of 2000 prompt tokens as written to
                                           the prompt cache (`cache_write_tokens`)
  TRIGGER:reasoning                        report 5 of the completion tokens as reasoning
`service_tier: flex | priority` is said back in every answer and chunk as the tier used
(any other value, or none, as "default").
  TRIGGER:slowstream                       stream one chunk every 100 ms for 5 s
  TRIGGER:cut                              end the stream before `[DONE]`
  TRIGGER:refuse                           the model refuses: `message.refusal` (streamed
                                           as `refusal` deltas), `content` null
  TRIGGER:slow_end                         end the stream's body 2 s after `[DONE]`
                                           (its terminating chunk in a later packet)
  TRIGGER:nousage                          an answer or stream without `usage` (as some
                                           compatible servers send)
  TRIGGER:cut_after_N / TRIGGER:stall_after_N  stream N content chunks of three words
                                           each (a provider may put several tokens in
                                           one chunk), then end the stream without
                                           `[DONE]`, or stall until the client leaves
With `tools`, a non-streamed answer calls the first tool (`{"city": "Seoul"}`) unless the
last message is a tool's answer. Every request body and its headers are recorded in
`state.requests`.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams import ANSWER, stall

API_KEY = "sk-upstream-test-key-0123456789"
WORDS = ["Hello", " from", " the", " fake", " OpenAI", " upstream", "."]
ANSWER_WORDS = [" " + word for word in ANSWER.split(" ")]

REFUSAL = "I cannot help with that request."


@dataclass
class State:
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    streams_cancelled: int = 0
    streams_finished: int = 0


def _error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def served_tier(body: dict[str, Any]) -> str:
    """The processing tier OpenAI says it used, in every answer and chunk: the one asked
    for when it is flex or priority, else the standard one (auto as on a plain project)."""
    asked = body.get("service_tier")
    return asked if asked in ("flex", "priority") else "default"


def _trigger(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, str) else orjson.dumps(content).decode()
            if "TRIGGER:" in text:
                return text.split("TRIGGER:", 1)[1].split()[0]
            return ""
    return ""


def _usage(body: dict[str, Any], completion_tokens: int, trigger: str) -> dict[str, Any]:
    cached, writes = trigger == "cached", trigger == "cache_write"
    prompt = 2000 if cached or writes else 11
    details = {"cached_tokens": 1024 if cached else 0, "audio_tokens": 0}
    if writes:  # as GPT-5.6 reports them
        details["cache_write_tokens"] = 1500
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {
            "reasoning_tokens": min(5, completion_tokens) if trigger == "reasoning" else 0
        },
    }


def create_app() -> tuple[web.Application, State]:
    state = State()

    async def chat(request: web.Request) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "")[7:]
        if presented != API_KEY:
            return _error(
                401,
                f"Incorrect API key provided: {presented}.",
                "invalid_request_error",
                "invalid_api_key",
            )
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        trigger = _trigger(body)
        if trigger in ("500", "503", "400"):
            kind = "invalid_request_error" if trigger == "400" else "server_error"
            return _error(int(trigger), f"upstream says {trigger}", kind)
        if trigger == "429":
            response = _error(
                429, "Rate limit reached for requests", "requests", "rate_limit_exceeded"
            )
            response.headers["retry-after"] = "2"
            return response
        base = {
            "id": "chatcmpl-fake",
            "created": int(time.time()),
            "model": body["model"],
            "service_tier": served_tier(body),
            "system_fingerprint": "fp_fake",
        }
        tools = body.get("tools")
        answered = (body.get("messages") or [{}])[-1].get("role") == "tool"
        if not body.get("stream"):
            if tools and not answered:
                name = tools[0]["function"]["name"]
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_fake1",
                            "type": "function",
                            "function": {"name": name, "arguments": '{"city": "Seoul"}'},
                        }
                    ],
                }
                finish = "tool_calls"
            elif trigger == "refuse":
                message = {"role": "assistant", "content": None, "refusal": REFUSAL}
                finish = "stop"
            else:
                message = {"role": "assistant", "content": "".join(WORDS)}
                finish = "stop"
            n = body.get("n") or 1
            answer = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
                    for i in range(n)
                ],
                "usage": _usage(body, 7 * n, trigger),
            }
            if trigger == "nousage":
                del answer["usage"]
            return web.json_response(answer)
        return await _stream(request, body, base, trigger, state)

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        state.requests.append(body)
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                    for i, _ in enumerate(items)
                ],
                "usage": {"prompt_tokens": 3 * len(items), "total_tokens": 3 * len(items)},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    from tests.upstreams import responses_api

    responses_api.add_routes(app, state, API_KEY)
    return app, state


async def _stream(
    request: web.Request, body: dict[str, Any], base: dict[str, Any], trigger: str, state: State
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    usage_field = {"usage": None} if include_usage else {}

    async def event(delta: dict[str, Any], finish: str | None = None) -> None:
        chunk = {
            **base,
            "object": "chat.completion.chunk",
            **usage_field,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

    try:
        await event({"role": "assistant", "content": ""})
        partial = re.fullmatch(r"(cut|stall)_after_(\d+)", trigger)
        if partial:
            words = ANSWER_WORDS * 10
            for number in range(int(partial.group(2))):
                await event({"content": "".join(words[3 * number : 3 * number + 3])})
            if partial.group(1) == "stall":
                await stall(request)
            return response
        if trigger == "slowstream":
            for _ in range(50):
                await asyncio.sleep(0.1)
                await event({"content": "."})
        for word in WORDS if trigger != "refuse" else ():
            await event({"content": word})
        if trigger == "refuse":
            await event({"content": None, "refusal": REFUSAL[:7]})
            await event({"refusal": REFUSAL[7:]})
        if trigger == "cut":
            return response
        await event({}, "stop")
        if include_usage and trigger != "nousage":
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": _usage(body, len(WORDS), trigger),
            }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        if trigger == "slow_end":
            await asyncio.sleep(2)
        state.streams_finished += 1
    except (ConnectionResetError, asyncio.CancelledError):
        state.streams_cancelled += 1
        raise
    return response
