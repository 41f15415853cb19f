"""The ASGI application: a route table in front of the handlers, and the lifespan.

Routing is one dict lookup on (method, path); there is no middleware stack to walk.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from metergate.api.admin import AdminHandlers
from metergate.api.admin_api import AdminApi
from metergate.api.azure_paths import PREFIXES, DeploymentRequest, deployment_route
from metergate.api.chat import ChatDoor, CompletionsHandler, EmbeddingsDoor
from metergate.api.cors import Cors
from metergate.api.doors.completions import CompletionsDoor
from metergate.api.doors.messages import (
    CountTokens,
    MessagesDoor,
    anthropic_error,
    speaks_anthropic,
)
from metergate.api.doors.responses import ResponsesDoor
from metergate.api.info import InfoHandlers
from metergate.asgi import JSON_HEADERS, Receive, Request, Scope, Send, base_headers, respond
from metergate.config import ConfigError
from metergate.config.model import CorsConfig, GatewayConfig
from metergate.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    LedgerUnavailable,
    NotFound,
    ShutDown,
)
from metergate.runtime import Runtime
from metergate.storage.database import unreachable

log = logging.getLogger("metergate")
YOUNG_GC_THRESHOLD = 10_000  # net allocations between young-generation collections

Handler = Callable[[Request, Send], Awaitable[None]]

SIGHUP_RETRY_FIRST, SIGHUP_RETRY_LONGEST = 1.0, 30.0  # seconds between a SIGHUP's tries
# Paths that answer HEAD as GET without the body (the server drops it, keeps the length).
_PROBED = ("/healthz", "/readyz", "/metrics", "/v1/metrics", "/v1/models", "/models")


class GatewayApp:
    def __init__(
        self,
        config: GatewayConfig,
        text: str | None = None,
        source: str = "<config>",
        *,
        joining: bool = False,
        host: tuple[Path, int] | None = None,
    ) -> None:
        """`text` and `source`: the config file's content and path, for config history
        and reloads; `joining` and `host`: see `Runtime`."""
        self.runtime = Runtime(config, text=text, source=source, joining=joining, host=host)
        info = InfoHandlers(self.runtime)
        admin = AdminHandlers(self.runtime)
        self._admin_api = AdminApi(self.runtime, admin.guard)  # the console and its JSON API
        self._info = info
        chat = CompletionsHandler(self.runtime, ChatDoor())
        embeddings = CompletionsHandler(self.runtime, EmbeddingsDoor())
        messages = CompletionsHandler(self.runtime, MessagesDoor())
        count_tokens = CountTokens(self.runtime)
        self.responses = ResponsesDoor(self.runtime)  # and its stored responses
        responses = CompletionsHandler(self.runtime, self.responses)
        completions = CompletionsHandler(self.runtime, CompletionsDoor())
        self._cors: tuple[CorsConfig | None, Cors | None] = (None, None)
        routes: dict[tuple[str, str], Handler] = {
            ("GET", "/healthz"): info.healthz,
            ("GET", "/readyz"): info.readyz,
            ("GET", "/metrics"): info.metrics,
            ("GET", "/v1/metrics"): info.metrics,  # where some scrape configs look for it
            ("POST", "/admin/reload"): admin.reload,
            **self._admin_api.routes(),
        }
        for prefix in ("/v1", "", *PREFIXES):  # /v1 in base_url or not; Azure's clients
            routes[("POST", f"{prefix}/chat/completions")] = chat
            routes[("POST", f"{prefix}/embeddings")] = embeddings
            routes[("POST", f"{prefix}/messages")] = messages
            routes[("POST", f"{prefix}/messages/count_tokens")] = count_tokens
            routes[("POST", f"{prefix}/responses")] = responses
            routes[("POST", f"{prefix}/completions")] = completions
            routes[("GET", f"{prefix}/models")] = info.models
        for path in _PROBED:  # health checkers and uptime monitors often send HEAD
            routes[("HEAD", path)] = routes[("GET", path)]
        if self.runtime.mcp is not None:
            self.runtime.mcp.app = self  # its `chat` tool calls /v1/chat/completions in process
            for method in ("GET", "POST", "DELETE"):
                routes[(method, "/mcp")] = self.runtime.mcp.handle
        self.routes = routes
        self.paths = {path for _, path in routes}
        self._background: set[asyncio.Task[bool]] = set()
        self._sighups = 0  # SIGHUPs received: a reload waiting for the ledger yields to a newer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.routes.get((scope["method"], scope["path"]))
            request = Request(scope, receive)
            origin = request.headers.get(b"origin")  # only browsers send it
            if origin is not None:
                cors = self._cors_policy()
                if cors is not None:
                    if scope["method"] == "OPTIONS" and (
                        b"access-control-request-method" in request.headers
                    ):
                        await cors.preflight(request, send, origin)
                        return
                    if cors.allows(origin):
                        send = cors.wrap(send, origin)
            try:
                if handler is not None:
                    await handler(request, send)
                else:
                    await self._unrouted(request, send)
            except GatewayError as error:
                await _refuse(request, send, error)
            except asyncio.CancelledError:
                # Cancelled by the server (a shutdown whose grace period ran out): the
                # caller still gets an error it can read, unless the answer had started.
                # (Model calls handle this, and a caller leaving, themselves.)
                task = asyncio.current_task()
                if task is None or task.cancelling() > 1:
                    raise
                task.uncancel()
                with contextlib.suppress(Exception):
                    await _refuse(request, send, ShutDown.of(request.id))
            except Exception as exc:
                if unreachable(exc):  # the ledger database: admin API, console, MCP tools
                    log.warning("ledger database unreachable for %s: %r", scope["path"], exc)
                    with contextlib.suppress(Exception):
                        await _refuse(request, send, LedgerUnavailable())
                    return
                log.exception("internal error serving %s %s", scope["method"], scope["path"])
                internal = InternalError(
                    f"internal gateway error; quote request id {request.id} to the operator"
                )
                with contextlib.suppress(Exception):  # unless the answer had started
                    body = internal.body()
                    await respond(send, 500, body, base_headers(request) + JSON_HEADERS)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    def _cors_policy(self) -> Cors | None:
        """The CORS policy of the config in force (None while no origin is allowed)."""
        config = self.runtime.plan.config.server.cors
        if self._cors[0] is not config:
            self._cors = (config, Cors(config) if config.allowed_origins else None)
        return self._cors[1]

    async def _unrouted(self, request: Request, send: Send) -> None:
        path: str = request.scope["path"]
        if await self._admin_api.dispatch(request, send, self.routes):  # /admin/api/keys/{id}...
            return
        deployment = deployment_route(path)
        if deployment is not None and request.scope["method"] == "POST":
            model, endpoint = deployment
            await self.routes[("POST", f"/v1/{endpoint}")](DeploymentRequest(request, model), send)
            return
        for base in ("/v1", "", *PREFIXES):
            prefix = f"{base}/models/"
            if path.startswith(prefix) and request.scope["method"] in ("GET", "HEAD"):
                await self._info.model(request, send, path.removeprefix(prefix))
                return
            prefix = f"{base}/responses/"
            if path.startswith(prefix) and len(path) > len(prefix):
                await self.responses.stored(request, send, path.removeprefix(prefix))
                return
        if path in self.paths:
            allowed = ", ".join(sorted(m for m, p in self.routes if p == path))
            raise InvalidRequest(
                f"method {request.scope['method']} is not allowed on {path}; use {allowed}",
                status=405,
                code="method_not_allowed",
                headers=[(b"allow", allowed.encode())],
            )
        hint = (  # SDKs that add /v1 themselves (Anthropic's) given a base URL ending in it
            "; drop /v1 from the client's base URL (this SDK adds it)"
            if path.startswith("/v1/v1/")
            else ""
        )
        raise NotFound(
            f"no such endpoint: {path}; the API is under /v1 "
            f"(chat/completions, responses, messages, completions, embeddings, models){hint}",
            code="unknown_endpoint",
        )

    def _reload_on_sighup(self) -> None:
        """`kill -HUP` re-reads the config file (only possible in the main thread)."""
        loop = asyncio.get_running_loop()

        def reload() -> None:
            self._sighups += 1
            task = loop.create_task(self._reload_when_the_ledger_answers(self._sighups))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_log_reload_failure)

        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, reload)

    async def _reload_when_the_ledger_answers(self, sighup: int) -> bool:
        """A SIGHUP reload needs the ledger database (it records the version); while that
        cannot be reached the reload is tried again, at growing intervals, until it
        answers: a signal has no caller to tell "try again" (the admin API answers 503).
        A newer SIGHUP takes over, re-reading the file itself."""
        wait = SIGHUP_RETRY_FIRST
        while True:
            try:
                return await self.runtime.reload_from_source("SIGHUP")
            except Exception as error:
                if not unreachable(error):
                    raise
                log.warning(
                    "config reload (SIGHUP) waits for the ledger database, which cannot be "
                    "reached (%s: %s); trying again in %.0f s",
                    type(error).__name__,
                    error,
                    wait,
                )
            await asyncio.sleep(wait)
            if sighup != self._sighups:
                return False
            wait = min(wait * 2, SIGHUP_RETRY_LONGEST)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.start()
                except Exception as exc:
                    log.exception("startup failed")
                    await self._close_after_failed_start()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._reload_on_sighup()
                self.responses.start()  # deletes stored responses past their retention
                # Everything loaded so far lives as long as the process: keep it out of
                # the collector's full passes, which otherwise stall the loop for ~50 ms.
                gc.freeze()
                # Python's young-generation pass every 700 net allocations traversed the
                # objects of every request in flight again and again: at 64 connections
                # ~29 passes per 1,000 requests, 5.3 us per request (0.13 and 0.2 with
                # 10,000; bench/gc_pauses.py). Cycles are still collected, later.
                gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.responses.close()
                await self.runtime.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _close_after_failed_start(self) -> None:
        """Stop what started before the failure: the ledger database's thread, left
        running, would keep the process from exiting, and a supervisor would see it hang
        instead of fail."""
        try:
            await self.runtime.close()
        except Exception:
            log.exception("closing after the failed start failed")
            if self.runtime.database is not None:
                with contextlib.suppress(Exception):
                    await self.runtime.database.close()


async def _refuse(request: Request, send: Send, error: GatewayError) -> None:
    headers = base_headers(request) + JSON_HEADERS + error.headers
    if _speaks_anthropic(request):  # its SDK reads only its own error shape
        await respond(send, *anthropic_error(error), headers)
    else:
        await respond(send, error.status, error.body(), headers)


def _speaks_anthropic(request: Request) -> bool:
    return speaks_anthropic(request.scope["path"], request.headers)


def _log_reload_failure(task: asyncio.Task[bool]) -> None:
    """A SIGHUP reload has no caller to answer: a refused config is logged inside, any
    other failure (the ledger unreachable while recording the version) is logged here."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, ConfigError):
        log.error("config reload (SIGHUP) failed", exc_info=error)
