"""The conversation in a span, only with `capture_content`: messages in the GenAI
conventions' JSON shape (`[{"role", "parts": [{"type": "text", "content"}]}]`), read
from the request in chat terms as the door built it (so a Messages request's `system`,
a Responses request's `instructions` and its stored conversation are in it) and from
the answer (`answers`).

Captured text is bounded per attribute (`tracing.max_content_bytes`): a prompt of
megabytes would otherwise make a span, and the export batch it rides in, bigger than a
collector takes (20 MiB per OTLP/HTTP request, 4 MiB per gRPC message by default), and
the whole batch would be refused. Text past the bound is cut inside its part, so the
attribute stays valid JSON and says how much was cut."""

from __future__ import annotations

from typing import Any

import orjson


class Budget:
    """The bytes of text one attribute may still take."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, text: str) -> str:
        size = len(text) if text.isascii() else len(text.encode())
        if size <= self.left:
            self.left -= size
            return text
        keep, self.left = self.left, 0
        head = text[:keep].encode()[:keep].decode("utf-8", "ignore")
        return f"{head}…[{size - len(head.encode())} more bytes cut]"


def input_messages(body: dict[str, Any], limit: int) -> str | None:
    """gen_ai.input.messages of a chat request (or an embeddings request's input), its
    text cut at `limit` bytes."""
    budget = Budget(limit)
    messages = body.get("messages")
    if isinstance(messages, list):
        said = [message_parts(m, budget) for m in messages if isinstance(m, dict)]
        return orjson.dumps(said).decode()
    data = body.get("input")
    if data is None:
        return None
    texts = data if isinstance(data, list) else [data]
    parts = [{"type": "text", "content": budget.take(t)} for t in texts if isinstance(t, str)]
    return orjson.dumps([{"role": "user", "parts": parts}]).decode()


def message_parts(message: dict[str, Any], budget: Budget) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    body = message.get("content")
    if isinstance(body, str):
        parts.append({"type": "text", "content": budget.take(body)})
    elif isinstance(body, list):
        for part in body:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append({"type": "text", "content": budget.take(part["text"])})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                arguments = budget.take(arguments)
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": arguments,
                }
            )
    return {"role": nonempty(message.get("role")) or "user", "parts": parts}


def nonempty(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
