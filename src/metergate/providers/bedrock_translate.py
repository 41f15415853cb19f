"""OpenAI chat request -> Bedrock Converse request, and Converse answers -> OpenAI.

Converse is one format for every chat model on Bedrock (Anthropic, Llama, Mistral, Nova,
...). Choices worth knowing (the adapter's docstring has the user-facing summary):

* System and developer messages become `system` blocks; consecutive messages of one role
  are merged into one turn (Converse wants user and assistant turns to alternate), so
  tool results, each an OpenAI `tool` message, land together in one user turn.
* Images must be inline: data URLs become `image` blocks; Converse cannot fetch a URL.
* `response_format` is best effort, as for Anthropic: an instruction in `system`.
* `tool_choice: none` has no Converse equivalent: tools are then left out of the
  request unless the conversation already holds tool calls (Converse needs them then).
* Reasoning blocks are dropped; their tokens are billed as output, as Bedrock counts them.
* Usage: cache writes count as input tokens (billed at least as input), cache reads as
  cached input.
"""

from __future__ import annotations

from typing import Any

import orjson

from metergate.providers.anthropic_translate import format_instruction, turns_of
from metergate.providers.base import Completion, Usage, token_count
from metergate.providers.translation import (
    a_list,
    assistant_message,
    function_tool,
    invalid_request,
    max_output_tokens,
    new_call_id,
    request_translator,
    stop_sequences,
    translated_completion,
)

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
_IMAGE_FORMATS = {f"image/{kind}": kind for kind in ("png", "jpeg", "gif", "webp")}


def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def usage_of(raw: dict[str, Any] | None) -> Usage:
    raw = raw or {}
    writes = token_count(raw, "cacheWriteInputTokens")
    return Usage(
        input_tokens=token_count(raw, "inputTokens") + writes,
        cached_input_tokens=token_count(raw, "cacheReadInputTokens"),
        output_tokens=token_count(raw, "outputTokens"),
        cache_write_tokens=writes,  # priced at the cache-write rate, as Bedrock bills them
    )


@request_translator
def to_converse_request(body: dict[str, Any]) -> dict[str, Any]:
    """The Converse payload for an OpenAI chat request (the model id goes in the URL)."""
    if (body.get("n") or 1) > 1:
        raise invalid_request("n > 1 is not supported by Bedrock: send n separate requests")
    system, messages = _turns(a_list(body.get("messages"), "messages"))
    instruction = format_instruction(body)
    if instruction:
        system.append(instruction)
    payload: dict[str, Any] = {"messages": messages}
    if system:
        payload["system"] = [{"text": text} for text in system]
    config: dict[str, Any] = {}
    limit = max_output_tokens(body)
    if limit is not None:
        config["maxTokens"] = limit
    for source, target in (("temperature", "temperature"), ("top_p", "topP")):
        if body.get(source) is not None:
            config[target] = body[source]
    stops = stop_sequences(body.get("stop"))
    if stops:
        config["stopSequences"] = stops
    if config:
        payload["inferenceConfig"] = config
    tools = _tool_config(body, messages)
    if tools:
        payload["toolConfig"] = tools
    return payload


def from_converse(data: dict[str, Any], model: str) -> Completion:
    """The OpenAI `chat.completion` answer and usage of a Converse answer."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    message = (data.get("output") or {}).get("message") or {}
    for block in message.get("content") or []:
        if "text" in block:
            texts.append(block.get("text") or "")
        elif "toolUse" in block:
            use = block["toolUse"] or {}
            calls.append(
                {
                    "id": use.get("toolUseId") or new_call_id(),
                    "type": "function",
                    "function": {
                        "name": use.get("name"),
                        "arguments": orjson.dumps(use.get("input") or {}).decode(),
                    },
                }
            )
    raw = data.get("usage")
    choice = {
        "index": 0,
        "message": assistant_message("".join(texts), calls),
        "finish_reason": finish_reason(data.get("stopReason")),
        "logprobs": None,
    }
    answer_id = "chatcmpl-" + new_call_id()[5:]
    return translated_completion(answer_id, model, [choice], raw, usage_of(raw))


def _turns(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Anthropic's turns (the same alternation rules, the same checks of the caller's
    messages, with field paths in errors) in Converse's block shapes."""
    system, turns = turns_of(messages)
    for turn in turns:
        turn["content"] = [_converse_block(block) for block in turn["content"]]
    return system, turns


def _converse_block(block: dict[str, Any]) -> dict[str, Any]:
    kind = block["type"]
    if kind == "text":
        return {"text": block["text"]}
    if kind == "tool_use":
        return {
            "toolUse": {"toolUseId": block["id"], "name": block["name"], "input": block["input"]}
        }
    if kind == "tool_result":
        content = [{"text": block.get("content") or "(empty)"}]
        return {"toolResult": {"toolUseId": block["tool_use_id"], "content": content}}
    source = block["source"]  # an image
    if source["type"] != "base64":
        raise invalid_request("Bedrock takes images inline only: send a base64 data: URL")
    media_type = source["media_type"]
    if media_type not in _IMAGE_FORMATS:
        raise invalid_request(f"image type {media_type!r} is not supported by Bedrock")
    return {"image": {"format": _IMAGE_FORMATS[media_type], "source": {"bytes": source["data"]}}}


def _tool_config(body: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    tools = a_list(body.get("tools"), "tools")
    if not tools:
        return None
    choice = body.get("tool_choice")
    used = any("toolUse" in b or "toolResult" in b for t in turns for b in t["content"])
    if choice == "none" and not used:
        return None
    config: dict[str, Any] = {
        "tools": [_tool_spec(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    }
    if choice in (None, "none"):
        return config
    if choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    else:
        raise invalid_request(f"unsupported tool_choice {choice!r}")
    return config


def _tool_spec(item: Any, where: str) -> dict[str, Any]:
    tool = function_tool(item, where, "Bedrock")
    spec: dict[str, Any] = {
        "name": tool.name,
        "inputSchema": {"json": tool.parameters or {"type": "object", "properties": {}}},
    }
    if tool.description:
        spec["description"] = tool.description
    return {"toolSpec": spec}
