"""Small read-only endpoints: models, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from urllib.parse import parse_qs

import orjson
from pydantic import SecretStr

from metergate.asgi import JSON_HEADERS, Request, Send, base_headers, respond
from metergate.errors import Unauthorized
from metergate.runtime import Runtime
from metergate.storage.database import Database, Row

_LEDGER_PROBE_SECONDS = 1.0
_METRICS_CHALLENGE = (b"www-authenticate", b'Bearer realm="metergate metrics"')


class LedgerProbe:
    """The ledger database's state for /readyz: "reachable", or why not, within a second.

    A call to a server that stopped answering is not cancelled (asyncpg's cancel waits on
    that server too); it is left to end by the database's own timeout, and while it is
    out no second one starts, so probes cannot pile up on a hung database."""

    def __init__(self) -> None:
        self._probe: asyncio.Future[list[Row]] | None = None

    async def state(self, database: Database) -> str:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(database.fetch("SELECT 1"))
            self._probe.add_done_callback(_retrieve)  # a late failure is not "never retrieved"
        probe = self._probe
        await asyncio.wait({probe}, timeout=_LEDGER_PROBE_SECONDS)
        if not probe.done():
            return f"unreachable: no answer within {_LEDGER_PROBE_SECONDS:g} s"
        error = probe.exception()
        if error is not None:
            return f"unreachable: {type(error).__name__}: {error}"
        gone = database.file_gone()
        if gone is not None:  # it answers, from a file no process will open again
            return f"unwritable: {gone}; rows go where no restart finds them: restart it"
        return "reachable"


def _retrieve(task: asyncio.Future[list[Row]]) -> None:
    if not task.cancelled():
        task.exception()


class InfoHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._ledger = LedgerProbe()

    async def models(self, request: Request, send: Send) -> None:
        """OpenAI's list, or Anthropic's when the caller sends `anthropic-version`."""
        key = await self.runtime.keys.authenticate(request.headers)
        names = self.runtime.plan.router.models_for(key)
        if b"anthropic-version" in request.headers:
            data = [_anthropic_model(name) for name in names]
            first, last = (names[0], names[-1]) if names else (None, None)
            page = {"data": data, "has_more": False, "first_id": first, "last_id": last}
            body = orjson.dumps(page)
        else:
            body = orjson.dumps(
                {"object": "list", "data": [_model(n, self.runtime) for n in names]}
            )
        await respond(send, 200, body, base_headers(request) + JSON_HEADERS)

    async def model(self, request: Request, send: Send, name: str) -> None:
        key = await self.runtime.keys.authenticate(request.headers)
        self.runtime.plan.router.route(name, key)  # 404 with the allowed list when not allowed
        if b"anthropic-version" in request.headers:
            body = orjson.dumps(_anthropic_model(name))
        else:
            body = orjson.dumps(_model(name, self.runtime))
        await respond(send, 200, body, base_headers(request) + JSON_HEADERS)

    async def healthz(self, request: Request, send: Send) -> None:
        await respond(send, 200, b'{"status":"ok"}', base_headers(request) + JSON_HEADERS)

    async def readyz(self, request: Request, send: Send) -> None:
        """200 while the gateway serves. The ledger database is reported, not required:
        without it rows wait in the spool (metering.spool) and requests are answered, so
        a database outage does not take every replica out of its load balancer at once.
        `?ledger=required` makes it required, for those who want that."""
        runtime = self.runtime
        problems = []
        ledger = "not open"
        if not runtime.ready:
            problems.append("gateway is starting or stopping")
        elif runtime.database is not None:
            ledger = await self._ledger.state(runtime.database)
            failing = runtime.ledger.failing_for if runtime.ledger else None
            if ledger == "reachable" and failing is not None:  # reads work, writes do not
                ledger = f"unwritable: commits failing for {failing:.0f} s"
            query = parse_qs(request.scope.get("query_string", b"").decode("latin-1"))
            if ledger != "reachable" and query.get("ledger") == ["required"]:
                problems.append(f"ledger database {ledger}")
        status = 503 if problems else 200
        body = orjson.dumps(
            {
                "status": "not ready" if problems else "ready",
                "problems": problems,
                "config_version": runtime.plan.version,
                "ledger": ledger,
                "ledger_pending_rows": runtime.ledger.pending if runtime.ledger else 0,
                # rows the spool should hold but cannot (a full disk) are in memory only
                "ledger_spool": (
                    f"unwritable: {runtime.ledger.spool_failing}"
                    if runtime.ledger and runtime.ledger.spool_failing
                    else "ok"
                ),
            }
        )
        await respond(send, status, body, base_headers(request) + JSON_HEADERS)

    async def metrics(self, request: Request, send: Send) -> None:
        """The Prometheus exposition (at /metrics and /v1/metrics); with
        `server.metrics_token` set, only for a request bearing it."""
        token = self.runtime.plan.config.server.metrics_token
        if token is not None:
            _check_metrics_token(request, token)
        # Rendered in a worker thread: a first render (or one after many new series)
        # takes ~0.3 s at 50 models x 200 keys, ~0.9 s merging two workers' files, and
        # on the event loop it would hold every request of this worker that long. In a
        # thread the loop gets the GIL back at least every switch interval (5 ms).
        body = await asyncio.to_thread(self.runtime.metrics.exposition)
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


def _anthropic_model(name: str) -> dict[str, object]:
    """A model as Anthropic's API lists it (`created_at`: unknown, so the epoch)."""
    return {"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}


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
