"""Small read-only endpoints: models, health, readiness, metrics."""

from __future__ import annotations

import hashlib
import hmac

import orjson
from pydantic import SecretStr

from metergate.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.errors import Unauthorized
from metergate.runtime import Runtime

_METRICS_CHALLENGE = (b"www-authenticate", b'Bearer realm="metergate metrics"')


class InfoHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def models(self, request: Request, send: Send) -> None:
        key = await self.runtime.keys.authenticate(request.headers)
        data = [_model(name, self.runtime) for name in self.runtime.plan.router.models_for(key)]
        body = orjson.dumps({"object": "list", "data": data})
        await respond(send, 200, body, base_headers(request) + JSON_HEADERS)

    async def model(self, request: Request, send: Send, name: str) -> None:
        key = await self.runtime.keys.authenticate(request.headers)
        self.runtime.plan.router.route(name, key)  # 404 with the allowed list when not allowed
        body = orjson.dumps(_model(name, self.runtime))
        await respond(send, 200, body, base_headers(request) + JSON_HEADERS)

    async def healthz(self, request: Request, send: Send) -> None:
        await respond(send, 200, b'{"status":"ok"}', base_headers(request) + JSON_HEADERS)

    async def readyz(self, request: Request, send: Send) -> None:
        runtime = self.runtime
        problems = []
        if not runtime.ready:
            problems.append("gateway is starting or stopping")
        elif runtime.database is not None:
            try:
                await runtime.database.fetch("SELECT 1")
            except Exception as exc:
                problems.append(f"ledger database unreachable: {type(exc).__name__}: {exc}")
        status = 503 if problems else 200
        body = orjson.dumps(
            {
                "status": "not ready" if problems else "ready",
                "problems": problems,
                "config_version": runtime.plan.version,
                "ledger_pending_rows": runtime.ledger.pending if runtime.ledger else 0,
            }
        )
        await respond(send, status, body, base_headers(request) + JSON_HEADERS)

    async def metrics(self, request: Request, send: Send) -> None:
        """The Prometheus exposition (at /metrics and /v1/metrics); with
        `server.metrics_token` set, only for a request bearing it."""
        token = self.runtime.plan.config.server.metrics_token
        if token is not None:
            _check_metrics_token(request, token)
        body = self.runtime.metrics.exposition()
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
        await respond(send, 200, body, base_headers(request) + headers)


def _model(name: str, runtime: Runtime) -> dict[str, object]:
    route = runtime.plan.router.routes[name]
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "metergate",
        "description": route.description,
    }


def _check_metrics_token(request: Request, token: SecretStr) -> None:
    """401 unless the request bears the metrics token (compared as hashes, in constant time)."""
    raw = request.headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, presented = raw.strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized(
            "/metrics needs the metrics token: send `Authorization: Bearer TOKEN` with the "
            "gateway's server.metrics_token (Prometheus: `authorization:` in the scrape job)",
            code="missing_metrics_token",
            headers=[_METRICS_CHALLENGE],
        )
    expected = hashlib.sha256(token.get_secret_value().encode()).digest()
    if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), expected):
        raise Unauthorized(
            "wrong metrics token", code="invalid_metrics_token", headers=[_METRICS_CHALLENGE]
        )
