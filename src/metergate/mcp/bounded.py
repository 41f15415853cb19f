"""A cap on what an MCP server may answer over streamable HTTP, enforced while reading,
and HTTP error answers that say what the server said.

`BoundedTransport` sits under the gateway's HTTP client for one server. A JSON answer is
read (the SDK reads it whole anyway) only up to `max_response_bytes`; an SSE answer is
passed through as it streams, each event bounded by the same limit. An answer over the
limit is never held in memory: the connection is dropped and the request gets, in its
place, a JSON-RPC error (-32603) that names the limit, so the caller learns why and the
failure is counted against the server that sent it.

An HTTP error answer without a JSON-RPC error of its own (a 401 from a proxy, a 502 page)
would reach the caller and the log as the SDK's "Server returned an error response";
it is replaced by a JSON-RPC error (-32603) naming the server, the status and the start
of what it said. A 404 to a request in a handshake-era session says the server ended
that session (its idle timeout, a restart): it is replaced by an error that says so, and
that `Upstream` knows to answer by opening a new session (`session_ended`); ending that
session at the close of its connection then finds it gone, as intended, not failed.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import httpx2
import orjson
from mcp.client.streamable_http import MCP_SESSION_ID
from mcp_types import ErrorData

from metergate.mcp.metrics import CONNECTION_CLOSED, INTERNAL_ERROR

_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\r\r")
_CUT = b"\nevent: metergate-dropped\n\n"
_QUOTED = 200  # bytes of an HTTP error answer quoted in the caller's error
SSE_MARGIN = 64
"""What the SDK's own per-event limit must allow beyond ours: the line that ends a cut
event (our limit fires first, and the SDK's would fail the whole stream instead)."""
_SESSION_ENDED = secrets.token_hex(8)
"""Marks the error standing for a 404 to a request in a session: random per process, so
no server can forge one in an answer of its own and have a request it took sent again."""


class BoundedTransport(httpx2.AsyncBaseTransport):
    def __init__(self, inner: httpx2.AsyncBaseTransport, server: str, limit: int) -> None:
        self.inner = inner
        self.server = server
        self.limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        # The limit counts bytes as they arrive: a compressed answer would be counted
        # before it expands, so ask for it uncompressed.
        request.headers["Accept-Encoding"] = "identity"
        response = await self.inner.handle_async_request(request)
        if request.method == "DELETE" and response.status_code == 404:
            await response.aclose()  # the session to end is gone already (not a failure)
            return httpx2.Response(204, request=request)
        if request.method != "POST":
            return response  # the server's notification stream: no results on it
        refusal = self._refusal(request)
        if response.headers.get("content-type", "").lower().startswith("text/event-stream"):
            response.stream = _BoundedEvents(response.stream, self.limit, refusal)
            return response
        length = response.headers.get("content-length", "")
        too_big = length.isdigit() and int(length) > self.limit
        body = bytearray()
        if not too_big:
            stream = response.stream
            assert isinstance(stream, httpx2.AsyncByteStream)
            async for chunk in stream:
                body += chunk
                if len(body) > self.limit:
                    too_big = True
                    break
        await response.aclose()
        if too_big:
            return httpx2.Response(200, json=refusal, request=request)
        status = response.status_code
        content_type = response.headers.get("content-type", "").lower()
        # An HTTP error answer with a JSON-RPC error of its own: the SDK reads that one.
        own_error = content_type.startswith("application/json") and bool(_jsonrpc_error(body))
        if status == 404 and MCP_SESSION_ID in request.headers:
            ended = self._session_ended(request, bytes(body))
            return httpx2.Response(status, json=ended, request=request)
        if status >= 400 and status != 404 and not own_error:
            # The SDK would say only "Server returned an error response" (a 404 outside a
            # session it reads itself: an unknown method). Say what the server said, so a
            # 401 reads as one.
            failure = self._failure(request, status, bytes(body))
            return httpx2.Response(status, json=failure, request=request)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            content=bytes(body),
            request=request,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _refusal(self, request: httpx2.Request) -> dict[str, Any]:
        """The JSON-RPC error that stands for an answer over the limit."""
        message = (
            f"MCP server {self.server!r} answered more than {self.limit} bytes "
            f"(its max_response_bytes); metergate refused the answer"
        )
        return _error(request, message, {"max_response_bytes": self.limit})

    def _failure(self, request: httpx2.Request, status: int, body: bytes) -> dict[str, Any]:
        """The JSON-RPC error that stands for an HTTP error answer without one."""
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:  # a status the standard does not name
            reason = ""
        said = " ".join(body[:_QUOTED].decode("utf-8", "replace").split())
        message = f"MCP server {self.server!r} answered HTTP {status} {reason}".rstrip()
        return _error(request, f"{message}: {said}" if said else message, {"http_status": status})

    def _session_ended(self, request: httpx2.Request, body: bytes) -> dict[str, Any]:
        """The JSON-RPC error that stands for a 404 to a request in a session: the server
        ended the session, and never took the request."""
        said = (_jsonrpc_error(body) or {}).get("message")
        if not isinstance(said, str):
            said = " ".join(body[:_QUOTED].decode("utf-8", "replace").split())
        message = f"MCP server {self.server!r} ended metergate's session (HTTP 404 Not Found"
        message += f": {said})" if said else ")"
        data = {"http_status": 404, "session_ended": _SESSION_ENDED}
        return _error(request, message, data, CONNECTION_CLOSED)


def session_ended(error: ErrorData) -> bool:
    """Whether `error` stands for the server ending the session the request was sent in."""
    data = error.data
    return isinstance(data, dict) and data.get("session_ended") == _SESSION_ENDED


def _error(
    request: httpx2.Request, message: str, data: dict[str, Any], code: int = INTERNAL_ERROR
) -> dict[str, Any]:
    """A JSON-RPC error answering the request `request` carries."""
    try:
        sent = orjson.loads(request.content)
    except (orjson.JSONDecodeError, httpx2.RequestNotRead):
        sent = {}
    request_id = sent.get("id") if isinstance(sent, dict) else None
    error = {"code": code, "message": message, "data": data}
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _jsonrpc_error(body: bytes | bytearray) -> dict[str, Any] | None:
    """The JSON-RPC error an answer carries, if it carries one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None


class _BoundedEvents(httpx2.AsyncByteStream):
    """An SSE body passed through as it comes; an event growing past the limit is cut
    short (ended as an event type nobody handles) and followed by the refusal."""

    def __init__(self, inner: Any, limit: int, refusal: dict[str, Any]) -> None:
        self.inner = inner
        self.limit = limit
        self.refusal = refusal

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = 0  # bytes of the event being received
        tail = b""
        async for chunk in self.inner:
            window = tail + chunk
            ends = [window.rfind(end) + len(end) for end in _EVENT_END if end in window]
            pending = len(window) - max(ends) if ends else pending + len(chunk)
            tail = window[-3:]
            if pending > self.limit:
                yield _CUT
                yield b"event: message\ndata: " + orjson.dumps(self.refusal) + b"\n\n"
                return
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()
