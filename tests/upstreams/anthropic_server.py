"""A fake Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`)
speaking the real wire format.

It validates requests the way the real API does, answering in Anthropic's error shape
`{"type": "error", "error": {"type": ..., "message": ...}}`:

* wrong or missing `x-api-key` (or `authorization: Bearer`, which newer official SDKs
  send) -> 401 `authentication_error`;
* missing `anthropic-version`, a non-JSON body, unknown top-level fields (e.g. OpenAI's
  `n` leaking through), missing `max_tokens`, no messages, roles that do not alternate,
  empty content or text blocks, malformed image blocks, `tool_result` blocks that do not
  answer the previous assistant turn's `tool_use` blocks (or unanswered `tool_use`
  blocks), temperature outside [0, 1] -> 400 `invalid_request_error`.

Behaviour is chosen by `TRIGGER:<word>` in the text of the last user message:

* `overloaded` -> 529 `overloaded_error`;
* `rate_limit` -> 429 `rate_limit_error` with `retry-after: 7`;
* `invalid` -> 400 `invalid_request_error`;
* `stream_error` -> (streaming) a few events, then an `error` event (`overloaded_error`);
* `stream_cut` -> (streaming) a few events, then a clean end without `message_stop`;
* `stream_abort` -> (streaming) a few events, then the connection is dropped;
* `stream_overloaded_first` / `stream_rate_limited_first` -> (streaming) an `error`
  event (`overloaded_error` / `rate_limit_error`) as the stream's first event, which
  the API sends when it fails after answering 200;
* `stream_overloaded_after_start` -> (streaming) `message_start` and a `ping`, then an
  `overloaded_error` event, before any content;
* `nousage` -> an answer without `usage` (streamed: neither `message_start` nor
  `message_delta` carries one), as an Anthropic-compatible server might send;
* `stream_cut_after_N` / `stream_stall_after_N` -> (streaming) everything up to the Nth
  content delta, then a clean end without `message_stop`, or a stall until the client
  leaves;
* `stream_cut_long` -> (streaming) 120 times `ANSWER` (5,279 bytes), then a clean end
  without `message_delta` or `message_stop`;
* `unstreamed` -> (streaming) the whole answer, as a server that cannot stream sends it.

`TRIGGER:cached` in the *system prompt* makes usage report
`cache_creation_input_tokens=256` and `cache_read_input_tokens=1024`; `TRIGGER:searched`
there, `server_tool_use` of 3 web searches and 1 web fetch (in `message_delta` too);
`TRIGGER:tool_prompt` there, 346 more input tokens when the request has tools: the
tool-use system prompt the real API adds (Claude 4 models, `tool_choice` auto or none).

Without a trigger the answer is a tool use when the request has tools, `tool_choice` is
not `none` and the last user turn holds no `tool_result`: a `tool_use` block with input
`{"location": "Paris"}` for the forced tool (else the first tool), plus one with
`{"location": "Tokyo"}` unless `disable_parallel_tool_use` (a tool whose schema has no
properties gets `{}`, streamed as one empty `input_json_delta`, as the API sends it),
preceded by a "Let me check."
text block unless a tool was forced. Otherwise it is `ANSWER`, cut by `stop_sequences`
(stop_reason `stop_sequence`) or after `max_tokens` words (stop_reason `max_tokens`).
Streams use real SSE framing: `event:` lines, a `ping`, one delta per word, tool input
in several `input_json_delta` fragments, and one event split across two writes.

With `thinking` enabled the answer starts with a thinking block (`THOUGHT`, signed
`SIGNATURE`; streamed as `thinking_delta` and `signature_delta`). Request content may hold
documents, thinking and redacted thinking blocks, and `cache_control` anywhere.
`count_tokens` answers the same `input_tokens` a message with that prompt would report
(`TRIGGER:garbled` anywhere in the messages: a 200 of plain text instead; `TRIGGER:slow`:
nothing until the client leaves).
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams import ANSWER, RECORDER, Recorder, answer_within, stall, trigger

API_KEY = "sk-ant-test-key-0123456789"
THOUGHT = "The user wants an answer."
SIGNATURE = "sig-fake-0123456789"
_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "context_management",
        "output_config",
    }
)
_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_ERRORS = {
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "rate_limit": (
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
    ),
    "invalid": (400, "invalid_request_error", "messages: the trigger asked for a 400"),
}


def create_app(api_key: str = API_KEY) -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await app[RECORDER].record(request)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if api_key not in (request.headers.get("x-api-key"), bearer):
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        problem = _validate(body)
        if problem:
            return _error(400, "invalid_request_error", problem)
        word = trigger(_last_user_text(body["messages"]))
        if word in _ERRORS:
            status, kind, message = _ERRORS[word]
            headers = {"retry-after": "7"} if status == 429 else {}
            return _error(status, kind, message, headers)
        answer = _answer(body, len(app[RECORDER].requests))
        if body.get("stream") and word != "unstreamed":
            return await _stream(request, answer, word)
        if word == "nousage":
            del answer["usage"]
        return web.json_response(answer)

    async def count_tokens(request: web.Request) -> web.Response:
        body = await app[RECORDER].record(request)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if api_key not in (request.headers.get("x-api-key"), bearer):
            return _error(401, "authentication_error", "invalid x-api-key")
        problem = _validate({**body, "max_tokens": 1}) if isinstance(body, dict) else "no JSON"
        if problem:
            return _error(400, "invalid_request_error", problem)
        text = orjson.dumps(body["messages"]).decode()
        if "TRIGGER:garbled" in text:
            return web.Response(text="not json", content_type="text/plain")
        if "TRIGGER:slow" in text:
            await stall(request)
        return web.json_response({"input_tokens": _prompt_tokens(body)})

    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    return app


def _prompt_tokens(body: dict[str, Any]) -> int:
    system = body.get("system") or ""
    return math.ceil(len(orjson.dumps([system, body["messages"], body.get("tools") or []])) / 4)


def _error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _validate(body: Any) -> str | None:
    """The real API's complaint about this body, None when it would be accepted."""
    if not isinstance(body, dict):
        return "the request body is not valid JSON"
    extra = sorted(set(body) - _FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    pending: set[str] = set()  # tool_use ids of the previous assistant turn
    for number, message in enumerate(messages):
        problem = _validate_message(number, message, messages[number - 1] if number else None)
        if problem:
            return problem
        blocks = message["content"] if isinstance(message["content"], list) else []
        answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if answered - pending:
            return (
                f"messages.{number}: unexpected `tool_use_id` found in `tool_result` "
                "blocks. Each `tool_result` block must have a corresponding `tool_use` "
                "block in the previous message."
            )
        if pending - answered:
            return (
                f"messages.{number}: `tool_use` ids were found without `tool_result` "
                "blocks immediately after"
            )
        pending = {b.get("id") for b in blocks if b.get("type") == "tool_use"}
    return None


def _validate_message(number: int, message: Any, previous: Any) -> str | None:
    where = f"messages.{number}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system"):
        return f"{where}.role: Input should be 'user', 'assistant' or 'system'"
    if message["role"] == "system":  # mid-conversation instructions (beta)
        return None if isinstance(message.get("content"), str | list) else f"{where}: content"
    if previous is not None and previous["role"] == message["role"]:
        return (
            f'{where}: roles must alternate between "user" and "assistant", but found '
            f'multiple "{message["role"]}" roles in a row'
        )
    content = message.get("content")
    if isinstance(content, str):
        return f"{where}: content must be non-empty" if not content else None
    if not isinstance(content, list) or not content:
        return f"{where}: all messages must have non-empty content"
    for index, block in enumerate(content):
        problem = _validate_block(block)
        if problem:
            return f"{where}.content.{index}: {problem}"
    return None


