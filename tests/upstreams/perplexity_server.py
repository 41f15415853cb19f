"""A fake Perplexity Agent API (`POST /v1/responses`), speaking its wire format.

Perplexity retired its Sonar chat completions on 2026-09-27; `/chat/completions` here
answers as the retired endpoint would, with a 410. The Agent API takes the fields of its
request schema only (anything else, `messages` or `temperature` say, is a 400, as the
real one refuses unknown fields), wants `model` or `preset`, and answers in OpenAI's
Responses shape plus its own: a `search_results` output item before the message, and a
`usage.cost` breakdown (USD) of tokens, request fee and tool calls.

Streams send `response.created`, `response.in_progress`, the reasoning and search
progress events, `response.output_item.added` for the search results and the message,
one `response.output_text.delta` per word, the item `done` events and
`response.completed` (the whole response, usage and cost included). A function tool
makes the answer one `function_call` item, announced whole (no argument deltas).

`TRIGGER:failed` in the last user text ends a stream with `response.failed`.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams import ANSWER, RECORDER, Recorder, trigger
from tests.upstreams.responses_api import event_stream

API_KEY = "pplx-test-key"
REQUEST_FEE = 0.005  # USD per request: the low search-context fee of sonar
TOKEN_PRICE = 1.0  # USD per million input or output tokens
RESULTS = [
    {"title": "Fox facts", "url": "https://example.org/fox", "date": "2026-11-02"},
    {"title": "Dogs, lazy", "url": "https://example.org/dog", "date": None},
]
_FIELDS = frozenset(
    {
        "input",
        "instructions",
        "language_preference",
        "max_output_tokens",
        "max_steps",
        "model",
        "models",
        "preset",
        "reasoning",
        "response_format",
        "stream",
        "tools",
    }
)
_ids = itertools.count(1)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


def create_app() -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()

    async def responses(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return _error(401, "Invalid API key", "authentication_error")
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object")
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            return _error(400, f"Unknown field(s): {', '.join(unknown)}")
        if not body.get("model") and not body.get("preset"):
            return _error(400, "One of model, models or preset is required")
        answer = _answer(body)
        if body.get("stream"):
            return await _stream(request, answer, trigger(_last_user_text(body)) == "failed")
        return web.json_response(answer)

    async def retired(request: web.Request) -> web.Response:
        await app[RECORDER].record(request)
        return _error(410, "Sonar is now the Agent API: use POST /v1/responses", "gone")

    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/chat/completions", retired)
    return app


def _last_user_text(body: dict[str, Any]) -> str:
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            return content if isinstance(content, str) else orjson.dumps(content).decode()
    return ""


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    serial = next(_ids)
    prompt = max(1, len(orjson.dumps(body.get("input"))) // 4)
    tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
    output: list[dict[str, Any]] = [
        {"type": "search_results", "id": f"sr_{serial}", "results": RESULTS, "queries": ["fox"]}
    ]
    if tools:
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{serial}",
                "call_id": f"call_pplx{serial}",
                "name": tools[0]["name"],
                "arguments": '{"city": "Seoul"}',
                "status": "completed",
            }
        )
        completion = 8
    else:
        words = ANSWER.split(" ")[: body.get("max_output_tokens") or None]
        text = " ".join(words)
        part = {"type": "output_text", "text": text, "annotations": []}
        output.append(
            {
                "type": "message",
                "id": f"msg_{serial}",
                "role": "assistant",
                "status": "completed",
                "content": [part],
            }
        )
        completion = len(words)
    cost = {
        "currency": "USD",
        "input_cost": prompt * TOKEN_PRICE / 1e6,
        "output_cost": completion * TOKEN_PRICE / 1e6,
        "tool_calls_cost": REQUEST_FEE,
    }
    cost["total_cost"] = round(cost["input_cost"] + cost["output_cost"] + REQUEST_FEE, 9)
    return {
        "id": f"resp_pplx{serial:04d}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": body.get("model") or "perplexity/sonar",
        "output": output,
        "usage": {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cache_read_input_tokens": 0},
            "cost": cost,
        },
    }


async def _stream(request: web.Request, answer: dict[str, Any], fail: bool) -> web.StreamResponse:
    stream, emit = await event_stream(request)
    started = {**answer, "status": "in_progress", "output": [], "usage": None}
    await emit("response.created", response=started)
    await emit("response.in_progress", response=started)
    await emit("response.reasoning.started", thought="Searching the web")
    await emit("response.reasoning.search_queries", queries=["fox"])
    await emit("response.reasoning.search_results", results=RESULTS)
    await emit("response.reasoning.stopped")
    for index, item in enumerate(answer["output"]):
        if item["type"] == "message":
            empty = {**item, "status": "in_progress", "content": []}
            await emit("response.output_item.added", output_index=index, item=empty)
            text = item["content"][0]["text"]
            for n, word in enumerate(text.split(" ")):
                await emit(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    delta=word if not n else " " + word,
                )
                if fail and n == 2:
                    error = {"code": "server_error", "message": "search backend unavailable"}
                    await emit("response.failed", response={**started, "error": error})
                    return stream
            await emit(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
            )
        else:
            await emit("response.output_item.added", output_index=index, item=item)
        await emit("response.output_item.done", output_index=index, item=item)
    await emit("response.completed", response=answer)
    return stream
