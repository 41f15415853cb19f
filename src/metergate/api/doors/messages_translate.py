"""Anthropic Messages request -> OpenAI chat body, and chat answers and streams -> Messages.

Used when a `/v1/messages` request is served by an upstream that does not speak the
Messages API (OpenAI-compatible, Gemini, simulated); Anthropic upstreams get the request
as it came. Choices worth knowing:

* `system` (a string or text blocks) becomes the first, system message, and system
  messages inside `messages` system messages where they stand; `tool_result`
  blocks become `tool` messages placed before the rest of their user turn, as chat wants.
* Images become `image_url` parts, base64 PDF documents `file` parts, text documents text.
* Thinking blocks the caller sends back are dropped, and so are `cache_control` markers,
  `top_k` and `thinking` itself: chat has no place for them (other providers cache and
  think on their own terms).
* What only Anthropic can run or read (server tools such as web search or code execution,
  Files API references, URL documents, images inside tool results) cannot be translated:
  such a request is refused with a 400 by any upstream that is not Anthropic.
* `max_tokens` becomes `max_completion_tokens`, `stop_sequences` `stop`,
  `metadata.user_id` `user`; `tool_choice` and `disable_parallel_tool_use` map one to one.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from metergate.api.doors.blocks import Block, Blocks
from metergate.errors import GatewayError, InvalidRequest
from metergate.providers.base import StreamState, Usage
from metergate.providers.sse import SSEDecoder, event_object
from metergate.providers.translation import (
    a_list,
    a_string,
    an_object,
    invalid_request,
    request_translator,
    required_string,
    text_of,
)

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# Anthropic's error types by status; the SDK picks its exception class by the status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


@request_translator
def to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The chat body for a Messages request, and why it is incomplete (None when it is not)."""
    lost: list[str] = []
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"), lost)
    if system:
        messages.append({"role": "system", "content": system})
    for number, message in enumerate(body["messages"]):  # (checked: objects)
        role, where = message.get("role"), f"messages.{number}.content"
        content = _content(message.get("content"), where)
        if role == "user":
            messages += _user(content, where, lost)
        elif role == "assistant":
            messages.append(_assistant(content, where, lost))
        elif role == "system":  # mid-conversation instructions (a beta Claude Code uses)
            messages.append({"role": "system", "content": _system_text(content, lost)})
        else:
            raise InvalidRequest(
                f"messages.{number}.role: must be 'user', 'assistant' or 'system'",
                param="messages",
            )
    chat: dict[str, Any] = {
        "model": body["model"],
        "messages": messages,
        "max_completion_tokens": body["max_tokens"],
    }
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    stops = a_list(body.get("stop_sequences"), "stop_sequences")
    for number, stop in enumerate(stops):
        a_string(stop, f"stop_sequences.{number}")
    if stops:
        chat["stop"] = stops
    user = an_object(body.get("metadata") or {}, "metadata").get("user_id")
    if user:
        chat["user"] = str(user)
    tools = [
        _tool(an_object(tool, f"tools.{number}"), f"tools.{number}", lost)
        for number, tool in enumerate(a_list(body.get("tools"), "tools"))
    ]
    if any(tools):
        chat["tools"] = [tool for tool in tools if tool]
        _tool_choice(chat, body.get("tool_choice"))
    return chat, "; ".join(lost) or None


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or a list of blocks, each an object with a type."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"`{where}` must be a string or an array of content blocks", where)
    for number, block in enumerate(content):
        a_string(an_object(block, f"{where}.{number}").get("type"), f"{where}.{number}.type")
    return content


def _system_text(system: Any, lost: list[str]) -> str:
    system = _content(system or "", "system")
    if isinstance(system, str):
        return system
    for block in system:
        if block.get("type") != "text":
            lost.append(f"system block type {block.get('type')!r}")
    return text_of(system, "system")


