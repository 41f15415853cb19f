"""What a span may say about an answer, and, only with `capture_content`, about the
conversation: the OpenAI-shaped answer (a JSON body or SSE events) read back for its
model, id and finish reasons; messages in the GenAI conventions' JSON shape
(`[{"role", "parts": [{"type": "text", "content"}]}]`).

Captured text is bounded per attribute (`tracing.max_content_bytes`): a prompt of
megabytes would otherwise make a span, and the export batch it rides in, bigger than a
collector takes (20 MiB per OTLP/HTTP request, 4 MiB per gRPC message by default), and
the whole batch would be refused. Text past the bound is cut inside its part, so the
attribute stays valid JSON and says how much was cut."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(slots=True)
class Answer:
    model: str | None = None
    id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output: str | None = None  # gen_ai.output.messages, when content is captured


def read_answer(raw: bytes | None, output_bytes: int | None) -> Answer:
    """Read a whole JSON answer, or as much of a stream as was kept (its first chunk,
    or all of it when content is captured). With `output_bytes`, the answer's text goes
    in `output`, cut at that many bytes."""
    answer = Answer()
    if not raw:
        return answer
    if raw.lstrip()[:1] == b"{":
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return answer
        if isinstance(data, dict):
            _read_body(data, answer, output_bytes)
        return answer
    _read_stream(raw, answer, output_bytes)
    return answer


def _read_body(data: dict[str, Any], answer: Answer, output_bytes: int | None) -> None:
    answer.model = _text(data.get("model"))
    answer.id = _text(data.get("id"))
    outputs = []
    budget = Budget(output_bytes or 0)
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        reason = _text(choice.get("finish_reason"))
        if reason:
            answer.finish_reasons.append(reason)
        message = choice.get("message")
        if output_bytes is not None and isinstance(message, dict):
            outputs.append({**_message(message, budget), "finish_reason": reason or ""})
    if outputs:
        answer.output = orjson.dumps(outputs).decode()


def _read_stream(raw: bytes, answer: Answer, output_bytes: int | None) -> None:
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    for line in raw.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(chunk, dict):
            continue
        answer.model = answer.model or _text(chunk.get("model"))
        answer.id = answer.id or _text(chunk.get("id"))
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            if not isinstance(index, int):
                index = 0
            reason = _text(choice.get("finish_reason"))
            if reason:
                reasons[index] = reason
            delta = choice.get("delta")
            if (
                output_bytes is not None
                and isinstance(delta, dict)
                and isinstance(delta.get("content"), str)
            ):
                texts.setdefault(index, []).append(delta["content"])
    answer.finish_reasons = [reasons[i] for i in sorted(reasons)]
    if output_bytes is not None and (texts or reasons):
        budget = Budget(output_bytes)
        answer.output = orjson.dumps(
            [
                {
                    "role": "assistant",
                    "parts": [{"type": "text", "content": budget.take("".join(texts.get(i, [])))}],
                    "finish_reason": reasons.get(i, ""),
                }
                for i in sorted(set(texts) | set(reasons))
            ]
        ).decode()


def input_messages(body: dict[str, Any], limit: int) -> str | None:
    """gen_ai.input.messages of a chat request (or an embeddings request's input), its
    text cut at `limit` bytes."""
    budget = Budget(limit)
    messages = body.get("messages")
    if isinstance(messages, list):
        return orjson.dumps([_message(m, budget) for m in messages if isinstance(m, dict)]).decode()
    data = body.get("input")
    if data is None:
        return None
    texts = data if isinstance(data, list) else [data]
    parts = [{"type": "text", "content": budget.take(t)} for t in texts if isinstance(t, str)]
    return orjson.dumps([{"role": "user", "parts": parts}]).decode()


def _message(message: dict[str, Any], budget: Budget) -> dict[str, Any]:
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
    return {"role": _text(message.get("role")) or "user", "parts": parts}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
