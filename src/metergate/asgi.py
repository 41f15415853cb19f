"""The few ASGI primitives the gateway's doors need, without a framework's per-request
objects.

The hot path is plain ASGI: one dict of headers, one body read, one or two `send` calls.
A framework would add routing layers and request objects that this path does not use.

Input bounds are enforced here, once, when the body is read: its size and its JSON
nesting depth. Every later stage (translation, re-encoding for the upstream, the cache
key) can then handle whatever was accepted: orjson encodes at most 254 levels, so the
depth limit leaves room for what adapters wrap around the caller's JSON.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import orjson

from metergate.errors import ClientGone, InvalidRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_JSON_DEPTH = 100  # the default of server.max_json_depth
# Scope key: a callable a handler sets; the gateway's HTTP protocol (api/protocol.py) calls
# it, once and on the loop, when the caller closes its connection before the answer is
# complete, so a handler waiting on an upstream learns of it at once and without a task
# of its own. Under another ASGI server nobody calls it; `receive()` still tells.
ON_DEPARTURE = "metergate.on_departure"
# Scope key: (status, message, code) of the answer the gateway's HTTP protocol sent itself
# when it cut a request short (a body that did not arrive in time), so the handler records
# that answer instead of a caller that left.
REFUSAL = "metergate.refusal"
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _ids() -> Iterator[str]:
    """Request ids unique across processes and restarts: a random per-process prefix and
    a counter (a fresh random id per request cost a system call each)."""
    prefix = "req_" + secrets.token_hex(6)
    for number in itertools.count(1):
        yield f"{prefix}{number:012x}"


_request_ids = _ids()
# A caller's id is kept when it is printable ASCII (cut at 128): anything else would be
# stored garbled (headers are bytes) or carry control characters into logs and the console.
_CALLER_ID = re.compile(rb"[\x20-\x7e]+")


class Request:
    """What a handler needs of one HTTP request: headers, body, id and start time."""

    __slots__ = ("body_size", "headers", "id", "raw", "receive", "scope", "started")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.started = time.perf_counter()
        self.body_size = 0
        self.raw = b""  # the body as read by `json`, for scans cheaper on bytes than on JSON
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        caller_id = self.headers.get(b"x-request-id")
        if caller_id and _CALLER_ID.fullmatch(caller_id):
            self.id = caller_id[:128].decode()
        else:
            self.id = next(_request_ids)

    async def body(self, limit: int) -> bytes:
        declared = self.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Refused before a byte of it is read (and before `100 Continue` invites it);
            # the connection closes, since the body it announced will not be read.
            raise _too_large(limit, [(b"connection", b"close")])
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                refusal = self.scope.get(REFUSAL)
                if refusal is not None:
                    status, text, code = refusal
                    raise InvalidRequest(text, status=status, code=code)
                raise ClientGone("client closed the request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                self.body_size = size
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self, limit: int, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
        raw = self.raw = await self.body(limit)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            data = self._not_strict_json(raw, exc, max_depth)
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object", code="invalid_json")
        # Fewer brackets than the limit cannot nest deeper than it (the usual small body).
        if raw.count(b"{") + raw.count(b"[") > max_depth and _deeper_than(data, max_depth):
            raise _too_deep(max_depth)
        return data

    async def bounded_body(self, limit: int, max_depth: int = MAX_JSON_DEPTH) -> bytes:
        """The body, refused past `limit` bytes or `max_depth` levels of JSON nesting, for
        a handler that parses it itself (the MCP SDK): what is not JSON is its to refuse."""
        raw = await self.body(limit)
        if raw.count(b"{") + raw.count(b"[") > max_depth:
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                if str(exc).startswith("depth limit exceeded"):
                    raise _too_deep(max_depth) from None
                return raw
            if isinstance(data, dict | list) and _deeper_than(data, max_depth):
                raise _too_deep(max_depth)
        return raw

    def _not_strict_json(self, raw: bytes, exc: orjson.JSONDecodeError, max_depth: int) -> Any:
        """A body orjson refused: JSON with lone surrogate escapes (`"\\ud83d"`, what a
        client that cut a string between the halves of an emoji sends) is taken with each
        replaced by U+FFFD, as Go's encoding/json does, since no upstream could be sent
        it as UTF-8; anything else is refused with a message that says why."""
        reason = str(exc)
        if reason.startswith("depth limit exceeded"):
            raise _too_deep(max_depth) from None
        not_utf8 = reason.startswith("str is not valid UTF-8")  # (orjson: "surrogates not
        if "surrogate" in reason and not not_utf8:  # allowed" too, whatever the bytes)
            try:
                return _surrogates_replaced(json.loads(raw))
            except (ValueError, RecursionError):
                pass  # refused below, with orjson's reason
        encoding = self.headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":  # looked at only here: a valid body costs nothing
            raise InvalidRequest(
                f"request bodies sent with Content-Encoding: {encoding.decode('latin-1')} "
                "are not accepted; send the JSON uncompressed",
                status=415,
                code="unsupported_content_encoding",
            ) from None
        if not_utf8:
            raise _not_utf8(raw) from None
        raise InvalidRequest(f"request body is not valid JSON: {reason}", code="invalid_json")


def _not_utf8(raw: bytes) -> InvalidRequest:
    """The refusal of a body that is not UTF-8, naming its first bad byte and where."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        where = f": byte 0x{raw[bad.start]:02x} at offset {bad.start}"
    else:  # (orjson found what Python does not: said without a place)
        where = ""
    bom = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
    return InvalidRequest(
        f"request body is not valid UTF-8{where}"
        + (" (it begins with a UTF-16 byte order mark)" if bom else "")
        + "; send the JSON encoded as UTF-8",
        code="invalid_json",
    )


def _too_large(limit: int, headers: list[tuple[bytes, bytes]] | None = None) -> InvalidRequest:
    return InvalidRequest(
        f"request body is larger than the gateway's limit of {limit} bytes; "
        "send a smaller request or raise server.max_body_bytes",
        status=413,
        code="request_too_large",
        headers=headers,
    )


def _surrogates_replaced(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_surrogates_replaced(item) for item in value]
    if isinstance(value, dict):
        return {_surrogates_replaced(k): _surrogates_replaced(v) for k, v in value.items()}
    return value


def _deeper_than(value: dict[str, Any] | list[Any], limit: int) -> bool:
    """Does `value` nest objects and arrays more than `limit` levels deep?"""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
    return False


def _too_deep(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"request body nests JSON objects and arrays more than {limit} levels deep, the "
        "gateway's limit (server.max_json_depth); flatten the request",
        code="json_too_deep",
    )


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """A whole answer with its length: sent in one piece, not chunked, and a HEAD
    request's answer (the server drops the body) still says how long the GET's is. A 304
    has no body and says nothing of the length (it would be the 200's)."""
    if status != 304:
        headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def base_headers(request: Request) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", request.id.encode("latin-1"))]