def _user(content: str | list[dict[str, Any]], where: str, lost: list[str]) -> list[dict[str, Any]]:
    """A user turn: its tool results (as `tool` messages) first, then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for number, block in enumerate(content):
        kind, at = block["type"], f"{where}.{number}"
        if kind == "tool_result":
            results.append(_tool_result(block, at, lost))
        elif kind == "text":
            parts.append({"type": "text", "text": a_string(block.get("text"), f"{at}.text") or ""})
        elif kind == "image":
            parts.append(_image(an_object(block.get("source"), f"{at}.source"), at, lost))
        elif kind == "document":
            parts.append(_document(block, at, lost))
        elif kind not in ("thinking", "redacted_thinking"):
            lost.append(f"content block type {kind!r}")
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _image(source: dict[str, Any], at: str, lost: list[str]) -> dict[str, Any]:
    if source.get("type") == "base64":
        media = a_string(source.get("media_type"), f"{at}.source.media_type")
        url = f"data:{media};base64,{a_string(source.get('data'), f'{at}.source.data') or ''}"
    elif source.get("type") == "url":
        url = a_string(source.get("url"), f"{at}.source.url") or ""
    else:
        lost.append(f"image source type {source.get('type')!r}")
        url = ""
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], at: str, lost: list[str]) -> dict[str, Any]:
    source = an_object(block.get("source") or {}, f"{at}.source")
    kind = source.get("type")
    if kind == "base64" and source.get("media_type") == "application/pdf":
        name = (a_string(block.get("title"), f"{at}.title") or "document") + ".pdf"
        data = f"data:application/pdf;base64,{a_string(source.get('data'), f'{at}.source.data')}"
        return {"type": "file", "file": {"filename": name, "file_data": data}}
    if kind == "text":
        return {"type": "text", "text": a_string(source.get("data"), f"{at}.source.data") or ""}
    if kind == "content":
        return {"type": "text", "text": text_of(source.get("content"), f"{at}.source.content")}
    lost.append(f"document source type {kind!r}")
    return {"type": "text", "text": ""}


def _tool_result(block: dict[str, Any], at: str, lost: list[str]) -> dict[str, Any]:
    content = block.get("content")
    text = text_of(content, f"{at}.content")  # checks a list's blocks are objects
    if isinstance(content, list) and any(part.get("type") != "text" for part in content):
        lost.append("non-text content in a tool_result")
    if block.get("is_error"):
        text = f"Error: {text}"
    call_id = required_string(block, "tool_use_id", at)
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _assistant(content: str | list[dict[str, Any]], where: str, lost: list[str]) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for number, block in enumerate(content):
        kind, at = block["type"], f"{where}.{number}"
        if kind == "text":
            texts.append(a_string(block.get("text"), f"{at}.text") or "")
        elif kind == "tool_use":
            arguments = orjson.dumps(an_object(block.get("input") or {}, f"{at}.input")).decode()
            calls.append(
                {
                    "id": required_string(block, "id", at),
                    "type": "function",
                    "function": {
                        "name": required_string(block, "name", at),
                        "arguments": arguments,
                    },
                }
            )
        elif kind not in ("thinking", "redacted_thinking"):
            lost.append(f"assistant content block type {kind!r}")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: dict[str, Any], at: str, lost: list[str]) -> dict[str, Any] | None:
    if tool.get("type") not in (None, "custom"):
        lost.append(f"server tool {tool.get('name')!r} ({tool['type']}), which Anthropic runs")
        return None
    schema = tool.get("input_schema")
    function: dict[str, Any] = {
        "name": required_string(tool, "name", at),
        "parameters": an_object(schema, f"{at}.input_schema")
        if schema
        else {"type": "object", "properties": {}},
    }
    if a_string(tool.get("description"), f"{at}.description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(chat: dict[str, Any], choice: Any) -> None:
    if not choice:
        return
    kind = a_string(an_object(choice, "tool_choice").get("type"), "tool_choice.type")
    if kind == "tool":
        name = required_string(choice, "name", "tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind in _CHOICES:
        chat["tool_choice"] = _CHOICES[kind]
    if choice.get("disable_parallel_tool_use") and kind != "none":
        chat["parallel_tool_calls"] = False


def usage_of(usage: Usage) -> dict[str, int]:
    """Anthropic's usage object: input excludes cache reads and writes, listed apart."""
    return {
        "input_tokens": usage.input_tokens - usage.cache_write_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
    }


def to_message(answer: bytes, usage: Usage) -> bytes:
    """The Messages API answer for an OpenAI chat completion."""
    chat = orjson.loads(answer)
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content") or message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments")),
            }
        )
    reason = choice.get("finish_reason")
    return orjson.dumps(
        {
            "id": new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": chat.get("model"),
            "content": content,
            "stop_reason": "refusal" if message.get("refusal") else STOP_REASONS.get(reason),
            "stop_sequence": None,
            "usage": usage_of(usage),
        }
    )


