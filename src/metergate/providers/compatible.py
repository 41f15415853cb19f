"""OpenAI-compatible services by preset (`type: openai`, `preset: NAME`), with their quirks.

The preset's base URL, key and price list are filled in by the config
(`config.presets`); here the answers are read the way each service really writes them,
so that usage and cost come out exact:

* cached prompt tokens in DeepSeek's own `prompt_cache_hit_tokens` (when the OpenAI
  `prompt_tokens_details.cached_tokens` is absent); `reasoning_content` in DeepSeek's
  messages and deltas is relayed untouched, its tokens are already in `completion_tokens`;
* reasoning tokens left out of `completion_tokens` (xAI's Grok reports them apart):
  told by `total_tokens` = prompt + completion + reasoning, and added to the output;
* Groq's older stream usage under `x_groq.usage`;
* Mistral takes `max_tokens`, not `max_completion_tokens`, and no `stream_options`
  (it always sends usage with the last chunk);
* a stream that ends cleanly after its finish reason but without `data: [DONE]` (some
  services omit it) is complete: the gateway adds the `[DONE]`.

Where a quirk changes the usage, the usage in the answer is rewritten too, so the caller,
the cost header and the ledger agree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from metergate.config.model import ProviderConfig
from metergate.errors import UpstreamProtocolError
from metergate.providers.base import Completion, StreamState, UpstreamCall, Usage
from metergate.providers.openai import OpenAIAdapter, _PassThrough
from metergate.providers.sse import DONE, Event, chunk_event
from metergate.providers.translation import load_answer, load_json, relay

_NO_STREAM_OPTIONS = frozenset({"mistral"})
_MAX_TOKENS_ONLY = frozenset({"mistral"})


class PresetAdapter(OpenAIAdapter):
    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        self.preset = config.preset or ""

    def payload(self, call: UpstreamCall, stream: bool) -> dict[str, Any]:
        body = {**call.body, "model": call.model}
        if self.preset in _MAX_TOKENS_ONLY and "max_completion_tokens" in body:
            body["max_tokens"] = body.pop("max_completion_tokens")
        if not stream:
            return body
        body["stream"] = True
        if self.preset in _NO_STREAM_OPTIONS:
            body.pop("stream_options", None)
        else:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    async def chat(self, call: UpstreamCall) -> Completion:
        answer = await self.transport.post(
            self.chat_url, self.payload(call, False), call.timeouts, call.extra_headers
        )
        data = load_answer(answer, "chat completion", "choices")
        usage, fixed = normalized(data.get("usage"))
        if fixed is not None:
            answer = orjson.dumps({**data, "usage": fixed})
        return Completion(answer, usage, reported=bool(data.get("usage")))

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        payload = self.payload(call, True)
        opening = self.transport.open_stream(
            self.chat_url, payload, call.timeouts, call.extra_headers
        )
        return relay(self.transport, opening, _Relay(call.include_usage, state))


def normalized(raw: Any) -> tuple[Usage, dict[str, Any] | None]:
    """The usage of an OpenAI-style `usage` object as this service means it, and the
    rewritten object when it had to be changed (None when it is fine as it is)."""
    if not isinstance(raw, dict):
        return Usage(), None
    fixed = dict(raw)
    details = dict(raw.get("prompt_tokens_details") or {})
    hits = raw.get("prompt_cache_hit_tokens")
    if not details.get("cached_tokens") and isinstance(hits, int) and hits:
        fixed["prompt_tokens_details"] = {**details, "cached_tokens": hits}
    prompt = raw.get("prompt_tokens") or 0
    completion = raw.get("completion_tokens") or 0
    reasoning = (raw.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    if reasoning and raw.get("total_tokens") == prompt + completion + reasoning:
        fixed["completion_tokens"] = completion + reasoning
    if fixed == raw:
        return Usage.from_openai(raw), None
    return Usage.from_openai(fixed), fixed


class _Relay(_PassThrough):
    """Relays the service's chunks, reading (and where needed fixing) usage."""

    def __init__(self, include_usage: bool, state: StreamState) -> None:
        super().__init__(include_usage, state)
        self.finished = False

    def feed(self, event: Event) -> bytes:
        data = event.data
        control = self.control(data)
        if control is not None:
            return control
        # find(), not `in`, per chunk (see openai._PassThrough.feed)
        if data.find(b'"finish_reason":"') >= 0 or data.find(b'"finish_reason": "') >= 0:
            self.finished = True
        if data.find(b'"usage"') < 0:
            return event.raw
        chunk = load_json(data, "stream chunk")
        raw = chunk.get("usage") or (chunk.get("x_groq") or {}).get("usage")
        if not raw:
            return event.raw
        self.state.usage, fixed = normalized(raw)
        self.state.usage.served_on(chunk)
        if not chunk.get("choices") and not self.include_usage:
            return b""
        if fixed is not None and chunk.get("usage"):
            return chunk_event({**chunk, "usage": fixed})
        return event.raw

    def finish(self) -> bytes:
        if self.done:
            return b""
        self.require_events()
        if self.finished:
            return DONE
        raise UpstreamProtocolError("the upstream stream ended before its finish reason")
