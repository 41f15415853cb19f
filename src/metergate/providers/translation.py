"""Pieces shared by the adapters that translate OpenAI chat traffic to another wire format.

The Anthropic and Gemini adapters both read OpenAI requests, build OpenAI answers and
turn a provider's SSE stream into OpenAI chunks; the common parts live here so the two
behave the same way (same error for a bad request, same chunk shape, same stream loop).
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

import orjson

from metergate.errors import GatewayError, InvalidRequest, UpstreamProtocolError
from metergate.providers.base import Completion, Usage
from metergate.providers.h1 import StreamResponse
from metergate.providers.http import HttpTransport, error_message, how_it_began
from metergate.providers.sse import DONE, Event, SSEDecoder, chunk_event

log = logging.getLogger("metergate.providers")
P = ParamSpec("P")
R = TypeVar("R")


def invalid_request(message: str, param: str | None = None) -> InvalidRequest:
    """A request this provider cannot serve: the caller's fault, so a 400 that names the
    field (`messages[2].content[0].text`) in the caller's OpenAI terms."""
    return InvalidRequest(message, param=param)


def request_translator(translate: Callable[P, R]) -> Callable[P, R]:
    """Make a malformed request that slipped past the shape checks a 400, not a 500.

    The gateway checks only what it relies on itself; the shape of messages, content
    parts and tools is first read by the translators, through the checks below, which
    name the offending field. This is the net under them: it names no field (so the tests
    make sure nothing reaches it) and never quotes Python's own message.
    """

    @functools.wraps(translate)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return translate(*args, **kwargs)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # No message: it could quote the caller's content.
            log.warning(
                "%s met a shape it does not check (%s)", translate.__qualname__, type(exc).__name__
            )
            raise invalid_request(
                "malformed request: a field has a type this provider's translation cannot "
                "read; check messages, tools, tool_choice, stop and response_format"
            ) from exc

    return checked


def an_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_request(f"`{where}` must be an object, not {_kind(value)}", where)
    return value


def a_list(value: Any, where: str) -> list[Any]:
    """An array; null or absent is an empty one."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid_request(f"`{where}` must be an array, not {_kind(value)}", where)
    return value


def a_string(value: Any, where: str) -> str | None:
    """A string, or None when null or absent."""
    if value is not None and not isinstance(value, str):
        raise invalid_request(f"`{where}` must be a string, not {_kind(value)}", where)
    return value


def required_string(container: dict[str, Any], name: str, where: str) -> str:
    """`container[name]`, a non-empty string (`where` names the container)."""
    value = a_string(container.get(name), f"{where}.{name}")
    if not value:
        raise invalid_request(f"`{where}.{name}` is required", f"{where}.{name}")
    return value


def shown(value: Any) -> str:
    """A caller's value quoted in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    """What the caller sent, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), "a value")


def text_of(content: Any, where: str) -> str:
    """The text of an OpenAI message `content`: a string, or a list of parts whose text
    parts are joined as separate system messages are, by a blank line (other parts carry
    no text here): a system prompt in two blocks must not read as one run-on line."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(a_list(content, where)):
        part = an_object(part, f"{where}[{index}]")
        if part.get("type") == "text":
            texts.append(a_string(part.get("text"), f"{where}[{index}].text") or "")
    return "\n\n".join(text for text in texts if text)


def image_url_of(part: dict[str, Any], where: str) -> str:
    """The URL of an `image_url` content part (an object per the spec; some clients send a str)."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise invalid_request(f"`{where}.image_url` has no url", f"{where}.image_url")
    return url


