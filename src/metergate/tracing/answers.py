"""What a span says about an answer: its model, id and finish reasons, and, only with
`capture_content`, its text (`gen_ai.output.messages`).

The answer is read as the upstream sent it, in whichever shape the gateway relayed:
an OpenAI chat completion (every translated answer is one), an Anthropic message (a
Messages request passed through to Anthropic) or an OpenAI response (a Responses request
passed through to an upstream that speaks it); a JSON body, or as much of an SSE stream
as was kept (its first chunk, or all of it when content is captured). Finish reasons
are given in OpenAI's words whatever the shape (`end_turn` is `stop`, `max_tokens` is
`length`), so one query covers every door and provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from metergate.errors import GatewayError
from metergate.providers import anthropic_translate, responses_bridge
from metergate.tracing.content import Budget, message_parts, nonempty


@dataclass(slots=True)
class Answer:
    model: str | None = None
    id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output: str | None = None  # gen_ai.output.messages, when content is captured


def read_answer(raw: bytes | None, output_bytes: int | None) -> Answer:
    """Read an answer; with `output_bytes`, its text goes in `output`, cut at that many
    bytes."""
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
    _Stream(answer, output_bytes).read(raw)
    return answer


def _read_body(data: dict[str, Any], answer: Answer, output_bytes: int | None) -> None:
    answer.model = nonempty(data.get("model"))
    answer.id = nonempty(data.get("id"))
    chat = _as_chat(data)
    outputs = []
    budget = Budget(output_bytes or 0)
    for choice in chat.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        reason = nonempty(choice.get("finish_reason"))
        if reason:
            answer.finish_reasons.append(reason)
        message = choice.get("message")
        if output_bytes is not None and isinstance(message, dict):
            outputs.append({**message_parts(message, budget), "finish_reason": reason or ""})
    if outputs:
        answer.output = orjson.dumps(outputs).decode()


def _as_chat(data: dict[str, Any]) -> dict[str, Any]:
    """A passed-through answer in chat terms, by the translations the doors use."""
    try:
        if data.get("type") == "message":
            return orjson.loads(anthropic_translate.from_message(data, "").body)
        if data.get("object") == "response":
            return orjson.loads(responses_bridge.from_response(data, "").body)
    except (GatewayError, AttributeError, TypeError, ValueError):  # a shape it cannot read
        return {}
    return data


class _Stream:
    """The events of a stream, in any of the three shapes, read for one span."""

    def __init__(self, answer: Answer, output_bytes: int | None) -> None:
        self.answer = answer
        self.output_bytes = output_bytes
        self.texts: dict[int, list[str]] = {}  # choice index -> text deltas
        self.reasons: dict[int, str] = {}

    def read(self, raw: bytes) -> None:
        for line in raw.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload.startswith(b"{"):
                continue
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._event(event)
        self.answer.finish_reasons = [self.reasons[i] for i in sorted(self.reasons)]
        if self.output_bytes is not None and (self.texts or self.reasons):
            budget = Budget(self.output_bytes)
            indexes = sorted(set(self.texts) | set(self.reasons))
            self.answer.output = orjson.dumps(
                [
                    {
                        "role": "assistant",
                        "parts": [
                            {"type": "text", "content": budget.take("".join(self.texts.get(i, [])))}
                        ],
                        "finish_reason": self.reasons.get(i, ""),
                    }
                    for i in indexes
                ]
            ).decode()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if not isinstance(kind, str):
            self._chat_chunk(event)
        elif kind == "message_start":  # Anthropic
            self._names(event.get("message"))
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                self._text(0, delta.get("text"))
        elif kind == "message_delta":
            delta = event.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if isinstance(reason, str) and reason:
                self.reasons[0] = anthropic_translate.finish_reason(reason)
        elif kind == "response.created":  # OpenAI Responses
            self._names(event.get("response"))
        elif kind == "response.output_text.delta":
            self._text(0, event.get("delta"))
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response")
            if isinstance(response, dict):
                self._names(response)
                called = any(
                    isinstance(item, dict) and item.get("type") == "function_call"
                    for item in response.get("output") or ()
                )
                self.reasons[0] = responses_bridge.finish_reason(response, called)

    def _chat_chunk(self, chunk: dict[str, Any]) -> None:
        self._names(chunk)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index")
            if not isinstance(index, int):
                index = 0
            reason = nonempty(choice.get("finish_reason"))
            if reason:
                self.reasons[index] = reason
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._text(index, delta.get("content"))

    def _names(self, holder: Any) -> None:
        if isinstance(holder, dict):
            self.answer.model = self.answer.model or nonempty(holder.get("model"))
            self.answer.id = self.answer.id or nonempty(holder.get("id"))

    def _text(self, index: int, delta: Any) -> None:
        if self.output_bytes is not None and isinstance(delta, str):
            self.texts.setdefault(index, []).append(delta)
