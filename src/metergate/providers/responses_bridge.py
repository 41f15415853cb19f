"""Chat completions served by an upstream's Responses API (`chat_via: responses`).

Some upstreams serve no chat completions: Perplexity's Agent API (its Sonar chat API was
retired on 2026-09-27) and OpenAI's Responses-only models. For them a chat request is
translated to a Responses request, and the answer (whole, or its stream of semantic
events) back to a chat completion, so every chat client works unchanged. The Responses
door still passes through as it is (`native_protocols`).

What the translation does, as a caller sees it:

* system and developer messages become `system` input items; user content parts
  `input_text` and `input_image`; assistant tool calls `function_call` items and tool
  messages `function_call_output` items; function tools are flattened to the Responses
  shape, `tool_choice` likewise;
* `store` is false unless the caller set it (chat completions are not stored by
  default; Responses are);
* `max_completion_tokens` (or `max_tokens`) is `max_output_tokens`, `reasoning_effort`
  is `reasoning.effort`, `response_format` is `text.format` (Perplexity takes it as
  `response_format`, as sent); other fields pass through untouched, except that
  Perplexity gets none of OpenAI's sampling and bookkeeping knobs (`temperature`,
  `top_p`, `user`, `metadata`, `store`, ...), which its schema lacks and refuses; a
  Perplexity deployment whose model is `preset:NAME` sends `preset: NAME` instead;
* what the Responses API cannot do is refused with a 400 that names the field: `n` > 1,
  `stop`, `logprobs`, `logit_bias`, penalties, `seed`, audio;
* the answer's text, refusal and function calls make the chat message; `incomplete`
  for `max_output_tokens` is finish reason `length`; Perplexity's search results come
  back as `search_results` and `citations` (their URLs), as its Sonar API sent them;
* the usage's cost, when the upstream states one (Perplexity's `usage.cost.total_cost`:
  tokens, request and tool fees), is what the request costs (`Usage.billed_nano`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from metergate.config.model import ProviderConfig
from metergate.errors import UpstreamProtocolError, UpstreamServerError
from metergate.providers.base import Completion, StreamState, UpstreamCall
from metergate.providers.openai import OpenAIAdapter
from metergate.providers.openai_native import responses_usage
from metergate.providers.responses_request import to_responses_request
from metergate.providers.restream import responses_events
from metergate.providers.sse import Event, chunk_event
from metergate.providers.translation import (
    ChunkWriter,
    HoldsOpening,
    assistant_message,
    load_answer,
    load_json,
    relay,
)

_NOT_PERPLEXITY = (
    "temperature",
    "top_p",
    "user",
    "metadata",
    "store",
    "parallel_tool_calls",
    "service_tier",
)


class ResponsesBridgeAdapter(OpenAIAdapter):
    """An OpenAI-format upstream whose chat requests go to its Responses API."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.responses_url = f"{self.base}/responses"
        self.perplexity = config.preset == "perplexity"
        # Perplexity's Agent API takes `response_format` as chat sends it.
        self.format_field = "response_format" if self.perplexity else "text"

    def request(self, call: UpstreamCall) -> dict[str, Any]:
        request = to_responses_request(call.body, call.model, self.format_field)
        if self.perplexity:
            # Its request schema has none of OpenAI's sampling and bookkeeping knobs, and
            # refuses unknown fields: chat clients send them by default, so they are left
            # out. A deployment model `preset:NAME` names one of its presets.
            for name in _NOT_PERPLEXITY:
                request.pop(name, None)
            if call.model.startswith("preset:"):
                request["preset"] = call.model.removeprefix("preset:")
                del request["model"]
        return request

    async def chat(self, call: UpstreamCall) -> Completion:
        if call.native is not None:
            return await super().chat(call)
        request = self.request(call)
        answer = await self.transport.post(
            self.responses_url, request, call.timeouts, call.extra_headers
        )
        return from_response(load_answer(answer, "Responses answer", "output"), call.model)

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        if call.native is not None:
            return super().chat_stream(call, state)
        request = self.request(call)
        request["stream"] = True
        opening = self.transport.open_stream(
            self.responses_url, request, call.timeouts, call.extra_headers
        )
        return relay(self.transport, opening, StreamTranslator(call, state))


# -- answer ------------------------------------------------------------------------------


def from_response(data: dict[str, Any], model: str) -> Completion:
    """A whole Responses answer as a chat completion."""
    if data.get("status") == "failed":
        raise UpstreamServerError(f"upstream response failed: {_error_text(data.get('error'))}")
    read = _Output()
    for item in data.get("output") or []:
        read.item(item)
    message = assistant_message(read.text, read.tool_calls)
    if read.refusal:
        message["refusal"] = read.refusal
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": finish_reason(data, bool(read.tool_calls)),
        "logprobs": None,
    }
    raw_usage = data.get("usage")
    usage = responses_usage(raw_usage).served_on(data)
    body: dict[str, Any] = {
        "id": "chatcmpl-" + str(data.get("id") or "responses"),
        "object": "chat.completion",
        "created": data.get("created_at") or 0,
        "model": data.get("model") or model,
        "choices": [choice],
        "usage": usage.to_openai() if raw_usage else None,
        **read.sources(),
    }
    return Completion(orjson.dumps(body), usage, reported=bool(raw_usage))


def finish_reason(response: dict[str, Any], called: bool) -> str:
    if called:
        return "tool_calls"
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "stop"


def _error_text(error: Any) -> str:
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or "no reason given")[:500]