def parse_data_url(url: str, where: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a `data:` URL, None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, comma, data = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid_request(
            f"`{where}.image_url`: image data URLs must be base64-encoded (data:<type>;base64,...)",
            f"{where}.image_url",
        )
    return header.split(";", 1)[0] or "application/octet-stream", data


def parse_arguments(arguments: Any, where: str) -> dict[str, Any]:
    """The JSON object of a tool call's `arguments`; both providers want a real object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise invalid_request(f"`{where}` must be a JSON object encoded as a string", where)
    return value


def tool_calls_of(
    message: dict[str, Any], where: str
) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """Each tool call of an assistant message: the call, its `function`, and where it is."""
    for index, item in enumerate(a_list(message.get("tool_calls"), f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{index}]"
        call = an_object(item, at)
        yield call, function_of(call, at), at


def stop_sequences(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop] if stop else []
    stops = a_list(stop, "stop")
    if not all(isinstance(item, str) for item in stops):
        raise invalid_request("`stop` must be a string or an array of strings", "stop")
    return [item for item in stops if item]


def function_of(item: dict[str, Any], where: str) -> dict[str, Any]:
    """The `function` object of a tool or tool call (absent: empty), its name a string."""
    function = an_object(item.get("function") or {}, f"{where}.function")
    a_string(function.get("name"), f"{where}.function.name")
    return function


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """An OpenAI function tool, checked: what every provider's own tool is made of."""

    name: str | None
    description: str | None
    parameters: dict[str, Any] | None  # None when absent or empty


def function_tool(item: Any, where: str, provider: str) -> FunctionTool:
    """Read one entry of `tools` for a provider that takes function tools only."""
    tool = an_object(item, where)
    if tool.get("type", "function") != "function":
        raise invalid_request(
            f"`{where}.type` {shown(tool.get('type'))} is not supported for {provider}; "
            "only function tools are",
            f"{where}.type",
        )
    function = function_of(tool, where)
    parameters = function.get("parameters")
    return FunctionTool(
        function.get("name"),
        a_string(function.get("description"), f"{where}.function.description") or None,
        an_object(parameters, f"{where}.function.parameters") if parameters else None,
    )


def response_format_of(body: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The `response_format` type and, for `json_schema`, its `json_schema` object."""
    value = body.get("response_format")
    if value is None:
        return None, {}
    response_format = an_object(value, "response_format")
    kind = a_string(response_format.get("type"), "response_format.type")
    spec = an_object(response_format.get("json_schema") or {}, "response_format.json_schema")
    a_string(spec.get("name"), "response_format.json_schema.name")
    return kind, spec


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """`max_completion_tokens`, or the older `max_tokens` that many clients still send."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if type(value) is not int:
                raise invalid_request(f"`{key}` must be a positive integer", key)
            return value
    return None


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Parse an upstream JSON object; garbage from the provider is an upstream error."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamProtocolError(
            f"the upstream sent a malformed {what} (not a JSON object): {how_it_began(data)}"
        )
    return value


def load_answer(data: bytes, what: str, field: str) -> dict[str, Any]:
    """An upstream's whole answer, which must carry its `field` list (`choices`, `data`,
    `output`, `content`): a 200 with anything else (an error object, a bare list, an empty
    object) is no answer to relay, bill or translate, and fails the attempt as the
    upstream's fault."""
    value = load_json(data, what)
    if type(value.get(field)) is not list:
        if value.get("error"):  # its message as any error's, credentials taken out
            raise UpstreamProtocolError(
                f"the upstream answered 200 with an error instead of a {what}: "
                f"{error_message(data)}"
            )
        raise UpstreamProtocolError(f"the upstream sent a {what} without `{field}`")
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


def translated_completion(
    response_id: str, model: str, choices: list[dict[str, Any]], usage: Any, read: Usage
) -> Completion:
    """The OpenAI answer made from a provider's: `usage` is what the provider sent, `read`
    its tokens. An answer that reported none says `usage: null`, as an OpenAI-compatible
    server would, and the gateway estimates what it bills (`Completion.reported`)."""
    body = {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": read.to_openai() if usage else None,
    }
    return Completion(orjson.dumps(body), read, reported=bool(usage))


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
        """The usage chunk (when the caller asked for it and the provider reported usage:
        none is sent rather than zeros, as from an OpenAI server that sends none) and the
        closing `[DONE]`."""
        if not include_usage or usage is None:
            return DONE
        return chunk_event({**self.base, "choices": [], "usage": usage.to_openai()}) + DONE


class EventTranslator(Protocol):
    """Turns one provider's SSE events into OpenAI chunk bytes."""

    def feed(self, event: Event) -> bytes: ...

    def finish(self) -> bytes:
        """Called when the upstream closed the stream; raises if it was not complete."""
        ...


def _translated(
    translator: EventTranslator, events: list[Event]
) -> tuple[bytes, GatewayError | None]:
    """The translation of `events`, and the error that stopped it (None: all went)."""
    parts = []
    try:
        for event in events:
            parts.append(translator.feed(event))
    except GatewayError as error:
        return b"".join(parts), error
    return b"".join(parts), None


class HoldsOpening:
    """A translator that keeps an answer's opening (a role chunk, Anthropic's
    `message_start`) until the upstream's next event that is not a keep-alive.

    Anthropic and Bedrock report an overload right after opening a stream; while no
    byte of it has reached the caller that failure may still be retried or sent to a
    fallback, which it cannot be once the opening went out. The wait is one event: the
    next one (the first content block, a thinking one included) releases it."""

    held = b""

    def hold(self, out: bytes) -> bytes:
        self.held += out
        return b""

    def release(self, out: bytes) -> bytes:
        """`out` with the held opening before it (once)."""
        held, self.held = self.held, b""
        return held + out


@runtime_checkable
class Restreams(Protocol):
    """A translator that can relay a whole answer as the stream it would have been."""

    def restream(self, answer: dict[str, Any]) -> list[Event]:
        """The events of a stream holding `answer`, `[DONE]` included; [] if it is not
        an answer this translator knows."""
        ...


def _unstreamed(translator: EventTranslator, body: bytes, upstream: str) -> bytes:
    """What to relay of an answer to a streamed request in which no event was found.

    Some servers ignore `stream: true` and send a whole JSON answer; others send their
    events without `data: `. Either way the upstream generated (and billed) the answer:
    retrying would have it generate and bill it again, so it is relayed, its usage
    metered as reported: a whole answer as the stream it would have been (where the
    translator knows its format), events without `data: ` (one JSON object a line) as
    the events they are. An error object sent with the 200 fails the attempt with its
    own message, as a whole answer's does; anything else is left to the translator's
    `finish`, which refuses it."""
    events: list[Event] = []
    what = "a whole answer"
    try:
        whole = orjson.loads(body)
    except orjson.JSONDecodeError:
        events, what = _bare_events(body), "events without `data: `"
    else:
        if type(whole) is dict:
            if whole.get("error") or whole.get("object") == "error":
                raise UpstreamProtocolError(
                    "the upstream answered 200 with an error instead of a stream: "
                    f"{error_message(body)}"
                )
            if isinstance(translator, Restreams):
                events = translator.restream(whole)
    if not events:
        return b""
    log.warning(
        "upstream %s answered a streamed request with %s; relayed as a stream", upstream, what
    )
    return b"".join(translator.feed(event) for event in events)


def _bare_events(body: bytes) -> list[Event]:
    """The events of a stream sent without `data: `: each line a JSON object (or
    `[DONE]`), keep-alive comments aside; [] unless every line is one."""
    events = []
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith(b":"):
            continue
        if line == b"[DONE]":
            events.append(Event("", line, DONE))
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            return []
        if type(value) is not dict:
            return []
        events.append(Event("", line, b"data: " + line + b"\n\n"))
    return events


async def relay(
    transport: HttpTransport, opening: Awaitable[StreamResponse], translator: EventTranslator
) -> AsyncGenerator[bytes, None]:
    """Read an upstream SSE stream and yield its translation, one item per network read,
    except that the first event with something to send goes out alone: a read holding
    many events (a fast upstream, a buffering proxy) does not hold the caller's first
    token while the rest of it is translated.

    The client bounds the wait for the first chunk by `first_byte` and every later gap
    by `stream_idle`; closing returns the connection to the pool only if the stream was
    read to its end. An upstream error event still lets what came before it in the same
    read go out first: the caller gets the text the upstream generated (and bills).

    `opening` is the stream's opening, not yet awaited (`HttpTransport.open_stream`, or
    a coroutine that gets credentials first), so that an adapter's `chat_stream` returns
    this generator itself: re-yielding it cost an async generator more per read.
    """
    response = await opening  # its failures are classified already
    decoder = SSEDecoder()
    started = False
    unsent: list[bytes] = []  # the reads in which nothing was sent yet (`_unstreamed`)
    try:
        async for chunk in response:
            events = decoder.feed(chunk)
            if not started:
                for index, event in enumerate(events):
                    if first := translator.feed(event):
                        started = True
                        unsent = []
                        yield first
                        events = events[index + 1 :]
                        break
                else:
                    if not (isinstance(translator, HoldsOpening) and translator.held):
                        unsent.append(chunk)
                        response.no_event_yet()  # raises once past first_byte
                    continue  # nothing to send yet
            if len(events) == 1:  # the usual read of an upstream that streams as it goes:
                out = translator.feed(events[0])  # (a failure has nothing before it)
                if out:
                    yield out
                continue
            out, failed = _translated(translator, events)
            if out:
                yield out
            if failed is not None:
                raise failed
        tail = b"".join(translator.feed(event) for event in decoder.flush())
        if not started and not tail and unsent:
            tail = _unstreamed(translator, b"".join(unsent), transport.name)
        tail += translator.finish()
        if tail:
            yield tail
    except GatewayError:
        raise
    except Exception as exc:
        raise transport.failure_from_exception(exc) from exc
    finally:
        response.close()
        # What it held (up to max_response_bytes of an event that never ended) goes now:
        # a failure's traceback keeps this frame in a cycle the gateway's rare
        # collections leave for long.
        del decoder, unsent