def _validate_block(block: Any) -> str | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return None if block.get("text") else "text content blocks must be non-empty"
    if kind == "image":
        source = block.get("source") or {}
        if source.get("type") == "url" and source.get("url"):
            return None
        if source.get("type") == "base64" and source.get("data"):
            return None if source.get("media_type") in _MEDIA_TYPES else "bad image media_type"
        return "image.source: invalid image source"
    if kind == "tool_use":
        ok = block.get("id") and block.get("name") and isinstance(block.get("input"), dict)
        return None if ok else "tool_use blocks need id, name and an object input"
    if kind == "tool_result":
        return None if block.get("tool_use_id") else "tool_use_id: Field required"
    if kind == "document":
        source = block.get("source") or {}
        ok = source.get("type") in ("base64", "text", "url", "content")
        return None if ok else "document.source: invalid document source"
    if kind == "thinking":
        ok = isinstance(block.get("thinking"), str) and block.get("signature")
        return None if ok else "thinking blocks need thinking and signature"
    if kind == "redacted_thinking":
        return None if block.get("data") else "redacted_thinking blocks need data"
    return f"Input tag '{kind}' found using 'type' does not match any of the expected tags"


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(block.get("text", "") for block in content if block.get("type") == "text")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m["role"] == "user"]
    return _text_of(users[-1]["content"]) if users else ""


