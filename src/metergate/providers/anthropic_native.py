"""Anthropic Messages requests served as they are: the `/v1/messages` door's pass-through.

A caller speaking the Messages API to an Anthropic upstream loses nothing: the body goes
upstream untouched but for the deployment's model id (system blocks, `cache_control`,
thinking blocks and their signatures, tools, images, documents, `stop_sequences`,
`metadata`, fields added after this was written), with the caller's `anthropic-beta`
header, and the answer, streamed or not, comes back byte for byte. Only usage is read
on the way, from the answer or from `message_start` / `message_delta`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from metergate.errors import (
    InvalidRequest,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamServerError,
)
from metergate.providers.anthropic_translate import usage_of
from metergate.providers.base import Completion, StreamState, UpstreamCall
from metergate.providers.http import HttpTransport, error_message
from metergate.providers.restream import anthropic_events
from metergate.providers.sse import Event
from metergate.providers.translation import HoldsOpening, load_answer, load_json, relay

FORWARDED_HEADERS = ("anthropic-beta",)  # the caller's, sent upstream as they came


def own_headers(call: UpstreamCall) -> bytes:
    """This request's own header lines: the caller's forwarded ones, and trace context."""
    assert call.native is not None
    headers = call.native.headers
    if any(c in name + value for name, value in headers.items() for c in "\r\n"):
        raise InvalidRequest("a forwarded header (anthropic-beta) contains a line break")
    forwarded = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return forwarded.encode("latin-1", "replace") + call.extra_headers


def payload(call: UpstreamCall) -> dict[str, Any]:
    assert call.native is not None
    return {**call.native.body, "model": call.model}


async def message(transport: HttpTransport, url: str, call: UpstreamCall) -> Completion:
    assert call.native is not None
    answer = await transport.post(url, payload(call), call.timeouts, own_headers(call))
    usage = load_answer(answer, "Messages API answer", "content").get("usage")
    return Completion(answer, usage_of(usage), reported=bool(usage))


def message_stream(
    transport: HttpTransport, url: str, call: UpstreamCall, state: StreamState
) -> AsyncGenerator[bytes, None]:
    assert call.native is not None
    body = {**payload(call), "stream": True}
    opening = transport.open_stream(url, body, call.timeouts, own_headers(call))
    return relay(transport, opening, _Relay(state))


async def count_tokens(transport: HttpTransport, url: str, call: UpstreamCall) -> bytes:
    """The upstream's own count (`POST /v1/messages/count_tokens`), as it answered, once
    it is seen to be a count: anything else is the upstream's fault, not the caller's
    JSON to fail to parse."""
    assert call.native is not None
    answer = await transport.post(url, payload(call), call.timeouts, own_headers(call))
    counted = load_json(answer, "token count").get("input_tokens")
    if type(counted) is not int or counted < 0:
        raise UpstreamProtocolError("the upstream's token count has no `input_tokens` count")
    return answer


class _Relay(HoldsOpening):
    """Passes every event on as received, but `message_start` waits for the next one
    but a ping (`HoldsOpening`); reads usage, and insists on `message_stop`."""

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.raw_usage: dict[str, Any] = {}
        self.done = False

    def feed(self, event: Event) -> bytes:
        name = event.name
        if name in ("message_start", "message_delta", "error") or (not name and event.data):
            data = load_json(event.data, "stream event")
            name = data.get("type") or name
            if name == "error":
                raise stream_failure(data, event.data, as_told=True)
            usage = (data.get("message") or {}).get("usage") or data.get("usage")
            if usage:
                self.raw_usage.update({k: v for k, v in usage.items() if v is not None})
                self.state.usage = usage_of(self.raw_usage)
            if name == "message_start":
                return self.hold(event.raw)
        if name == "message_stop":
            self.done = self.state.ended = True
        if self.held:  # a ping stays behind the opening it follows
            return self.hold(event.raw) if name == "ping" else self.release(event.raw)
        return event.raw

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        return anthropic_events(answer)

    def finish(self) -> bytes:
        if not self.done:
            raise UpstreamProtocolError("the upstream stream ended before message_stop")
        return b""


def stream_failure(data: dict[str, Any], raw: bytes, as_told: bool = False) -> UpstreamFailure:
    """A Messages stream's `error` event, classed as the same error answered with its
    HTTP status would be: `overloaded_error` as a 529 (which the Messages door keeps),
    `rate_limit_error` as a rate limit (429), anything else as a server error.
    `as_told`: the error keeps Anthropic's type, for the door that speaks it."""
    error = data.get("error")
    kind = str((error.get("type") if type(error) is dict else None) or "api_error")
    message = f"upstream stream error: {error_message(raw)}"
    if kind == "rate_limit_error":
        return UpstreamRateLimited(message, upstream_status=429)
    told = kind if as_told else None
    if kind == "overloaded_error":
        return UpstreamServerError(message, upstream_status=529, error_type=told)
    return UpstreamServerError(message, error_type=told)
