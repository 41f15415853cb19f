"""Any OpenAI-compatible API: OpenAI, DeepSeek, HolySheep, OpenRouter, vLLM, Ollama.

The caller already speaks this format, so requests pass through with only the model id
replaced (unknown fields untouched) and responses pass through byte for byte; the adapter
only reads usage, and asks for it on streams even when the caller did not. Upstreams that
serve the Responses or legacy completions APIs (`apis`) get those doors' requests as
they are too (`openai_native`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from metergate.config.model import ProviderConfig
from metergate.errors import UpstreamProtocolError, UpstreamServerError
from metergate.providers import openai_native
from metergate.providers.assembly import answer_from_stream
from metergate.providers.base import (
    Completion,
    StreamState,
    UpstreamCall,
    Usage,
    tier_of,
)
from metergate.providers.http import HttpAdapter, HttpTransport, error_message, how_it_began
from metergate.providers.sse import DONE, Event, event_object
from metergate.providers.translation import load_answer, relay

log = logging.getLogger("metergate.providers")


class OpenAIAdapter(HttpAdapter):
    supports_embeddings = True

    def __init__(self, name: str, config: ProviderConfig) -> None:
        super().__init__(name, config)
        headers = {}
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        base = config.base_url or ""
        self.transport = HttpTransport(config, headers, base)
        self.base = base
        self.chat_url = f"{base}/chat/completions"
        self.embeddings_url = f"{base}/embeddings"
        self.native_protocols = config.native_apis

    async def chat(self, call: UpstreamCall) -> Completion:
        if call.native is not None:
            return await openai_native.answer(self.transport, self.base, call)
        body = await self.transport.post(
            self.chat_url, {**call.body, "model": call.model}, call.timeouts, call.extra_headers
        )
        return completion_of(body)

    async def embeddings(self, call: UpstreamCall) -> Completion:
        body = await self.transport.post(
            self.embeddings_url,
            {**call.body, "model": call.model},
            call.timeouts,
            call.extra_headers,
        )
        return completion_of(body, "data")

    def chat_stream(self, call: UpstreamCall, state: StreamState) -> AsyncIterator[bytes]:
        if call.native is not None:
            asked = (call.native.body.get("stream_options") or {}).get("include_usage")
            return openai_native.stream(
                self.transport, self.base, call, state, _PassThrough(bool(asked), state)
            )
        options = {**(call.body.get("stream_options") or {}), "include_usage": True}
        payload = {**call.body, "model": call.model, "stream": True, "stream_options": options}
        opening = self.transport.open_stream(
            self.chat_url, payload, call.timeouts, call.extra_headers
        )
        return relay(self.transport, opening, _PassThrough(call.include_usage, state))


class _PassThrough:
    """Relays OpenAI events as they are, reading usage and dropping the usage-only chunk
    when the caller did not ask for it."""

    def __init__(self, include_usage: bool, state: StreamState) -> None:
        self.include_usage = include_usage
        self.state = state
        self.done = False
        self.checked = False  # the first event was read (`control`)

    def control(self, data: bytes) -> bytes | None:
        """The `[DONE]` and error events, alike in every OpenAI-format stream; and the
        first event read, so that a stream that is not JSON fails while a retry is safe
        (later events are relayed without being parsed)."""
        if data == b"[DONE]":
            self.done = True
            return DONE
        # Unescaped, `"error"` is a key or a whole string value, never text the model
        # wrote (its quotes come escaped): the rare event holding it is read.
        if data.find(b'"error"') >= 0:
            failed = stream_failure(data)
            if failed is not None:
                raise failed
        if not self.checked:
            self.state.service_tier = tier_of(event_object(data))
            self.checked = True
        return None

    def require_events(self) -> None:
        """At the end: a stream without a single event is not a stream at all."""
        if not self.checked and not self.done:
            raise UpstreamProtocolError(
                "the upstream answered a streamed request without a single stream event "
                "(a whole JSON answer, say): it did not stream"
            )

    def feed(self, event: Event) -> bytes:
        data = event.data
        # `control` reads the first event, `[DONE]` and the rare event naming an error;
        # a later chunk without one goes straight on (a call less a token).
        if not self.checked or data.find(b'"error"') >= 0 or data == b"[DONE]":
            control = self.control(data)
            if control is not None:
                return control
        # find(), not `in`, on every chunk: bytes' `in` first tries its operand as an
        # integer and formats (then drops) a TypeError for every bytes needle.
        if (
            data.find(b'"usage"') >= 0
            and data.find(b'"usage":null') < 0
            and data.find(b'"usage": null') < 0
        ):
            try:
                chunk: dict[str, Any] = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamProtocolError("the upstream sent a malformed stream chunk") from None
            if chunk.get("usage"):
                self.state.usage = Usage.from_openai(chunk["usage"]).served_on(chunk)
                if not chunk.get("choices") and not self.include_usage:
                    return b""
        return event.raw

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        """A whole answer sent to a streamed request (a server that ignores `stream`), as
        the stream it would have been: a chunk per choice with its message as the delta
        (a legacy completion's choice is its own chunk), one with the usage, `[DONE]`.
        Anything else (no `choices`): none, and the stream is refused as it was."""
        choices = answer.get("choices")
        if type(choices) is not list:
            return []
        base = {key: value for key, value in answer.items() if key not in ("choices", "usage")}
        if answer.get("object") == "chat.completion":
            base["object"] = "chat.completion.chunk"
        events = []
        for choice in choices:
            if type(choice) is not dict:
                return []
            message = choice.get("message")
            if type(message) is dict:
                choice = _as_delta(choice, message)
            elif "text" not in choice:
                return []
            events.append(_event({**base, "choices": [choice]}))
        if answer.get("usage"):
            events.append(_event({**base, "choices": [], "usage": answer["usage"]}))
        events.append(Event("", b"[DONE]", DONE))
        return events

    def finish(self) -> bytes:
        self.require_events()
        if self.done:
            return b""
        if self.state.usage is not None:  # the usage chunk comes last, after the finish
            return DONE  # reason: whole, only its [DONE] left out (a server that closes)
        raise UpstreamProtocolError("the upstream stream ended before [DONE]")


def _as_delta(choice: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    """A whole answer's choice as a stream chunk's: its message as the delta (fields that
    are null left out, each tool call numbered by its `index`)."""
    delta = {key: value for key, value in message.items() if value is not None}
    calls = delta.get("tool_calls")
    if type(calls) is list:
        delta["tool_calls"] = [
            {"index": index, **call} if type(call) is dict else call
            for index, call in enumerate(calls)
        ]
    chunk = {key: value for key, value in choice.items() if key != "message"}
    return {"index": chunk.pop("index", 0), "delta": delta, **chunk}


def _event(chunk: dict[str, Any]) -> Event:
    data = orjson.dumps(chunk)
    return Event("", data, b"data: " + data + b"\n\n")


def stream_failure(data: bytes) -> UpstreamServerError | None:
    """The failure an OpenAI-format stream event reports after its 200, if it is one:
    OpenAI's `{"error": {...}}`, vLLM's `{"object": "error", "message"}`, or a chunk
    with an `error` beside its choices and `finish_reason: "error"` (OpenRouter's, which
    may be followed by `[DONE]`, so that the stream would otherwise pass as complete)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:  # not JSON: judged as any other event, unless it is
        if data.startswith(b'{"error"'):  # an error that broke off (its text is quoted)
            return UpstreamServerError(f"upstream stream error: {error_message(data)}")
        return None
    if type(event) is not dict:
        return None
    if event.get("error") or event.get("object") == "error":
        return UpstreamServerError(f"upstream stream error: {error_message(data)}")
    choices = event.get("choices")
    for choice in choices if type(choices) is list else ():
        if type(choice) is dict and choice.get("finish_reason") == "error":
            return UpstreamServerError(
                "upstream stream error: the upstream ended its answer with "
                "finish_reason 'error' and no message"
            )
    return None


def completion_of(body: bytes, field: str = "choices") -> Completion:
    """An OpenAI-format answer (`choices`, or an embeddings answer's `data`) and its usage
    (some compatible servers send none)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        streamed = answer_from_stream(body) if field == "choices" else None
        if streamed is None:
            raise UpstreamProtocolError(
                f"the upstream answered with malformed JSON: {how_it_began(body)}"
            ) from exc
        log.warning("the upstream streamed an answer it was not asked to; assembled")
        data, body = streamed, orjson.dumps(streamed)
    if type(data) is not dict or type(data.get(field)) is not list:
        what = "chat completion" if field == "choices" else "embeddings answer"
        load_answer(body, what, field)  # raises, saying what came instead
    usage = data.get("usage")
    return Completion(body, Usage.from_openai(usage).served_on(data), reported=bool(usage))
