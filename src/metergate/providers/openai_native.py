"""OpenAI's Responses and legacy completions APIs served as they are, for upstreams that
have them (`providers.*.apis`): the pass-through of the `/v1/responses` and
`/v1/completions` doors.

The body goes upstream untouched but for the deployment's model id (and, on streams,
`stream_options.include_usage` for legacy completions, as for chat); the answer comes
back byte for byte. Only usage is read on the way.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from decimal import Decimal
from typing import Any

from metergate.errors import UpstreamProtocolError, UpstreamServerError
from metergate.providers.base import (
    Completion,
    StreamState,
    UpstreamCall,
    Usage,
    reported_part,
    token_count,
)
from metergate.providers.http import HttpTransport
from metergate.providers.restream import responses_events
from metergate.providers.sse import Event
from metergate.providers.translation import (
    EventTranslator,
    HoldsOpening,
    load_answer,
    load_json,
    relay,
)

# The events that end a Responses stream, and those of them that mean it failed.
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
# The events that open a Responses stream before any output: held (`HoldsOpening`).
_OPENING = frozenset({"response.created", "response.in_progress"})


def responses_usage(usage: dict[str, Any] | None) -> Usage:
    """Responses usage: `input_tokens` includes the cached ones (OpenAI's `cached_tokens`,
    Perplexity's `cache_read_input_tokens`) and those written to the cache, each priced
    apart here; and the cost the upstream
    states, if any (Perplexity's `cost.total_cost`: tokens, request and tool fees)."""
    usage = usage or {}
    details = usage.get("input_tokens_details")
    total = token_count(usage, "input_tokens")
    cached = token_count(details, "cached_tokens") or token_count(
        details, "cache_read_input_tokens"
    )
    cached = min(total, cached)
    found = Usage(total - cached, cached, token_count(usage, "output_tokens"))
    # Writes to the prompt cache (GPT-5.6 on), of the uncached input, priced apart.
    found.cache_write_tokens = min(found.input_tokens, token_count(details, "cache_write_tokens"))
    output = usage.get("output_tokens_details")
    if isinstance(output, dict):
        found.reasoning_tokens = reported_part(output, "reasoning_tokens", found.output_tokens)
    found.billed_nano = _billed_nano(usage.get("cost"))
    return found


def _billed_nano(cost: Any) -> int | None:
    """A stated total cost in nano-USD; None when there is none (or not in USD)."""
    if not isinstance(cost, dict) or cost.get("currency", "USD") != "USD":
        return None
    total = cost.get("total_cost")
    if isinstance(total, bool) or not isinstance(total, int | float) or not math.isfinite(total):
        return None
    if total < 0:
        raise UpstreamProtocolError(f"the upstream stated a negative cost ({total!r})")
    return int((Decimal(str(total)) * 1_000_000_000).to_integral_value())


def web_search_calls(output: Any) -> int:
    """The built-in web search tool's calls in a Responses answer's output items, each
    billed per call (the upstream's `web_search` price) on top of the tokens."""
    if output.__class__ is not list:
        return 0
    return sum(
        1 for item in output if item.__class__ is dict and item.get("type") == "web_search_call"
    )


async def answer(transport: HttpTransport, base: str, call: UpstreamCall) -> Completion:
    native = call.native
    assert native is not None
    body = await transport.post(
        f"{base}/{native.protocol}",
        {**native.body, "model": call.model},
        call.timeouts,
        call.extra_headers,
    )
    answer_field = "output" if native.protocol == "responses" else "choices"
    data = load_answer(body, f"{native.protocol} answer", answer_field)
    usage = data.get("usage")
    reported = bool(usage)  # some compatible servers send none: the gateway estimates
    if native.protocol == "responses":
        found = responses_usage(usage).served_on(data)
        found.web_searches = web_search_calls(data.get("output"))
        return Completion(body, found, reported)
    return Completion(body, Usage.from_openai(usage).served_on(data), reported)


def stream(
    transport: HttpTransport,
    base: str,
    call: UpstreamCall,
    state: StreamState,
    completions_relay: EventTranslator,
) -> AsyncGenerator[bytes, None]:
    """`completions_relay`: the chat pass-through's, whose SSE framing legacy shares."""
    native = call.native
    assert native is not None
    payload = {**native.body, "model": call.model, "stream": True}
    translator = completions_relay
    if native.protocol == "responses":
        translator = _ResponsesRelay(state)
    else:
        options = {**(native.body.get("stream_options") or {}), "include_usage": True}
        payload["stream_options"] = options
    opening = transport.open_stream(
        f"{base}/{native.protocol}", payload, call.timeouts, call.extra_headers
    )
    return relay(transport, opening, translator)


class _ResponsesRelay(HoldsOpening):
    """Passes Responses events on as received, but `response.created` and
    `response.in_progress` wait for the next one (`HoldsOpening`); reads usage from the
    terminal event."""

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.done = False

    def feed(self, event: Event) -> bytes:
        name = event.name
        if name in TERMINAL or (not name and event.data):
            data = load_json(event.data, "stream event")
            name = data.get("type") or name
            if name in ("error", "response.failed"):
                failure = (data.get("response") or {}).get("error") or data
                message = failure.get("message") if isinstance(failure, dict) else None
                raise UpstreamServerError(f"upstream stream error: {message or 'it failed'}")
            if name in TERMINAL:
                self.done = self.state.ended = True
                response = data.get("response") or {}
                usage = response.get("usage")
                if usage:  # else it stays unknown, and the relayed text is billed
                    self.state.usage = responses_usage(usage).served_on(response)
                    self.state.usage.web_searches = web_search_calls(response.get("output"))
        if name in _OPENING:
            return self.hold(event.raw)
        if self.held:
            return self.release(event.raw)
        return event.raw

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        return responses_events(answer)

    def finish(self) -> bytes:
        if not self.done:
            raise UpstreamProtocolError("the upstream stream ended before response.completed")
        return b""
