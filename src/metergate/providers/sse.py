"""Server-sent events: split an upstream byte stream into events, and build OpenAI events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from metergate.errors import UpstreamProtocolError

DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Event:
    name: str  # the `event:` field, "" when absent (OpenAI and Gemini send none)
    data: bytes  # the `data:` lines joined with newlines
    raw: bytes  # the whole event as received, normalised to \n line ends


class SSEDecoder:
    """Incremental decoder: feed it chunks as they arrive, get back complete events.

    Reads in which no event ends are kept apart and joined once one does: copying what
    is held on every read would make an event that never ends (a stream that is not
    SSE, one huge event) quadratic, seconds of a blocked event loop before the answer's
    size bound stops it."""

    __slots__ = ("_after_cr", "_buffer", "_parts")

    def __init__(self) -> None:
        self._buffer = b""  # the start of an event that has not ended
        self._parts: list[bytes] = []  # the reads since, in which no event ended
        self._after_cr = False  # the last read ended with \r: a \n opening the next ends it

    def feed(self, chunk: bytes) -> list[Event]:
        if self._after_cr and chunk:  # a CRLF split between reads is one line end, not two
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if chunk.find(b"\r") >= 0:  # not `in`: it formats and drops a TypeError per call
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = self._parts
        if chunk.find(b"\n\n") < 0 and not (chunk[:1] == b"\n" and self._held_ends_a_line()):
            if chunk:
                parts.append(chunk)
            return []
        if parts:
            buffer = b"".join((self._buffer, *parts, chunk))
            parts.clear()
        else:
            buffer = self._buffer + chunk
        blocks = buffer.split(b"\n\n")
        self._buffer = blocks.pop()
        return [event for block in blocks if (event := _parse(block)) is not None]

    def flush(self) -> list[Event]:
        """Whatever the upstream left without a closing blank line when it ended."""
        rest = b"".join((self._buffer, *self._parts))
        self._buffer, self._parts = b"", []
        event = _parse(rest) if rest.strip() else None
        return [event] if event else []

    def _held_ends_a_line(self) -> bool:
        return (self._parts[-1] if self._parts else self._buffer)[-1:] == b"\n"


def _parse(block: bytes) -> Event | None:
    if block.startswith(b"data:") and block.find(b"\n") < 0:  # the usual: one data line
        value = block[5:]
        return Event("", value[1:] if value.startswith(b" ") else value, block + b"\n\n")
    name = ""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    if not data and not name:
        return None  # comment or keep-alive
    return Event(name, b"\n".join(data), block + b"\n\n")


def event_object(data: bytes) -> dict[str, Any]:
    """An event's data as the JSON object a JSON stream's events are; anything else is an
    answer the gateway cannot use, the upstream's fault (not a gateway error)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
    if type(value) is not dict:
        raise UpstreamProtocolError(
            f"the upstream sent a stream event that is not a JSON object: {bytes(data[:60])!r}"
        )
    return value


def chunk_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
