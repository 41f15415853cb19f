"""OpenAI chat request -> Anthropic Messages request, and Messages answer -> OpenAI answer.

Choices worth knowing (the adapter's docstring has the user-facing summary):

* System and developer messages, wherever they appear, are joined into the top-level
  `system` prompt: Anthropic has no system role inside `messages`.
* Consecutive messages of one role are merged into one turn, so tool results (each an
  OpenAI `tool` message) land together in one user turn, before any text that follows.
* Fields Anthropic lacks (frequency/presence penalties, seed, logit_bias, logprobs,
  reasoning_effort) are dropped; values Anthropic rejects (e.g. temperature above 1) are passed
  on so that its own 400 explains the problem.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.providers.base import Completion, Usage, token_count
from metergate.providers.translation import (
    a_list,
    a_string,
    an_object,
    assistant_message,
    function_tool,
    image_url_of,
    invalid_request,
    max_output_tokens,
    parse_arguments,
    parse_data_url,
    request_translator,
    response_format_of,
    shown,
    stop_sequences,
    text_of,
    tool_calls_of,
    translated_completion,
)

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI callers often omit it

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_JSON_OBJECT = "Reply with one valid JSON object and nothing else: no prose, no code fences."
_JSON_SCHEMA = (
    "Reply with one valid JSON value that conforms to the JSON schema below, and nothing "
    "else: no prose, no code fences.\nSchema ({name}): {schema}"
)


def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def usage_of(raw: dict[str, Any] | None) -> Usage:
    """Cache writes count as input tokens, priced at the cache-write rate (5-minute or
    1-hour); only cache reads count as cached; web searches are counted to be priced."""
    raw = raw or {}
    writes = token_count(raw, "cache_creation_input_tokens")
    hour = token_count(raw.get("cache_creation"), "ephemeral_1h_input_tokens")
    found = Usage(
        input_tokens=token_count(raw, "input_tokens") + writes,
        cached_input_tokens=token_count(raw, "cache_read_input_tokens"),
        output_tokens=token_count(raw, "output_tokens"),
        cache_write_tokens=writes,
        cache_write_1h_tokens=min(hour, writes),
    )
    tools = raw.get("server_tool_use")  # server tools' runs: searches cost per search
    if tools:
        found.web_searches = token_count(tools, "web_search_requests")
    return found


@request_translator
def to_messages_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Messages API payload for an OpenAI chat request (without `stream`)."""
    if (body.get("n") or 1) > 1:
        raise invalid_request(
            "n > 1 is not supported by Anthropic models: send n separate requests instead", "n"
        )
    system, messages = turns_of(a_list(body.get("messages"), "messages"))
    instruction = format_instruction(body)
    if instruction:
        system.append(instruction)
    limit = max_output_tokens(body)
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": DEFAULT_MAX_TOKENS if limit is None else limit,
        "messages": messages,
    }
    if system:
        payload["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            payload[key] = body[key]
    stops = stop_sequences(body.get("stop"))
    if stops:
        payload["stop_sequences"] = stops
    tools = a_list(body.get("tools"), "tools")
    if tools:
        payload["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice:
            payload["tool_choice"] = choice
    if body.get("user"):
        payload["metadata"] = {"user_id": str(body["user"])}
    return payload


def from_message(data: dict[str, Any], model: str) -> Completion:
    """The OpenAI `chat.completion` answer and usage of a Messages API answer."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in data.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        # thinking blocks are not part of OpenAI's chat format and are dropped
    raw = data.get("usage")
    choice = {
        "index": 0,
        "message": assistant_message("".join(texts), tool_calls),
        "finish_reason": finish_reason(data.get("stop_reason")),
        "logprobs": None,
    }
    answer_id, answer_model = data.get("id") or "", data.get("model") or model
    return translated_completion(answer_id, answer_model, [choice], raw, usage_of(raw))


def turns_of(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Split OpenAI messages into system texts and alternating user/assistant turns."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for index, item in enumerate(messages):
        where = f"messages[{index}]"
        message = an_object(item, where)
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"), f"{where}.content")
            if text:
                system.append(text)
            continue
        if role == "user":
            turn_role, blocks = "user", _user_blocks(message.get("content"), f"{where}.content")
        elif role == "assistant":
            turn_role, blocks = "assistant", _assistant_blocks(message, where)
        elif role == "tool":
            turn_role, blocks = "user", [_tool_result(message, where)]
        else:
            raise invalid_request(
                f"`{where}.role` must be system, developer, user, assistant or tool "
                f"for Anthropic models, not {shown(role)}",
                f"{where}.role",
            )
        if not blocks:
            continue  # Anthropic rejects empty turns; an empty message adds nothing
        if turns and turns[-1]["role"] == turn_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": turn_role, "content": blocks})
    return system, turns


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str) or content is None:
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for index, item in enumerate(a_list(content, where)):
        at = f"{where}[{index}]"
        part = an_object(item, at)
        kind = part.get("type")
        if kind == "text":
            text = a_string(part.get("text"), f"{at}.text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image(image_url_of(part, at), at))
        else:
            raise invalid_request(
                f"`{at}.type` {shown(kind)} is not supported for Anthropic; use text or image_url",
                f"{at}.type",
            )
    return blocks


def _image(url: str, where: str) -> dict[str, Any]:
    inline = parse_data_url(url, where)
    if inline is None:
        return {"type": "image", "source": {"type": "url", "url": url}}
    media_type, data = inline
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = text_of(message.get("content"), f"{where}.content")
    if text:
        blocks.append({"type": "text", "text": text})
    for call, function, at in tool_calls_of(message, where):
        blocks.append(
            {
                "type": "tool_use",
                "id": a_string(call.get("id"), f"{at}.id"),
                "name": function.get("name"),
                "input": parse_arguments(function.get("arguments"), f"{at}.function.arguments"),
            }
        )
    return blocks


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = a_string(message.get("tool_call_id"), f"{where}.tool_call_id")
    if not call_id:
        raise invalid_request(
            f"`{where}.tool_call_id` is required: a tool message answers a tool call",
            f"{where}.tool_call_id",
        )
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    text = text_of(message.get("content"), f"{where}.content")
    if text:
        block["content"] = text
    return block


def _tool(item: Any, where: str) -> dict[str, Any]:
    tool = function_tool(item, where, "Anthropic")
    result: dict[str, Any] = {
        "name": tool.name,
        "input_schema": tool.parameters or {"type": "object", "properties": {}},
    }
    if tool.description:
        result["description"] = tool.description
    return result


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = {"type": "auto"} if parallel is False else None
    elif isinstance(choice, str) and choice in ("auto", "required", "none"):
        result = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    elif (
        isinstance(choice, dict)
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise invalid_request(f"unsupported tool_choice {shown(choice)}", "tool_choice")
    if result and parallel is False and result["type"] != "none":
        result["disable_parallel_tool_use"] = True
    return result


def format_instruction(body: dict[str, Any]) -> str | None:
    """Best-effort JSON mode: the Messages API has no response format, so ask in `system`."""
    kind, spec = response_format_of(body)
    if kind == "json_object":
        return _JSON_OBJECT
    if kind == "json_schema":
        schema = orjson.dumps(spec.get("schema") or {}).decode()
        return _JSON_SCHEMA.format(name=spec.get("name") or "response", schema=schema)
    return None
