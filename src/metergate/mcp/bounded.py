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
of what it said. A 404 is left to the SDK, which reads it as an ended session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import httpx2
import orjson

from metergate.mcp.metrics import INTERNAL_ERROR

_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\r\r")
_CUT = b"\nevent: metergate-dropped\n\n"
_QUOTED = 200  # bytes of an HTTP error answer quoted in the caller's error
SSE_MARGIN = 64
"""What the SDK's own per-event limit must allow beyond ours: the line that ends a cut
event (our limit fires first, and the SDK's would fail the whole stream instead)."""


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
        own_error = content_type.startswith("application/json") and _is_jsonrpc_error(body)
        if status >= 400 and status != 404 and not own_error:
            # The SDK would say only "Server returned an error response" (404 it reads
            # itself: an ended session). Say what the server said, so a 401 reads as one.
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


def _error(request: httpx2.Request, message: str, data: dict[str, Any]) -> dict[str, Any]:
    """A JSON-RPC error (-32603) answering the request `request` carries."""
    try:
        sent = orjson.loads(request.content)
    except (orjson.JSONDecodeError, httpx2.RequestNotRead):
        sent = {}
    request_id = sent.get("id") if isinstance(sent, dict) else None
    error = {"code": INTERNAL_ERROR, "message": message, "data": data}
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _is_jsonrpc_error(body: bytes | bytearray) -> bool:
    """Whether an HTTP error answer carries its own JSON-RPC error (the SDK reads it)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


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
