"""The admin API: operations on the running gateway, guarded by the admin key.

It is off unless `admin.api_key` is configured. Caller keys never work here, and the
admin key is compared as a hash, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

import orjson

from metergate.api.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.api.errors import GatewayError
from metergate.auth.keys import PREFIX
from metergate.config import ConfigError
from metergate.runtime import Runtime


class AdminHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _authorize(self, request: Request) -> None:
        secret = self.runtime.config.admin.api_key
        if secret is None:
            raise GatewayError(404, "the admin API is off: set admin.api_key in the config",
                               code="admin_disabled")
        raw = request.headers.get(b"authorization", b"").decode("latin-1")
        presented = raw[7:].strip() if raw.lower().startswith("bearer ") else ""
        if presented.startswith(PREFIX):
            raise GatewayError(403, "caller keys cannot use the admin API; use the admin key",
                               outcome="unauthorized", code="caller_key_on_admin_api")
        expected = hashlib.sha256(secret.get_secret_value().encode()).digest()
        if not presented or not hmac.compare_digest(
            hashlib.sha256(presented.encode()).digest(), expected
        ):
            raise GatewayError(401, "missing or wrong admin key", outcome="unauthorized",
                               code="invalid_admin_key")

    async def reload(self, request: Request, send: Send) -> None:
        """Re-read the config file; apply it if valid, else keep serving and say why."""
        self._authorize(request)
        try:
            applied = await self.runtime.reload_from_source("admin API")
        except ConfigError as error:
            body = orjson.dumps({"error": {
                "message": f"config refused, still serving version {self.runtime.version}",
                "type": "invalid_request_error", "code": "invalid_config", "param": None,
                "problems": [problem.render() for problem in error.problems]}})
            await respond(send, 422, body, base_headers(request) + JSON_HEADERS)
            return
        body = orjson.dumps({"applied": applied, "version": self.runtime.version})
        await respond(send, 200, body, base_headers(request) + JSON_HEADERS)
