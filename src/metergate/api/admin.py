"""The admin API: operations on the running gateway, guarded by the admin key.

It is off unless `admin.api_key` is configured. Caller keys never work here, and the
admin key is compared as a hash, in constant time. Wrong keys are counted per client
address and, past five a minute, the address is refused with 429 for a while. Every
admin response, errors included, carries the console's security headers and
`Cache-Control: no-store`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs

import orjson
from pydantic import SecretStr

from metergate.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.auth.keys import PREFIX
from metergate.config import ConfigError
from metergate.console.requests_log import check_query
from metergate.console.security import FailedSignIns, secure_headers
from metergate.errors import (
    GatewayError,
    InternalError,
    LedgerUnavailable,
    NotFound,
    RateLimited,
    Unauthorized,
)
from metergate.runtime import Runtime
from metergate.storage.database import unreachable

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
log = logging.getLogger("metergate.admin")
_CHALLENGE = (b"www-authenticate", b'Bearer realm="metergate admin"')


def client_address(request: Request) -> str:
    client = request.scope.get("client")
    return str(client[0]) if client else "unknown"


class AdminGuard:
    """Decides who may use the admin API: the configured admin key, nothing else."""

    def __init__(self, runtime: Runtime, failures: FailedSignIns | None = None) -> None:
        self.runtime = runtime
        self.failures = failures or FailedSignIns()

    def require_enabled(self) -> SecretStr:
        """The admin key; 404 when there is none (the admin API is off)."""
        secret = self.runtime.plan.config.admin.api_key
        if secret is None:
            raise NotFound(
                "the admin API is off: set admin.api_key in the config", code="admin_disabled"
            )
        return secret

    def authorize(self, request: Request) -> None:
        secret = self.require_enabled()
        raw = request.headers.get(b"authorization", b"").decode("latin-1")
        presented = raw[7:].strip() if raw.lower().startswith("bearer ") else ""
        if not presented:
            raise Unauthorized(
                "missing admin key: send `Authorization: Bearer ADMIN_KEY`",
                code="missing_admin_key",
                headers=[_CHALLENGE],
            )
        address = client_address(request)
        wait = self.failures.retry_after(address)
        if wait > 0:
            seconds = max(1, int(wait + 0.999))
            raise RateLimited(
                f"too many wrong admin keys from {address}; try again in {seconds}s",
                code="too_many_sign_in_failures",
                headers=[(b"retry-after", str(seconds).encode())],
            )
        if presented.startswith(PREFIX):
            self.failures.fail(address)
            raise Unauthorized(
                "this is a caller key (mgk_...): caller keys cannot use the admin API "
                "or the console; sign in with the admin key (admin.api_key in the config)",
                status=403,
                error_type="permission_error",
                code="caller_key_on_admin_api",
            )
        expected = hashlib.sha256(secret.get_secret_value().encode()).digest()
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected):
            self.failures.fail(address)
            raise Unauthorized(
                "wrong admin key",
                code="invalid_admin_key",
                headers=[_CHALLENGE],
            )


def query_params(request: Request, *known: str) -> dict[str, list[str]]:
    """The query parameters, refusing any the endpoint does not take (`known`)."""
    raw = request.scope.get("query_string", b"").decode("latin-1")
    query = parse_qs(raw, keep_blank_values=True)
    if query:
        check_query(query, known)
    return query


def admin_endpoint(handler: H) -> H:
    """Send a handler's GatewayError with the admin security headers (the app's generic
    error path does not add them), a bug as the 500 `gateway_error` that quotes the
    request id and an unreachable ledger database as a 503, with those headers too."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Request, send: Send, *args: Any) -> Any:
        try:
            return await handler(self, request, send, *args)
        except GatewayError as error:
            failure, unexpected = error, False
        except Exception as exc:
            failure, unexpected = _unexpected(request, exc), True
        headers = base_headers(request) + JSON_HEADERS + secure_headers() + failure.headers
        # An unexpected failure may come after the answer started: nothing more to send.
        with contextlib.suppress(Exception) if unexpected else contextlib.nullcontext():
            await respond(send, failure.status, failure.body(), headers)
        return None

    return wrapped  # type: ignore[return-value]


def _unexpected(request: Request, error: Exception) -> GatewayError:
    """The ledger database not answering is a 503 to retry; anything else is a bug."""
    scope = request.scope
    if unreachable(error):
        log.warning("ledger database unreachable for %s: %r", scope["path"], error)
        return LedgerUnavailable()
    log.exception("internal error serving %s %s", scope["method"], scope["path"])
    return InternalError(f"internal gateway error; quote request id {request.id} to the operator")


async def send_json(request: Request, send: Send, payload: Any, status: int = 200) -> None:
    body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
    await respond(send, status, body, base_headers(request) + JSON_HEADERS + secure_headers())


class AdminHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.guard = AdminGuard(runtime)

    @admin_endpoint
    async def reload(self, request: Request, send: Send) -> None:
        """Re-read the config file; apply it if valid, else keep serving and say why."""
        self.guard.authorize(request)
        query_params(request)
        try:
            applied = await self.runtime.reload_from_source("admin API")
        except ConfigError as error:
            running = self.runtime.plan.version
            await send_json(
                request,
                send,
                {
                    "error": {
                        "message": f"config refused, still serving version {running}",
                        "type": "invalid_request_error",
                        "code": "invalid_config",
                        "param": None,
                        "problems": [problem.render() for problem in error.problems],
                    }
                },
                422,
            )
            return
        answer = {
            "applied": applied,
            "version": self.runtime.plan.version,
            "restart_required": self.runtime.restart_pending(),  # not applied until then
        }
        await send_json(request, send, answer)
