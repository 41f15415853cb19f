"""Anthropic's Messages API behind the OpenAI chat format.

Requests are translated in `anthropic_translate`; this module holds the adapter and the
stream translation. Behaviour callers may notice:

* `max_tokens` is mandatory for Anthropic, so 4096 is sent when the caller set neither
  `max_tokens` nor `max_completion_tokens`.
* `response_format` (json_object / json_schema) is best effort: the Messages API has no
  JSON mode, so an instruction to reply with JSON (quoting the schema) is appended to the
  system prompt. The reply is usually valid JSON but, unlike OpenAI's strict mode, that is
  not guaranteed. (Anthropic's structured-output beta was not used: it needs a beta
  header and supports only some models; operators can still add it via `headers`.)
* `n` > 1 is rejected with a 400: Anthropic returns one answer per request.
* Thinking blocks are dropped: OpenAI's chat format has no place for them.
* Usage: cache writes count as input tokens, priced at the cache-write rate; cache reads
  as cached input tokens.

Requests that came in by the `/v1/messages` door are not translated at all: they pass
through as they are (`anthropic_native`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from metergate.config.model import ProviderConfig
from metergate.errors import UpstreamProtocolError
from metergate.providers import anthropic_native
from metergate.providers.anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    finish_reason,
    from_message,
    to_messages_request,
    usage_of,
)
from metergate.providers.base import Completion, StreamState, UpstreamCall
from metergate.providers.http import HttpAdapter, HttpTransport
from metergate.providers.restream import anthropic_events
from metergate.providers.sse import Event
from metergate.providers.translation import (
    ChunkWriter,
    HoldsOpening,
    load_answer,
    load_json,
    max_output_tokens,
    relay,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"


class AnthropicAdapter(HttpAdapter):
    native_protocols = frozenset({"messages"})

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        headers = {"anthropic-version": API_VERSION}
        if config.api_key is not None:
            headers["x-api-key"] = config.api_key.get_secret_value()
        base = config.base_url or DEFAULT_BASE_URL
        self.transport = HttpTransport(config, headers, base)
        self.url = f"{base}/v1/messages"

    async def chat(self, call: UpstreamCall) -> Completion:
        if call.native is not None:
            return await anthropic_native.message(self.transport, self.url, call)
        answer = await self.transport.post(
            self.url, to_messages_request(call.body, call.model), call.timeouts, call.extra_headers
        )
        return from_message(load_answer(answer, "Messages API answer", "content"), call.model)

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        if call.native is not None:
            return anthropic_native.message_stream(self.transport, self.url, call, state)
        payload = {**to_messages_request(call.body, call.model), "stream": True}
        opening = self.transport.open_stream(self.url, payload, call.timeouts, call.extra_headers)
        return relay(self.transport, opening, _StreamTranslator(call, state))

    async def count_tokens(self, call: UpstreamCall) -> bytes:
        """Anthropic's own count of the input tokens of `call.native` (free of charge)."""
        return await anthropic_native.count_tokens(self.transport, f"{self.url}/count_tokens", call)


class _StreamTranslator(HoldsOpening):
    """Anthropic stream events -> OpenAI chunks; keeps `state` up to date as usage arrives."""

    def __init__(self, call: UpstreamCall, state: StreamState) -> None:
        self.call = call
        self.state = state
        self.writer: ChunkWriter | None = None
        self.raw_usage: dict[str, Any] = {}
        self.tool_index: dict[int, int] = {}  # Anthropic content block index -> OpenAI index
        self.silent: set[int] = set()  # tool use blocks no argument text has come for yet
        self.stop_reason: str | None = None
        self.done = False
        if max_output_tokens(call.body) is None:  # the request went with the default
            state.output_limit = DEFAULT_MAX_TOKENS

    def feed(self, event: Event) -> bytes:
        if not event.data:
            return b""
        data = load_json(event.data, "stream event")
        kind = data.get("type") or event.name
        if kind == "error":
            raise anthropic_native.stream_failure(data, event.data)
        if kind == "message_start":
            message = data.get("message") or {}
            self.writer = ChunkWriter(
                message.get("id") or "", message.get("model") or self.call.model
            )
            self._add_usage(message.get("usage"))
            return self.hold(self.writer.delta({"role": "assistant", "content": ""}))
        if self.held and kind != "ping":
            return self.release(self._event(kind, data))
        return self._event(kind, data)

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        if kind == "content_block_start":
            return self._block_start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(data.get("index", 0), data.get("delta") or {})
        if kind == "message_delta":
            self.stop_reason = (data.get("delta") or {}).get("stop_reason") or self.stop_reason
            self._add_usage(data.get("usage"))
        elif kind == "message_stop":
            return self._stop()
        elif kind == "content_block_stop":
            return self._block_stop(data.get("index", 0))
        return b""  # ping, and event types added after this was written

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        return anthropic_events(answer)

    def finish(self) -> bytes:
        if not self.done:
            raise UpstreamProtocolError("the upstream stream ended before message_stop")
        return b""

    def _block_start(self, index: int, block: dict[str, Any]) -> bytes:
        if block.get("type") == "tool_use":
            position = self.tool_index[index] = len(self.tool_index)
            self.silent.add(index)
            return self._writer().delta(
                {
                    "tool_calls": [
                        {
                            "index": position,
                            "id": block.get("id"),
                            "type": "function",
                            "function": {"name": block.get("name"), "arguments": ""},
                        }
                    ]
                }
            )
        if block.get("type") == "text" and block.get("text"):
            return self._writer().delta({"content": block["text"]})
        return b""

    def _block_delta(self, index: int, delta: dict[str, Any]) -> bytes:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return self._writer().delta({"content": delta["text"]})
        if kind == "input_json_delta" and delta.get("partial_json") and index in self.tool_index:
            self.silent.discard(index)
            return self._writer().delta(
                {
                    "tool_calls": [
                        {
                            "index": self.tool_index[index],
                            "function": {"arguments": delta["partial_json"]},
                        }
                    ]
                }
            )
        return b""  # thinking and signature deltas have no OpenAI equivalent

    def _block_stop(self, index: int) -> bytes:
        """A tool call without arguments comes as an empty `partial_json` alone: its
        arguments are `{}`, as in a whole answer, not "" (which no JSON parser reads)."""
        if index not in self.silent:
            return b""
        self.silent.discard(index)
        call = {"index": self.tool_index[index], "function": {"arguments": "{}"}}
        return self._writer().delta({"tool_calls": [call]})

    def _stop(self) -> bytes:
        writer = self._writer()
        self.done = True
        reason = finish_reason(self.stop_reason)
        self.state.finish_reason = reason
        return writer.delta({}, reason) + writer.end(self.state.usage, self.call.include_usage)

    def _add_usage(self, usage: dict[str, Any] | None) -> None:
        """message_start carries input counts, message_delta the (cumulative) output count.
        A stream that reports none (a compatible server's) keeps `state.usage` None, so
        that it is billed as one without usage, not as a report of zero tokens."""
        self.raw_usage.update({k: v for k, v in (usage or {}).items() if v is not None})
        if self.raw_usage:
            self.state.usage = usage_of(self.raw_usage)

    def _writer(self) -> ChunkWriter:
        if self.writer is None:
            raise UpstreamProtocolError("the upstream stream began without message_start")
        return self.writer
