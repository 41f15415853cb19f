"""Whole answers as the streams they would have been, in each upstream's own events.

Some servers (a compatible proxy, a gateway in front of the real API) ignore
`stream: true` and send the whole answer. The upstream generated and billed it, so the
relay (`translation.relay`) does not retry it: it feeds the events built here to the
stream's translator, which meters and relays them as if the upstream had streamed them.
Each function returns [] for a body that is not an answer of its format, and the stream
is then refused as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from metergate.providers.sse import Event


def _event(name: str, data: dict[str, Any]) -> Event:
    raw = orjson.dumps(data)
    head = b"event: " + name.encode() + b"\n" if name else b""
    return Event(name, raw, head + b"data: " + raw + b"\n\n")


def gemini_events(answer: dict[str, Any]) -> list[Event]:
    """A GenerateContentResponse: Gemini's stream events are each one of these, so the
    whole answer is a stream of one event."""
    if type(answer.get("candidates")) is not list:
        return []
    return [_event("", answer)]


def anthropic_events(message: dict[str, Any]) -> list[Event]:
    """A Messages API answer: `message_start`, each content block opened, filled by one
    delta and closed, `message_delta` with the stop reason and output usage,
    `message_stop`: the events the API sends, one delta a block."""
    content = message.get("content")
    if message.get("type") != "message" or type(content) is not list:
        return []
    usage = message.get("usage") if type(message.get("usage")) is dict else None
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    events = [_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(content):
        if type(block) is not dict:
            return []
        opening, delta = _anthropic_block(block)
        events.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": opening},
            )
        )
        for part in delta:
            events.append(
                _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": part},
                )
            )
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    ending: dict[str, Any] = {
        "type": "message_delta",
        "delta": {
            "stop_reason": message.get("stop_reason"),
            "stop_sequence": message.get("stop_sequence"),
        },
    }
    if usage is not None:
        ending["usage"] = usage
    events.append(_event("message_delta", ending))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def _anthropic_block(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A content block's opening and its deltas, as the API streams that kind."""
    kind = block.get("type")
    if kind == "text":
        return {**block, "text": ""}, [{"type": "text_delta", "text": block.get("text") or ""}]
    if kind == "thinking":
        return {**block, "thinking": "", "signature": ""}, [
            {"type": "thinking_delta", "thinking": block.get("thinking") or ""},
            {"type": "signature_delta", "signature": block.get("signature") or ""},
        ]
    if "input" in block:  # tool_use, server_tool_use, mcp_tool_use: input as JSON text
        arguments = orjson.dumps(block["input"]).decode() if block["input"] else ""
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": arguments}]
    return block, []  # redacted thinking, tool results: whole in their opening


_RESPONSES_END = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
}


def responses_events(response: dict[str, Any]) -> list[Event]:
    """A Responses API answer: `response.created`, each output item added, its text parts
    and function call arguments in one delta each, the item done, then the event its
    status ends with. A response still in progress (a background one) is no answer."""
    output = response.get("output")
    end = _RESPONSES_END.get(str(response.get("status")))
    if response.get("object") != "response" or type(output) is not list or end is None:
        return []
    events: list[Event] = []

    def add(kind: str, **fields: Any) -> None:
        events.append(_event(kind, {"type": kind, "sequence_number": len(events), **fields}))

    add("response.created", response={**response, "status": "in_progress", "output": []})
    for index, item in enumerate(output):
        if type(item) is not dict:
            return []
        _responses_item(add, index, item)
    add(end, response=response)
    return events


def _responses_item(add: Callable[..., None], index: int, item: dict[str, Any]) -> None:
    """The events of one output item: a message's parts, a function call's arguments."""
    where = {"item_id": item.get("id"), "output_index": index}
    kind = item.get("type")
    parts = item.get("content") if kind == "message" else None
    if type(parts) is list:
        add("response.output_item.added", output_index=index, item={**item, "content": []})
        for part_index, part in enumerate(parts):
            _responses_part(add, {**where, "content_index": part_index}, part)
    elif kind == "function_call":
        add("response.output_item.added", output_index=index, item={**item, "arguments": ""})
        arguments = str(item.get("arguments") or "")
        add("response.function_call_arguments.delta", **where, delta=arguments)
        add("response.function_call_arguments.done", **where, arguments=arguments)
    else:
        add("response.output_item.added", output_index=index, item=item)
    add("response.output_item.done", output_index=index, item=item)


def _responses_part(add: Callable[..., None], where: dict[str, Any], part: Any) -> None:
    """A message's content part: added empty, its text in one delta, done whole."""
    kind = part.get("type") if type(part) is dict else None
    field = {"output_text": "text", "refusal": "refusal"}.get(str(kind))
    if field is None:
        add("response.content_part.added", **where, part=part)
    else:
        text = str(part.get(field) or "")
        add("response.content_part.added", **where, part={**part, field: ""})
        name = "response.output_text" if field == "text" else "response.refusal"
        extra: dict[str, Any] = {"logprobs": []} if field == "text" else {}
        add(f"{name}.delta", **where, delta=text, **extra)
        add(f"{name}.done", **where, **{field: text}, **extra)
    add("response.content_part.done", **where, part=part)