class _Output:
    """What the output items of an answer hold, in chat terms."""

    def __init__(self) -> None:
        self.text = ""
        self.refusal = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.results: list[Any] = []

    def item(self, item: Any) -> None:
        if not isinstance(item, dict):
            return
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    self.text += str(part.get("text") or "")
                elif isinstance(part, dict) and part.get("type") == "refusal":
                    self.refusal += str(part.get("refusal") or "")
        elif kind == "function_call":
            self.tool_calls.append(tool_call(item))
        elif kind == "search_results":
            self.results += [r for r in item.get("results") or [] if isinstance(r, dict)]

    def sources(self) -> dict[str, Any]:
        """Perplexity's search results and their URLs, as its Sonar answers had them."""
        if not self.results:
            return {}
        urls = [r["url"] for r in self.results if isinstance(r.get("url"), str)]
        return {"citations": list(dict.fromkeys(urls)), "search_results": self.results}


def tool_call(item: dict[str, Any]) -> dict[str, Any]:
    arguments = item.get("arguments")
    return {
        "id": item.get("call_id") or item.get("id"),
        "type": "function",
        "function": {
            "name": item.get("name"),
            "arguments": arguments
            if isinstance(arguments, str)
            else orjson.dumps(arguments or {}).decode(),
        },
    }


# -- stream ------------------------------------------------------------------------------

# Events that end a stream, and those of them that mean it failed.
_TERMINAL = frozenset({"response.completed", "response.incomplete"})
_FAILED = frozenset({"response.failed", "error"})


class StreamTranslator(HoldsOpening):
    """Responses stream events -> chat chunks. Text and refusal deltas and function calls
    (streamed in pieces, as OpenAI does, or whole, as Perplexity does) are relayed as
    they arrive; reasoning and search progress events have no chat counterpart."""

    def __init__(self, call: UpstreamCall, state: StreamState) -> None:
        self.call = call
        self.state = state
        self.writer: ChunkWriter | None = None
        self.calls: dict[str, int] = {}  # function call item id -> its tool call index
        self.streamed: set[str] = set()  # function calls whose arguments came in deltas
        self.output = _Output()
        self.done = False

    def feed(self, event: Event) -> bytes:
        if not event.data:
            return b""
        data = load_json(event.data, "stream event")
        kind = data.get("type") or event.name
        if kind in _FAILED:
            failure = (data.get("response") or {}).get("error") or data.get("error") or data
            raise UpstreamServerError(f"upstream stream error: {_error_text(failure)}")
        writer = self._writer(data)
        if kind == "response.created":  # held until the first output (`HoldsOpening`)
            return self.hold(writer.delta({"role": "assistant", "content": ""}))
        if kind == "response.in_progress":
            return b""
        if self.held:
            return self.release(self._event(kind, data, writer))
        return self._event(kind, data, writer)

    def _event(self, kind: str, data: dict[str, Any], writer: ChunkWriter) -> bytes:
        if kind == "response.output_text.delta":
            return writer.delta({"content": str(data.get("delta") or "")})
        if kind == "response.refusal.delta":
            return writer.delta({"refusal": str(data.get("delta") or "")})
        if kind == "response.function_call_arguments.delta":
            index = self.calls.get(str(data.get("item_id")))
            if index is None:
                return b""
            self.streamed.add(str(data.get("item_id")))
            return writer.delta(
                {
                    "tool_calls": [
                        {"index": index, "function": {"arguments": str(data.get("delta") or "")}}
                    ]
                }
            )
        if kind in ("response.output_item.added", "response.output_item.done"):
            return self._item(writer, data.get("item"), done=kind.endswith("done"))
        if kind in _TERMINAL:
            return self._end(writer, data.get("response") or {})
        return b""

    def _writer(self, data: dict[str, Any]) -> ChunkWriter:
        if self.writer is None:
            response = data.get("response") or {}
            response_id = "chatcmpl-" + str(response.get("id") or "responses")
            self.writer = ChunkWriter(response_id, response.get("model") or self.call.model)
        return self.writer

    def _item(self, writer: ChunkWriter, item: Any, done: bool) -> bytes:
        if not isinstance(item, dict):
            return b""
        if item.get("type") == "search_results" and done:
            self.output.item(item)
            return b""
        if item.get("type") != "function_call":
            return b""
        item_id = str(item.get("id") or item.get("call_id"))
        call = tool_call(item)
        arguments = call["function"]["arguments"] if item.get("arguments") else ""
        if item_id not in self.calls:  # announced: its id, name and arguments so far
            index = self.calls[item_id] = len(self.calls)
            call["function"]["arguments"] = arguments
            if arguments:
                self.streamed.add(item_id)
            return writer.delta({"tool_calls": [{"index": index, **call}]})
        if done and arguments and item_id not in self.streamed:
            self.streamed.add(item_id)  # whole at the end: no deltas came
            index = self.calls[item_id]
            return writer.delta(
                {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
            )
        return b""

    def _end(self, writer: ChunkWriter, response: dict[str, Any]) -> bytes:
        self.done = True
        if response.get("usage"):
            self.state.usage = responses_usage(response["usage"]).served_on(response)
        if not self.output.results:  # not announced item by item: read from the response
            for item in response.get("output") or []:
                if isinstance(item, dict) and item.get("type") == "search_results":
                    self.output.item(item)
        reason = finish_reason(response, bool(self.calls))
        self.state.finish_reason = reason
        choice = {"index": 0, "delta": {}, "finish_reason": reason, "logprobs": None}
        return chunk_event({**writer.base, "choices": [choice], **self.output.sources()})

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        return responses_events(answer)

    def finish(self) -> bytes:
        if not self.done or self.writer is None:
            raise UpstreamProtocolError("the upstream stream ended before response.completed")
        return self.writer.end(self.state.usage, self.call.include_usage)
