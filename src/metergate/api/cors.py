"""CORS, so a browser app on another origin can call the gateway directly with a key.

Off by default (`server.cors.allowed_origins` empty): browsers then refuse to read the
gateway's answers from other origins, and preflight `OPTIONS` requests get a 405. When
an origin is allowed, its preflight is answered (204, with the allowed methods, headers
and `max_age_seconds`) and every answer to it names it in
`access-control-allow-origin` and exposes the gateway's own headers (cost, upstream,
request id). Credentials are keys in headers, never cookies, so no
`allow-credentials`. Requests without an `Origin` header (every non-browser client)
skip all of this.
"""

from __future__ import annotations

from metergate.asgi import JSON_HEADERS, Message, Request, Send, respond
from metergate.config.model import CorsConfig
from metergate.errors import error_body


class Cors:
    def __init__(self, config: CorsConfig) -> None:
        self.any_origin = "*" in config.allowed_origins
        self.origins = {origin.encode() for origin in config.allowed_origins}
        self.methods = {method.upper() for method in config.allowed_methods}
        self.any_header = "*" in config.allowed_headers
        self.headers = ", ".join(h.lower() for h in config.allowed_headers).encode()
        self.common = [
            (b"access-control-expose-headers", ", ".join(config.expose_headers).encode()),
            (b"vary", b"origin"),
        ]
        self.preflight_common = [
            (b"access-control-allow-methods", ", ".join(sorted(self.methods)).encode()),
            (b"access-control-max-age", b"%d" % config.max_age_seconds),
            (b"vary", b"origin, access-control-request-method, access-control-request-headers"),
        ]

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.origins

    def wrap(self, send: Send, origin: bytes) -> Send:
        """`send` with this origin's CORS headers added to the response head."""
        extra = [(b"access-control-allow-origin", origin), *self.common]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_cors

    async def preflight(self, request: Request, send: Send, origin: bytes) -> None:
        method = request.headers.get(b"access-control-request-method", b"").decode("latin-1")
        if not self.allows(origin) or method.upper() not in self.methods:
            body = error_body(
                f"cross-origin {method or 'request'} from {origin.decode('latin-1')} is not "
                "allowed here (server.cors)",
                "invalid_request_error",
                "cors_not_allowed",
            )
            await respond(send, 403, body, JSON_HEADERS)
            return
        asked = request.headers.get(b"access-control-request-headers", b"")
        headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-headers", asked if self.any_header else self.headers),
            *self.preflight_common,
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
