"""Small read-only endpoints: models, health, readiness, metrics."""

from __future__ import annotations

import orjson

from metergate.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.runtime import Runtime


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
