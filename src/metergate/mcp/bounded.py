"""A cap on what an MCP server may answer over streamable HTTP, enforced while reading.

`BoundedTransport` sits under the gateway's HTTP client for one server. A JSON answer is
read (the SDK reads it whole anyway) only up to `max_response_bytes`; an SSE answer is
passed through as it streams, each event bounded by the same limit. An answer over the
limit is never held in memory: the connection is dropped and the request gets, in its
place, a JSON-RPC error (-32603) that names the limit, so the caller learns why and the
failure is counted against the server that sent it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson

from metergate.mcp.metrics import INTERNAL_ERROR

_EVENT_END = (b"\n\n", b"\r\n\r\n", b"\r\r")
_CUT = b"\nevent: metergate-dropped\n\n"
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
        try:
            sent = orjson.loads(request.content)
        except (orjson.JSONDecodeError, httpx2.RequestNotRead):
            sent = {}
        message = (
            f"MCP server {self.server!r} answered more than {self.limit} bytes "
            f"(its max_response_bytes); metergate refused the answer"
        )
        error = {"code": INTERNAL_ERROR, "message": message}
        error["data"] = {"max_response_bytes": self.limit}
        request_id = sent.get("id") if isinstance(sent, dict) else None
        return {"jsonrpc": "2.0", "id": request_id, "error": error}


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
