"""OpenAI chat request -> Gemini generateContent request, and Gemini answers -> OpenAI.

Choices worth knowing (the adapter's docstring has the user-facing summary):

* System and developer messages are joined into `systemInstruction`.
* A `tool` message becomes a `functionResponse` part; Gemini wants the function's name,
  which OpenAI only puts on the assistant's tool call, so it is looked up by call id.
  The tool's output is sent as `{"result": <text>}` (Gemini wants an object).
* Schemas (tool parameters, `json_schema` response formats) go in the JSON Schema
  fields `parametersJsonSchema` / `responseJsonSchema`, not in the older OpenAPI-subset
  `parameters` / `responseSchema`, which reject common JSON Schema keywords such as
  `additionalProperties` that OpenAI strict schemas always carry.
* Fields Gemini has no equivalent for (`user`, `logit_bias`, `logprobs`,
  `parallel_tool_calls`, `reasoning_effort`) are dropped.
* Gemini 3 models sign their function calls and want the signature back. It is passed
  to callers the way Google's own OpenAI endpoint does, as
  `tool_calls[].extra_content.google.thought_signature`, and sent back when present.
"""

from __future__ import annotations

import mimetypes
from typing import Any

import orjson

from metergate.providers.base import Completion, Usage, token_count
from metergate.providers.translation import (
    a_list,
    a_string,
    an_object,
    assistant_message,
    function_of,
    function_tool,
    image_url_of,
    invalid_request,
    max_output_tokens,
    new_call_id,
    parse_arguments,
    parse_data_url,
    request_translator,
    response_format_of,
    shown,
    stop_sequences,
    text_of,
    translated_completion,
)

_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "topP",
    "n": "candidateCount",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}


def finish_reason(reason: str | None, called_tools: bool) -> str:
    """Gemini says STOP even after a function call; OpenAI callers expect `tool_calls`."""
    if called_tools:
        return "tool_calls"
    if reason == "MAX_TOKENS":
        return "length"
    return "content_filter" if reason in _FILTERED else "stop"


def usage_of(meta: dict[str, Any] | None) -> Usage:
    """Thinking tokens are billed as output; tool-use prompt tokens (e.g. search) as input."""
    meta = meta or {}
    prompt = token_count(meta, "promptTokenCount") + token_count(meta, "toolUsePromptTokenCount")
    cached = min(prompt, token_count(meta, "cachedContentTokenCount"))
    thoughts = token_count(meta, "thoughtsTokenCount")
    found = Usage(prompt - cached, cached, token_count(meta, "candidatesTokenCount") + thoughts)
    found.reasoning_tokens = thoughts
    return found


