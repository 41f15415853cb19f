"""OpenAI's Responses API (`POST /v1/responses`) and legacy completions
(`POST /v1/completions`) for the fake OpenAI server, in their real wire formats.

Requests are recorded in the server's `State` (body and headers). The Responses
endpoint answers a function call when the request has function tools and its last input
item is not a `function_call_output`, else the text `TEXT`; it refuses
`previous_response_id` with a 400 (this fake stores nothing: the gateway must send the
conversation itself). Streams send the real semantic events, `event:` lines included.
`TRIGGER:500` / `TRIGGER:503` / `TRIGGER:429` / `TRIGGER:400` in the last user text
answer with that status; `TRIGGER:cached` reports 1024 cached input tokens,
`TRIGGER:cache_write` 1500 of 2000 written to the prompt cache; `TRIGGER:reasoning` 5 of
the 7 output tokens spent reasoning; `TRIGGER:searched` lists two `web_search_call` items;
`TRIGGER:cut` ends a stream after its text, without its terminal event (`[DONE]` for
legacy completions); `TRIGGER:nousage` answers without usage, as some compatible servers
do (a Responses answer's `usage` is null; legacy completions send no usage, streamed or
not, even when `stream_options.include_usage` asks for it); `TRIGGER:unstreamed` answers a
streamed Responses request with the whole answer, as a server that cannot stream does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.openai_server import served_tier

TEXT = "Hello from the fake Responses API."
COMPLETION = "Hello from the fake completions API."
_ids = itertools.count(1)


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    headers = {"retry-after": "2"} if status == 429 else None
    return web.json_response(body, status=status, headers=headers)


def _last_text(items: Any) -> str:
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if item.get("role") == "user":
            content = item.get("content")
            return content if isinstance(content, str) else orjson.dumps(content).decode()
    return ""


def _trigger(text: str) -> str:
    return text.split("TRIGGER:", 1)[1].split()[0].strip('"}]') if "TRIGGER:" in text else ""


def add_routes(app: web.Application, state: Any, api_key: str) -> None:
    async def authorized(request: web.Request) -> dict[str, Any] | web.Response:
        if request.headers.get("Authorization", "")[7:] != api_key:
            return _error(401, "Incorrect API key provided")
        body: dict[str, Any] = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        return body

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await authorized(request)
        if isinstance(body, web.Response):
            return body
        if body.get("previous_response_id"):
            return _error(400, "Previous response not found (this fake stores nothing).")
        word = _trigger(_last_text(body.get("input")))
        if word in ("500", "503", "429", "400"):
            return _error(int(word), f"upstream says {word}")
        response = _response(body, word)
        if word == "nousage":
            response["usage"] = None
        if body.get("stream") and word != "unstreamed":
            return await _stream_response(request, response, cut=word == "cut")
        return web.json_response(response)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await authorized(request)
        if isinstance(body, web.Response):
            return body
        word = _trigger(str(body.get("prompt")))
        if word in ("500", "503", "429", "400"):
            return _error(int(word), f"upstream says {word}")
        head = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
        }
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        if not body.get("stream"):
            choice = {"text": COMPLETION, "index": 0, "logprobs": None, "finish_reason": "stop"}
            answer = {**head, "choices": [choice]}
            return web.json_response(answer if word == "nousage" else {**answer, "usage": usage})
        stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await stream.prepare(request)
        for n, piece in enumerate(COMPLETION.split(" ")):
            text = piece if not n else " " + piece
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": None}
            await stream.write(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
        if word == "cut":
            return stream
        final = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        await stream.write(b"data: " + orjson.dumps({**head, "choices": [final]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage") and word != "nousage":
            chunk = {**head, "choices": [], "usage": usage}
            await stream.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await stream.write(b"data: [DONE]\n\n")
        return stream

    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/completions", completions)


def _response(body: dict[str, Any], word: str | None) -> dict[str, Any]:
    serial = next(_ids)
    items = body.get("input")
    last = items[-1] if isinstance(items, list) and items else {}
    tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
    if tools and last.get("type") != "function_call_output":
        output: dict[str, Any] = {
            "id": f"fc_fake{serial:04d}",
            "type": "function_call",
            "status": "completed",
            "call_id": f"call_fake{serial:04d}",
            "name": tools[0]["name"],
            "arguments": '{"city": "Seoul"}',
        }
    else:
        part = {"type": "output_text", "text": TEXT, "annotations": [], "logprobs": []}
        output = {
            "id": f"msg_fake{serial:04d}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
    searches = [  # (OpenAI lists them before the message; after it here, for the stream)
        {"id": f"ws_fake{serial:04d}{n}", "type": "web_search_call", "status": "completed"}
        for n in range(2 if word == "searched" else 0)
    ]
    cached, writes = word == "cached", word == "cache_write"
    prompt = 2000 if cached or writes else 11
    return {
        "id": f"resp_fake{serial:04d}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": [output, *searches],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "service_tier": served_tier(body),
        "store": body.get("store", True),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {
                "cached_tokens": 1024 if cached else 0,
                "cache_write_tokens": 1500 if writes else 0,
            },
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 5 if word == "reasoning" else 0},
            "total_tokens": prompt + 7,
        },
    }


Emit = Callable[..., Awaitable[None]]


async def event_stream(request: web.Request) -> tuple[web.StreamResponse, Emit]:
    """An SSE answer and its `emit(kind, **data)`: one Responses event, `event:` line,
    `type` and `sequence_number` included, as OpenAI (and Perplexity) write them."""
    stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await stream.prepare(request)
    sequence = itertools.count()

    async def emit(kind: str, **data: Any) -> None:
        payload = {"type": kind, "sequence_number": next(sequence), **data}
        await stream.write(
            b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
        )

    return stream, emit


async def _stream_response(
    request: web.Request, response: dict[str, Any], cut: bool = False
) -> web.StreamResponse:
    """`cut`: the stream ends after the text, without its terminal event."""
    stream, emit = await event_stream(request)
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    await emit("response.created", response=started)
    await emit("response.in_progress", response=started)
    item = response["output"][0]
    if item["type"] == "message":
        await emit("response.output_item.added", output_index=0, item={**item, "content": []})
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        await emit("response.content_part.added", **ids, part=empty)
        for n, word in enumerate(TEXT.split(" ")):
            await emit("response.output_text.delta", **ids, delta=word if not n else " " + word)
        if cut:
            return stream
        await emit("response.output_text.done", **ids, text=TEXT)
        await emit("response.content_part.done", **ids, part=item["content"][0])
    else:
        await emit("response.output_item.added", output_index=0, item={**item, "arguments": ""})
        ids = {"item_id": item["id"], "output_index": 0}
        half = len(item["arguments"]) // 2
        for piece in (item["arguments"][:half], item["arguments"][half:]):
            await emit("response.function_call_arguments.delta", **ids, delta=piece)
        await emit("response.function_call_arguments.done", **ids, arguments=item["arguments"])
    await emit("response.output_item.done", output_index=0, item=item)
    await emit("response.completed", response=response)
    return stream