def _answer(body: dict[str, Any], serial: int) -> dict[str, Any]:
    """The Messages API answer (non-streaming shape) to a valid request."""
    system = body.get("system") or ""
    system_text = system if isinstance(system, str) else _text_of(system)
    cached = trigger(system_text) == "cached"
    usage: dict[str, Any] = {
        "input_tokens": _prompt_tokens(body)
        + (346 if body.get("tools") and trigger(system_text) == "tool_prompt" else 0),
        "cache_creation_input_tokens": 256 if cached else 0,
        "cache_read_input_tokens": 1024 if cached else 0,
        "output_tokens": 0,
    }
    if trigger(system_text) == "searched":  # as a web_search server tool reports it
        usage["server_tool_use"] = {"web_search_requests": 3, "web_fetch_requests": 1}
    content, stop_reason, stop_sequence = _content(body, serial)
    if (body.get("thinking") or {}).get("type") == "enabled":
        content = [{"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE}, *content]
    usage["output_tokens"] = sum(
        len(b["text"].split()) if b["type"] == "text" else 8 for b in content
    )
    return {
        "id": f"msg_fake{serial:06d}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def _content(body: dict[str, Any], serial: int) -> tuple[list[dict[str, Any]], str, str | None]:
    choice = body.get("tool_choice") or {"type": "auto"}
    last = body["messages"][-1]["content"]
    answered = isinstance(last, list) and any(b["type"] == "tool_result" for b in last)
    if body.get("tools") and choice["type"] != "none" and not answered:
        name = choice.get("name") or body["tools"][0]["name"]
        cities = ["Paris"] if choice.get("disable_parallel_tool_use") else ["Paris", "Tokyo"]
        tool = next(t for t in body["tools"] if t["name"] == name)
        takes = bool((tool.get("input_schema") or {}).get("properties"))
        blocks: list[dict[str, Any]] = (
            [] if choice["type"] in ("any", "tool") else [{"type": "text", "text": "Let me check."}]
        )
        blocks += [
            {
                "type": "tool_use",
                "id": f"toolu_fake{serial:04d}{n}",
                "name": name,
                "input": {"location": city} if takes else {},
            }
            for n, city in enumerate(cities)
        ]
        return blocks, "tool_use", None
    text, stop, truncated = answer_within(body["max_tokens"], body.get("stop_sequences") or [])
    reason = "stop_sequence" if stop else "max_tokens" if truncated else "end_turn"
    return [{"type": "text", "text": text}], reason, stop


async def _stream(
    request: web.Request, answer: dict[str, Any], word: str | None
) -> web.StreamResponse:
    events = _events(answer, with_usage=word != "nousage")
    first = {"stream_overloaded_first": "overloaded_error", "stream_rate_limited_first": ""}
    if word in first:
        kind = first[word] or "rate_limit_error"
        error = {"type": "error", "error": {"type": kind, "message": f"{kind} mid-stream"}}
        events = [_event("error", error)]
    if word == "stream_overloaded_after_start":
        overloaded = {"type": "overloaded_error", "message": "Overloaded"}
        events = [*events[:2], _event("error", {"type": "error", "error": overloaded})]
    if word in ("stream_error", "stream_cut", "stream_abort"):
        events = events[:5]
        if word == "stream_error":
            events.append(
                _event(
                    "error",
                    {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                )
            )
    if word == "stream_cut_long":
        long = {**answer, "content": [{"type": "text", "text": " ".join([ANSWER] * 120)}]}
        events = _events(long)[:-2]  # without message_delta and message_stop
    partial = re.fullmatch(r"stream_(cut|stall)_after_(\d+)", word or "")
    if partial:
        deltas = [n for n, e in enumerate(events) if e.startswith(b"event: content_block_delta")]
        events = events[: deltas[int(partial.group(2)) - 1] + 1]
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
    )
    await response.prepare(request)
    for number, event in enumerate(events):
        if number == 3:  # one event split across two writes, as TCP may deliver it
            await response.write(event[:7])
            event = event[7:]
        await response.write(event)
    if partial and partial.group(1) == "stall":
        await stall(request)
    if word == "stream_abort":
        assert request.transport is not None
        request.transport.abort()
        return response
    await response.write_eof()
    return response


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _events(answer: dict[str, Any], with_usage: bool = True) -> list[bytes]:
    """The stream of events the real API sends for `answer` (`with_usage` False: as a
    compatible server that reports none)."""
    usage = answer["usage"]
    start = {
        **answer,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    if not with_usage:
        del start["usage"]
    events = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(answer["content"]):
        opening: dict[str, Any]
        if block["type"] == "text":
            opening = {"type": "text", "text": ""}
            words = block["text"].split(" ")
            deltas = [
                {"type": "text_delta", "text": w if not n else " " + w} for n, w in enumerate(words)
            ]
        elif block["type"] == "thinking":
            opening = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [
                {"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]},
            ]
        else:
            opening = {**block, "input": {}}
            arguments = orjson.dumps(block["input"]).decode()
            third = max(1, len(arguments) // 3)
            pieces = ["", arguments[:third], arguments[third : 2 * third], arguments[2 * third :]]
            if not block["input"]:  # a tool without arguments: one empty fragment, no "{}"
                pieces = [""]
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
        events.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
        )
        events += [
            _event(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}
            )
            for d in deltas
        ]
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": answer["stop_reason"], "stop_sequence": answer["stop_sequence"]},
        "usage": {
            "output_tokens": usage["output_tokens"],
            **({"server_tool_use": usage["server_tool_use"]} if "server_tool_use" in usage else {}),
        },
    }
    if not with_usage:
        del delta["usage"]
    events.append(_event("message_delta", delta))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events