def _arguments(raw: Any) -> dict[str, Any]:
    """A tool call's input: Anthropic wants an object; a model's broken JSON is kept whole."""
    try:
        value = orjson.loads(raw or "{}")
    except (orjson.JSONDecodeError, TypeError):
        value = None
    return value if isinstance(value, dict) else {"arguments": raw}


def error_payload(error: GatewayError) -> tuple[int, dict[str, Any]]:
    """Status and body of an error in Anthropic's shape (an upstream's 529 kept as such)."""
    status = 529 if error.upstream_status == 529 else error.status
    kind = error.error_type
    if kind not in ERROR_TYPES.values() or (kind == "invalid_request_error" and status != 400):
        # (the request's own faults of other statuses have their own types: a body too
        # large is `request_too_large`, an unknown path `not_found_error`)
        kind = ERROR_TYPES.get(status) or (
            "api_error" if status >= 500 else "invalid_request_error"
        )
    return status, {"type": "error", "error": {"type": kind, "message": error.message}}


def error_event(error: GatewayError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(error_payload(error)[1]) + b"\n\n"


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


class MessageStream(Blocks):
    """OpenAI chat chunks -> Anthropic's stream events, in their exact grammar:
    message_start, ping, then per block content_block_start / _delta... / _stop, then
    message_delta (stop reason and usage) and message_stop; an `error` event on failure.
    Blocks go out one at a time, in the order they began upstream (see `Blocks`)."""

    def __init__(self, state: StreamState) -> None:
        super().__init__()
        self.state = state  # the pipeline's: its usage is final when the stream ends
        self.decoder = SSEDecoder()
        self.started = False
        self.reason: str | None = None
        self.refused = False  # the model refused (OpenAI's `refusal`): so the stop says

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for sse in self.decoder.feed(chunk):
            if not sse.data or sse.data == b"[DONE]":
                continue
            data = event_object(sse.data)
            if not self.started:
                out += self._start(data)
            for choice in data.get("choices") or []:
                if choice.get("index", 0) == 0:
                    out += self._delta(choice.get("delta") or {})
                    self.reason = choice.get("finish_reason") or self.reason
        return bytes(out)

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self.started = True
        message: dict[str, Any] = {
            "id": new_message_id(),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return event("message_start", {"message": message}) + event("ping", {})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        out = bytearray()
        text = delta.get("content") or delta.get("refusal")
        if text:
            out += self._add_text(text)
        if delta.get("refusal"):
            self.refused = True
        for call in delta.get("tool_calls") or []:
            out += self._add_call(call)
        return bytes(out)

    def _opened(self, block: Block) -> bytes:
        content: dict[str, Any] = {"type": "text", "text": ""}
        if block.call is not None:
            content = {"type": "tool_use", "id": block.call.get("id"), "name": block.name}
            content["input"] = {}
        return event("content_block_start", {"index": block.index, "content_block": content})

    def _grew(self, block: Block, piece: str) -> bytes:
        delta = {"type": "text_delta", "text": piece}
        if block.call is not None:
            delta = {"type": "input_json_delta", "partial_json": piece}
        return event("content_block_delta", {"index": block.index, "delta": delta})

    def _closed(self, block: Block) -> bytes:
        return event("content_block_stop", {"index": block.index})

    async def end(self) -> bytes:
        out = bytearray() if self.started else bytearray(self._start({}))
        out += self._finish()
        usage = usage_of(self.state.usage or Usage())
        reason = "refusal" if self.refused else STOP_REASONS.get(self.reason or "stop")
        delta = {"stop_reason": reason, "stop_sequence": None}
        out += event("message_delta", {"delta": delta, "usage": usage})
        out += event("message_stop", {})
        return bytes(out)

    async def failed(self, error: GatewayError) -> bytes:
        return error_event(error)


class NativeMessageStream:
    """An Anthropic upstream's own events, relayed as they are; errors in kind."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    async def end(self) -> bytes:
        return b""

    async def failed(self, error: GatewayError) -> bytes:
        return error_event(error)
