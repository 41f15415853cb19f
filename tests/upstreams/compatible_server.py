"""Fake OpenAI-compatible services, each with the quirks of the real one.

`POST /{flavor}/v1/chat/completions` and `/{flavor}/v1/embeddings`, bearer key `API_KEY`.
The answers follow the other fakes (`tests.upstreams`): `ANSWER` cut by `max_tokens` /
`max_completion_tokens` (one token per word) or `stop`; with tools (and the last message
not a tool result, `tool_choice` not `none`) two calls of the forced (else first) tool
with `{"location": "Paris"}` and `{"location": "Tokyo"}`; triggers `overloaded` (503),
`rate_limit` (429, `retry-after: 7`), `invalid` (400), `stream_error`, `stream_cut`,
`stream_abort`; `TRIGGER:cached` in a system message reports 1024 cached prompt tokens.

Flavors, as the services write their answers:

* `openai`: OpenAI's own shapes (also Azure's, see `azure_server`);
* `deepseek`: cache hits in `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens`, no
  `prompt_tokens_details`; `reasoning_content` in the message and in stream deltas for
  `*reasoner*` models (its 40 tokens inside `completion_tokens`);
* `xai`: 40 reasoning tokens reported apart, *outside* `completion_tokens` (total =
  prompt + completion + reasoning);
* `groq`: stream usage only in `x_groq.usage` on the last chunk, `stream_options` ignored;
* `mistral`: 422 for `max_completion_tokens` or `stream_options` (unknown fields), usage
  on the last chunk of every stream;
* `perplexity`: streams end after the finish chunk without `data: [DONE]`.

`azure=True` adds Azure's content filter annotations (`prompt_filter_results`, a first
stream chunk with no choices, `content_filter_results`) and two triggers:
`content_filter_prompt` (400, code `content_filter`, inner `ResponsibleAIPolicyViolation`)
and `content_filter_output` (the answer cut with finish reason `content_filter`).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams import RECORDER, Recorder, answer_within, send_stream, trigger

API_KEY = "sk-compatible-test-key-0123456789"
FLAVORS = ("openai", "deepseek", "xai", "groq", "mistral", "perplexity")
REASONING = 40
_FILTER = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}
_ERRORS = {
    "overloaded": (503, "server_error", "The server is overloaded or not ready yet."),
    "rate_limit": (429, "requests", "Rate limit reached for requests"),
    "invalid": (400, "invalid_request_error", "The trigger asked for a 400."),
}


def create_app() -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return error(401, "Incorrect API key provided.", "invalid_request_error")
        return await answer(
            request, body, request.match_info["flavor"], len(app[RECORDER].requests)
        )

    async def embed(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return error(401, "Incorrect API key provided.", "invalid_request_error")
        return embeddings(body)

    app.router.add_post("/{flavor}/v1/chat/completions", chat)
    app.router.add_post("/{flavor}/v1/embeddings", embed)
    return app


def error(
    http_status: int, message: str, kind: str | None, code: str | None = None, **extra: Any
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}
    headers = {"retry-after": "7"} if http_status == 429 else None
    return web.json_response(body, status=http_status, headers=headers)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


async def answer(
    request: web.Request, body: Any, flavor: str, serial: int, azure: bool = False
) -> web.StreamResponse:
    """The chat completion (JSON or SSE) of one flavor for a valid request."""
    if not isinstance(body, dict) or not body.get("messages") or not body.get("model"):
        return error(400, "messages and model are required", "invalid_request_error")
    if flavor == "mistral":
        for name in ("max_completion_tokens", "stream_options"):
            if name in body:
                return error(
                    422, f"{name}: Extra inputs are not permitted", "invalid_request_error"
                )
    users = [m for m in body["messages"] if m.get("role") == "user"]
    word = trigger(_text(users[-1].get("content")) if users else "")
    if word in _ERRORS:
        status, kind, message = _ERRORS[word]
        return error(status, message, kind)
    if azure and word == "content_filter_prompt":
        inner = {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                **_FILTER,
                "violence": {"filtered": True, "severity": "high"},
            },
        }
        return error(
            400,
            "The response was filtered due to the prompt triggering Azure OpenAI's content "
            "management policy.",
            None,
            "content_filter",
            param="prompt",
            status=400,
            innererror=inner,
        )
    system = " ".join(
        _text(m.get("content")) for m in body["messages"] if m.get("role") == "system"
    )
    cached = 1024 if trigger(system) == "cached" else 0
    message, finish = _message(body, word, azure)
    output = len((message.get("content") or "").split()) + 8 * len(message.get("tool_calls") or [])
    thinks = flavor == "xai" or (flavor == "deepseek" and "reasoner" in body["model"])
    reasoning = REASONING if thinks else 0
    prompt = math.ceil(len(orjson.dumps([body["messages"], body.get("tools")])) / 4) + cached
    usage = _usage(flavor, prompt, cached, output, reasoning)
    if flavor == "deepseek" and reasoning:
        message["reasoning_content"] = "First, think. Then answer."
    base = {"id": f"chatcmpl-fake{serial:06d}", "created": int(time.time()), "model": body["model"]}
    if not body.get("stream"):
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": finish,
            "logprobs": None,
        }
        extra: dict[str, Any] = {}
        if azure:
            choice["content_filter_results"] = _FILTER
            extra["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": _FILTER}
            ]
        return web.json_response(
            {**base, "object": "chat.completion", "choices": [choice], "usage": usage, **extra}
        )
    return await _stream(request, body, base, flavor, azure, message, finish, usage, word)


def _message(body: dict[str, Any], word: str | None, azure: bool) -> tuple[dict[str, Any], str]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools and choice != "none" and body["messages"][-1].get("role") != "tool":
        forced = (
            (choice or {}).get("function", {}).get("name") if isinstance(choice, dict) else None
        )
        name = forced or tools[0]["function"]["name"]
        calls = [
            {
                "id": f"call_fake{n}{city}",
                "type": "function",
                "function": {"name": name, "arguments": orjson.dumps({"location": city}).decode()},
            }
            for n, city in enumerate(("Paris", "Tokyo"))
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    stop = body.get("stop")
    text, _, truncated = answer_within(limit, [stop] if isinstance(stop, str) else stop or [])
    if azure and word == "content_filter_output":
        return {"role": "assistant", "content": "The quick"}, "content_filter"
    return {"role": "assistant", "content": text}, "length" if truncated else "stop"


def _usage(flavor: str, prompt: int, cached: int, output: int, reasoning: int) -> dict[str, Any]:
    if flavor == "deepseek":
        return {
            "prompt_tokens": prompt,
            "completion_tokens": output + reasoning,
            "total_tokens": prompt + output + reasoning,
            "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": prompt - cached,
        }
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if flavor == "xai":  # reasoning billed as output but reported apart
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        usage["total_tokens"] += reasoning
    return usage


async def _stream(
    request: web.Request,
    body: dict[str, Any],
    base: dict[str, Any],
    flavor: str,
    azure: bool,
    message: dict[str, Any],
    finish: str,
    usage: dict[str, Any],
    word: str | None,
) -> web.StreamResponse:
    chunk_base = {**base, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> bytes:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "finish_reason": reason,
            "logprobs": None,
        }
        if azure:
            choice["content_filter_results"] = {} if reason is None else _FILTER
        return b"data: " + orjson.dumps({**chunk_base, "choices": [choice], **extra}) + b"\n\n"

    events: list[bytes] = []
    if azure:
        first = {
            **chunk_base,
            "model": "",
            "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER}],
        }
        events.append(b"data: " + orjson.dumps(first) + b"\n\n")
    events.append(chunk({"role": "assistant", "content": ""}))
    if message.get("reasoning_content"):
        events.append(chunk({"reasoning_content": message["reasoning_content"]}))
    for n, text in enumerate(
        (message.get("content") or "").split(" ") if message.get("content") else []
    ):
        events.append(chunk({"content": text if not n else " " + text}))
    for index, call in enumerate(message.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        events.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        half = len(arguments) // 2
        for piece in (arguments[:half], arguments[half:]):
            events.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    include = bool((body.get("stream_options") or {}).get("include_usage"))
    if flavor == "groq":
        events.append(chunk({}, finish, x_groq={"id": "req_fake", "usage": usage}))
    elif flavor in ("mistral", "perplexity"):
        events.append(chunk({}, finish, usage=usage))
    else:
        events.append(chunk({}, finish))
        if include:
            events.append(
                b"data: " + orjson.dumps({**chunk_base, "choices": [], "usage": usage}) + b"\n\n"
            )
    if flavor != "perplexity":
        events.append(b"data: [DONE]\n\n")
    if word in ("stream_error", "stream_cut", "stream_abort"):
        events = events[:4]
        if word == "stream_error":
            failure = {"error": {"message": "The server is overloaded.", "type": "server_error"}}
            events.append(b"data: " + orjson.dumps(failure) + b"\n\n")
    return await send_stream(request, "text/event-stream", events, word == "stream_abort")


def embeddings(body: Any) -> web.Response:
    texts = body.get("input") if isinstance(body, dict) else None
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        return error(400, "input is required", "invalid_request_error")
    data = []
    for index, text in enumerate(texts):
        digest = hashlib.sha256(str(text).encode()).digest()
        vector = [round((digest[i] - 127.5) / 127.5, 6) for i in range(8)]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(str(t).split()) for t in texts)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
