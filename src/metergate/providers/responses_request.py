"""Chat requests as Responses API requests, for `providers.responses_bridge`.

The mapping is described there; here each chat field is read through the shared checks
(`providers.translation`), so a malformed request is a 400 that names its field.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.providers.translation import (
    a_list,
    a_string,
    an_object,
    function_of,
    image_url_of,
    invalid_request,
    max_output_tokens,
    request_translator,
    text_of,
    tool_calls_of,
)

# Chat fields the Responses API has no counterpart for, and the value that asks nothing
# of them (a request with any other value is refused rather than answered differently).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "stop": (None, "", []),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "seed": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "function_call": (None,),
    "functions": (None,),
}
# Chat fields the translation consumes (everything else passes through as sent).
_TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "tools",
        "tool_choice",
        "response_format",
        "reasoning_effort",
        "stream",
        "stream_options",
        *_UNSUPPORTED,
    }
)


@request_translator
def to_responses_request(body: dict[str, Any], model: str, format_field: str) -> dict[str, Any]:
    """The Responses request for a chat request (see the module docstring)."""
    for name, harmless in _UNSUPPORTED.items():
        if body.get(name) not in harmless:
            raise invalid_request(
                f"`{name}` cannot be sent to this upstream, which serves chat through the "
                "Responses API; leave it out",
                name,
            )
    request: dict[str, Any] = {k: v for k, v in body.items() if k not in _TRANSLATED}
    request["model"] = model
    # Chat completions are not stored unless asked; the Responses API stores by default.
    request.setdefault("store", False)
    request["input"] = [
        item
        for index, message in enumerate(a_list(body.get("messages"), "messages"))
        for item in _input_items(an_object(message, f"messages[{index}]"), f"messages[{index}]")
    ]
    limit = max_output_tokens(body)
    if limit is not None:
        request["max_output_tokens"] = limit
    tools = a_list(body.get("tools"), "tools")
    if tools:
        request["tools"] = [
            _tool(an_object(t, f"tools[{i}]"), f"tools[{i}]") for i, t in enumerate(tools)
        ]
    if body.get("tool_choice") is not None:
        request["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("reasoning_effort") is not None:
        request["reasoning"] = {"effort": body["reasoning_effort"]}
    response_format = body.get("response_format")
    if response_format is not None:
        if format_field == "response_format":
            request["response_format"] = response_format
        else:
            text_format = _text_format(an_object(response_format, "response_format"))
            if text_format is not None:
                request["text"] = {"format": text_format}
    return request


def _input_items(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        return [{"role": "system", "content": text_of(content, f"{where}.content")}]
    if role == "user":
        return [{"role": "user", "content": _user_content(content, f"{where}.content")}]
    if role == "tool":
        call_id = a_string(message.get("tool_call_id"), f"{where}.tool_call_id")
        output = text_of(content, f"{where}.content")
        return [{"type": "function_call_output", "call_id": call_id, "output": output}]
    if role == "assistant":
        items: list[dict[str, Any]] = []
        text = text_of(content, f"{where}.content")
        if text:
            items.append({"role": "assistant", "content": text})
        for call, function, at in tool_calls_of(message, where):
            arguments = function.get("arguments")
            items.append(
                {
                    "type": "function_call",
                    "call_id": a_string(call.get("id"), f"{at}.id"),
                    "name": function.get("name"),
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else orjson.dumps(arguments or {}).decode(),
                }
            )
        return items
    raise invalid_request(
        f"`{where}.role` {role!r} cannot be sent to this upstream", f"{where}.role"
    )


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(a_list(content, where)):
        part_where = f"{where}[{index}]"
        part = an_object(part, part_where)
        kind = part.get("type")
        if kind == "text":
            parts.append(
                {
                    "type": "input_text",
                    "text": a_string(part.get("text"), f"{part_where}.text") or "",
                }
            )
        elif kind == "image_url":
            parts.append({"type": "input_image", "image_url": image_url_of(part, part_where)})
        else:
            raise invalid_request(
                f"`{part_where}.type` {kind!r} cannot be sent to this upstream "
                "(text and image_url parts can)",
                f"{part_where}.type",
            )
    return parts


def _tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise invalid_request(f"`{where}.type` must be function", f"{where}.type")
    function = function_of(tool, where)
    flat = {"type": "function", "name": function.get("name")}
    for key in ("description", "parameters", "strict"):
        if function.get(key) is not None:
            flat[key] = function[key]
    return flat


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    name = function_of(an_object(choice, "tool_choice"), "tool_choice").get("name")
    return {"type": "function", "name": name}


def _text_format(response_format: dict[str, Any]) -> dict[str, Any] | None:
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = an_object(response_format.get("json_schema") or {}, "response_format.json_schema")
        return {"type": "json_schema", **spec}
    if kind == "json_object":
        return {"type": "json_object"}
    return None