def candidates_of(data: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(choice index, candidate) pairs; a blocked prompt becomes one filtered candidate.

    proto3 JSON omits a zero `index`, hence the position as fallback.
    """
    candidates = data.get("candidates") or []
    if not candidates and (data.get("promptFeedback") or {}).get("blockReason"):
        candidates = [{"finishReason": "SAFETY"}]
    return [(c.get("index", position), c) for position, c in enumerate(candidates)]


def parts_of(candidate: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The answer text and OpenAI tool calls of a candidate; thought parts are skipped."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in (candidate.get("content") or {}).get("parts") or []:
        if part.get("thought"):
            continue
        if "functionCall" in part:
            function = part["functionCall"]
            call: dict[str, Any] = {
                "id": new_call_id(),
                "type": "function",
                "function": {
                    "name": function.get("name"),
                    "arguments": orjson.dumps(function.get("args") or {}).decode(),
                },
            }
            if part.get("thoughtSignature"):
                call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
            calls.append(call)
        elif part.get("text"):
            texts.append(part["text"])
    return "".join(texts), calls


def from_response(data: dict[str, Any], model: str) -> Completion:
    """The OpenAI `chat.completion` answer and usage of a generateContent answer."""
    choices = []
    for index, candidate in candidates_of(data) or [(0, {"finishReason": "OTHER"})]:
        text, calls = parts_of(candidate)
        choices.append(
            {
                "index": index,
                "message": assistant_message(text, calls),
                "finish_reason": finish_reason(candidate.get("finishReason"), bool(calls)),
                "logprobs": None,
            }
        )
    raw = data.get("usageMetadata")
    response_id = "chatcmpl-" + (data.get("responseId") or new_call_id()[5:])
    answer_model = data.get("modelVersion") or model
    return translated_completion(response_id, answer_model, choices, raw, usage_of(raw))


@request_translator
def to_generate_request(body: dict[str, Any]) -> dict[str, Any]:
    """The generateContent payload for an OpenAI chat request (the model goes in the URL)."""
    system, contents = _contents(a_list(body.get("messages"), "messages"))
    payload: dict[str, Any] = {"contents": contents}
    if system:
        payload["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config = _generation_config(body)
    if config:
        payload["generationConfig"] = config
    tools = a_list(body.get("tools"), "tools")
    if tools:
        payload["tools"] = [
            {"functionDeclarations": [_declaration(t, f"tools[{i}]") for i, t in enumerate(tools)]}
        ]
        choice = body.get("tool_choice")
        if choice is not None:
            payload["toolConfig"] = {"functionCallingConfig": _calling_config(choice)}
    return payload


def _contents(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the tool messages
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
            content_role, parts = "user", _user_parts(message.get("content"), f"{where}.content")
        elif role == "assistant":
            content_role, parts = "model", _model_parts(message, names, where)
        elif role == "tool":
            content_role, parts = "user", [_function_response(message, names, where)]
        else:
            raise invalid_request(
                f"`{where}.role` must be system, developer, user, assistant or tool "
                f"for Gemini models, not {shown(role)}",
                f"{where}.role",
            )
        if not parts:
            continue
        if contents and contents[-1]["role"] == content_role:
            contents[-1]["parts"].extend(parts)  # e.g. parallel calls' responses: one turn
        else:
            contents.append({"role": content_role, "parts": parts})
    return system, contents


def _user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str) or content is None:
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for index, item in enumerate(a_list(content, where)):
        at = f"{where}[{index}]"
        part = an_object(item, at)
        kind = part.get("type")
        if kind == "text":
            text = a_string(part.get("text"), f"{at}.text")
            if text:
                parts.append({"text": text})
        elif kind == "image_url":
            parts.append(_image(image_url_of(part, at), at))
        elif kind == "file":
            parts.append(_file(part, at))
        else:
            raise invalid_request(
                f"`{at}.type` {shown(kind)} is not supported for Gemini; use text, image_url "
                "or file",
                f"{at}.type",
            )
    return parts


def _file(part: dict[str, Any], where: str) -> dict[str, Any]:
    """A `file` part with its data inline (a base64 PDF, as the Messages door makes of a
    document block), which Gemini reads as inline data; an OpenAI file id it cannot."""
    ref = part.get("file")
    data = ref.get("file_data") if isinstance(ref, dict) else None
    inline = parse_data_url(data, f"{where}.file.file_data") if isinstance(data, str) else None
    if inline is None:
        raise invalid_request(
            f"`{where}.file` must carry its data for Gemini (`file_data`, a base64 data: URL); "
            "a `file_id` names a file stored with OpenAI",
            f"{where}.file",
        )
    return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}


def _image(url: str, where: str) -> dict[str, Any]:
    inline = parse_data_url(url, where)
    if inline is not None:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    # Gemini wants a MIME type for file URIs; the extension is the best hint a URL gives.
    mime = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _model_parts(
    message: dict[str, Any], names: dict[str, str], where: str
) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    text = text_of(message.get("content"), f"{where}.content")
    if text:
        parts.append({"text": text})
    for index, item in enumerate(a_list(message.get("tool_calls"), f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{index}]"
        call = an_object(item, at)
        function = function_of(call, at)
        names[a_string(call.get("id"), f"{at}.id") or ""] = function.get("name") or ""
        part: dict[str, Any] = {
            "functionCall": {
                "name": function.get("name"),
                "args": parse_arguments(function.get("arguments"), f"{at}.function.arguments"),
            }
        }
        extra = an_object(call.get("extra_content") or {}, f"{at}.extra_content")
        google = an_object(extra.get("google") or {}, f"{at}.extra_content.google")
        signature = a_string(
            google.get("thought_signature"), f"{at}.extra_content.google.thought_signature"
        )
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def _function_response(
    message: dict[str, Any], names: dict[str, str], where: str
) -> dict[str, Any]:
    call_id = a_string(message.get("tool_call_id"), f"{where}.tool_call_id") or ""
    if call_id not in names:
        raise invalid_request(
            f"`{where}.tool_call_id` {shown(call_id)} answers no tool call of an earlier "
            "assistant message; Gemini needs the function name from that call",
            f"{where}.tool_call_id",
        )
    return {
        "functionResponse": {
            "name": names[call_id],
            "response": {"result": text_of(message.get("content"), f"{where}.content")},
        }
    }


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        target: body[source] for source, target in _SAMPLING.items() if body.get(source) is not None
    }
    limit = max_output_tokens(body)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stops = stop_sequences(body.get("stop"))
    if stops:
        config["stopSequences"] = stops
    kind, spec = response_format_of(body)
    if kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = spec.get("schema")
        if kind == "json_schema" and schema:
            config["responseJsonSchema"] = schema
    return config


def _declaration(item: Any, where: str) -> dict[str, Any]:
    tool = function_tool(item, where, "Gemini")
    declaration: dict[str, Any] = {"name": tool.name}
    if tool.description:
        declaration["description"] = tool.description
    if tool.parameters:
        declaration["parametersJsonSchema"] = tool.parameters
    return declaration


def _calling_config(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _MODES:
        return {"mode": _MODES[choice]}
    if (
        isinstance(choice, dict)
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    raise invalid_request(f"unsupported tool_choice {shown(choice)}", "tool_choice")
