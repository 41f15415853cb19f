"""Pieces shared by the adapters that translate OpenAI chat traffic to another wire format.

The Anthropic and Gemini adapters both read OpenAI requests, build OpenAI answers and
turn a provider's SSE stream into OpenAI chunks; the common parts live here so the two
behave the same way (same error for a bad request, same chunk shape, same stream loop).
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, ParamSpec, Protocol, TypeVar

import orjson

from metergate.errors import GatewayError, InvalidRequest, UpstreamProtocolError
from metergate.providers.base import Usage
from metergate.providers.h1 import StreamResponse
from metergate.providers.http import HttpTransport
from metergate.providers.sse import DONE, Event, SSEDecoder, chunk_event

P = ParamSpec("P")
R = TypeVar("R")


def invalid_request(message: str) -> InvalidRequest:
    """A request this provider cannot serve: the caller's fault, so a 400."""
    return InvalidRequest(message)


def request_translator(translate: Callable[P, R]) -> Callable[P, R]:
    """Make a malformed request (say, a message that is not an object) a 400, not a 500.

    The gateway checks only what it relies on itself; the shape of messages, content
    parts and tools is first read here.
    """

    @functools.wraps(translate)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return translate(*args, **kwargs)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise invalid_request(f"malformed request: {type(exc).__name__}: {exc}") from exc

    return checked


def text_of(content: Any) -> str:
    """The text of an OpenAI message `content`: a string, or a list of parts (text only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text") or ""
        for part in content
        if isinstance(part, dict) and part.get("type") == "text"
    )


def image_url_of(part: dict[str, Any]) -> str:
    """The URL of an `image_url` content part (an object per the spec; some clients send a str)."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise invalid_request("an image_url content part has no url")
    return url


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a `data:` URL, None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, comma, data = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid_request("image data URLs must be base64-encoded (data:<type>;base64,...)")
    return header.split(";", 1)[0] or "application/octet-stream", data


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """The JSON object of a tool call's `arguments`; both providers want a real object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise invalid_request("tool call arguments must be a JSON object encoded as a string")
    return value


def stop_sequences(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop] if stop else []
    return [item for item in stop or [] if isinstance(item, str) and item]


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """`max_completion_tokens`, or the older `max_tokens` that many clients still send."""
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return int(body[key])
    return None


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Parse an upstream JSON object; garbage from the provider is an upstream error."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"the upstream sent a malformed {what}")
    return value


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def assistant_message(text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's answer message: `content` is null only when the model just called tools."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def completion_body(
    response_id: str, model: str, choices: list[dict[str, Any]], usage: Usage
) -> bytes:
    return orjson.dumps(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage.to_openai(),
        }
    )


class ChunkWriter:
    """Builds the OpenAI `chat.completion.chunk` events of one stream (shared id and model)."""

    def __init__(self, response_id: str, model: str) -> None:
        self.base = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def delta(
        self, delta: dict[str, Any], finish_reason: str | None = None, index: int = 0
    ) -> bytes:
        return chunk_event(
            {
                **self.base,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "finish_reason": finish_reason,
                        "logprobs": None,
                    }
                ],
            }
        )

    def end(self, usage: Usage | None, include_usage: bool) -> bytes:
        """The usage chunk (only when the caller asked for it) and the closing `[DONE]`."""
        if not include_usage:
            return DONE
        totals = (usage or Usage()).to_openai()
        return chunk_event({**self.base, "choices": [], "usage": totals}) + DONE


class EventTranslator(Protocol):
    """Turns one provider's SSE events into OpenAI chunk bytes."""

    def feed(self, event: Event) -> bytes: ...

    def finish(self) -> bytes:
        """Called when the upstream closed the stream; raises if it was not complete."""
        ...


async def relay(
    transport: HttpTransport, response: StreamResponse, translator: EventTranslator
) -> AsyncGenerator[bytes, None]:
    """Read an upstream SSE stream and yield its translation, one item per network read.

    The client bounds the wait for the first chunk by `first_byte` and every later gap
    by `stream_idle`; closing returns the connection to the pool only if the stream was
    read to its end.
    """
    decoder = SSEDecoder()
    try:
        async for chunk in response:
            out = b"".join(translator.feed(event) for event in decoder.feed(chunk))
            if out:
                yield out
        tail = b"".join(translator.feed(event) for event in decoder.flush())
        tail += translator.finish()
        if tail:
            yield tail
    except GatewayError:
        raise
    except Exception as exc:
        raise transport.failure_from_exception(exc) from exc
    finally:
        response.close()
