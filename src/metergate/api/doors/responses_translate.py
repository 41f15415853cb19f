"""OpenAI Responses request -> chat body, and chat answers -> Response objects.

Used when a `/v1/responses` request is served by an upstream without the Responses API
(any but OpenAI's own, unless `apis` says otherwise). Choices worth knowing:

* `instructions` becomes the first, system message; input items become chat messages
  (`function_call` items the assistant's tool calls, `function_call_output` items `tool`
  messages); `reasoning` items the caller sends back are dropped.
* Function tools, `tool_choice`, `parallel_tool_calls`, `text.format` (json_object and
  json_schema), `max_output_tokens`, `temperature`, `top_p`, `user` and
  `reasoning.effort` (as `reasoning_effort`) map to their chat equivalents; `store`,
  `metadata`, `include`, `truncation` and the like concern the gateway or OpenAI only.
* Built-in tools (web search, file search, code interpreter, computer use, MCP, image
  generation...), their call items, item references and Files API ids run or resolve on
  OpenAI's side only: a request with them is refused with a 400 by any other upstream.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from metergate.errors import InvalidRequest
from metergate.providers.base import Usage
from metergate.providers.translation import request_translator

# Request fields echoed in the Response object, with OpenAI's defaults.
ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal", "summary_text"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def input_items(body: dict[str, Any]) -> list[Any]:
    """The request's `input` as a list of items (a string is one user message)."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return value
    raise InvalidRequest(
        "`input` must be a non-empty string or array of input items", param="input"
    )


@request_translator
def to_chat(body: dict[str, Any], items: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """The chat body for a Responses request whose whole conversation is `items`."""
    lost: list[str] = []
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    for item in items:
        _add_item(messages, item, lost)
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    for name in ("temperature", "top_p", "stream", "parallel_tool_calls", "user"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    effort = (body.get("reasoning") or {}).get("effort")
    if effort:
        chat["reasoning_effort"] = effort
    response_format = _response_format((body.get("text") or {}).get("format"))
    if response_format:
        chat["response_format"] = response_format
    tools = [_tool(tool, lost) for tool in body.get("tools") or []]
    if any(tools):
        chat["tools"] = [tool for tool in tools if tool]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict):
        if choice.get("type") == "function":
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            lost.append(f"tool_choice of type {choice.get('type')!r}")
    return chat, "; ".join(lost) or None


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], lost: list[str]) -> None:
    kind = item.get("type") or ("message" if "role" in item else None)
    if kind == "message":
        messages.append(_message(item, lost))
    elif kind == "function_call":
        call = {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _text(output, lost)
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    elif kind != "reasoning":
        lost.append(f"input item type {kind!r}")


def _message(item: dict[str, Any], lost: list[str]) -> dict[str, Any]:
    role = item["role"]
    content = item.get("content")
    if isinstance(content, str) or role != "user":
        text = content if isinstance(content, str) else _text(content, lost)
        return {"role": role, "content": text}
    parts: list[dict[str, Any]] = []
    for part in content or []:
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": part.get("text") or ""})
        elif kind == "input_image" and part.get("image_url"):
            image = {"url": part["image_url"], "detail": part.get("detail") or "auto"}
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file" and (part.get("file_data") or part.get("file_id")):
            spec = {k: part[k] for k in ("file_data", "file_id", "filename") if part.get(k)}
            parts.append({"type": "file", "file": spec})
        else:
            lost.append(f"content part type {kind!r}")
    return {"role": "user", "content": parts}


def _text(content: Any, lost: list[str]) -> str:
    texts: list[str] = []
    for part in content or []:
        if part.get("type") in _TEXT_PARTS:
            texts.append(part.get("text") or "")
        else:
            lost.append(f"content part type {part.get('type')!r} outside a user message")
    return "".join(texts)


def _tool(tool: dict[str, Any], lost: list[str]) -> dict[str, Any] | None:
    if tool.get("type") != "function":
        lost.append(f"built-in tool {tool.get('type')!r}, which OpenAI's Responses API runs")
        return None
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _response_format(spec: Any) -> dict[str, Any] | None:
    if not isinstance(spec, dict) or spec.get("type") in (None, "text"):
        return None
    if spec["type"] == "json_schema":
        fields = ("name", "schema", "strict", "description")
        return {"type": "json_schema", "json_schema": {k: spec[k] for k in fields if k in spec}}
    return {"type": spec["type"]}


def usage_of(usage: Usage) -> dict[str, Any]:
    prompt = usage.input_tokens + usage.cached_input_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": prompt + usage.output_tokens,
    }


def response_object(
    body: dict[str, Any],
    response_id: str,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None,
    **extra: Any,
) -> dict[str, Any]:
    """A Response, echoing the request's settings as OpenAI does."""
    echoed = {name: body.get(name, default) for name, default in ECHOED.items()}
    if echoed["metadata"] is None:
        echoed["metadata"] = {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": model,
        "output": output,
        **echoed,
        "usage": None if usage is None else usage_of(usage),
        **extra,
    }


def text_item(
    item_id: str, text: str, status: str = "completed", refusal: bool = False
) -> dict[str, Any]:
    """A message item: the model's text, or its refusal (a `refusal` part, as the
    Responses API gives what chat calls `message.refusal`)."""
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    if refusal:
        part = {"type": "refusal", "refusal": text}
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part] if status == "completed" else [],
    }


def call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.get("id") or new_id("call"),
        "name": function.get("name"),
        "arguments": function.get("arguments") or "",
    }


def finished(reason: str | None) -> tuple[str, dict[str, str] | None]:
    """Status and incomplete_details of a response by its chat finish reason."""
    if reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def to_response(
    body: dict[str, Any], response_id: str, answer: bytes, usage: Usage
) -> dict[str, Any]:
    """The Response object of a chat completion."""
    chat = orjson.loads(answer)
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    text = message.get("content")
    if text:
        output.append(text_item(new_id("msg"), text))
    if message.get("refusal"):
        output.append(text_item(new_id("msg"), message["refusal"], refusal=True))
    for call in message.get("tool_calls") or []:
        output.append(call_item(new_id("fc"), call))
    status, incomplete = finished(choice.get("finish_reason"))
    return response_object(
        body,
        response_id,
        chat.get("model") or body["model"],
        status,
        output,
        usage,
        incomplete_details=incomplete,
    )
