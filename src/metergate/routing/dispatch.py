"""Make the upstream attempt for a routed request, and account for it.

This is where attempts are counted and their time measured; retries, fallbacks and
circuit breakers extend this module, not the API handlers.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from metergate.metering.meter import RequestLog
from metergate.metering.metrics import Metrics
from metergate.providers.base import Completion, StreamState, UpstreamCall, UpstreamFailure
from metergate.routing.router import Deployment, Route

Kind = Literal["chat", "embeddings"]


class Dispatcher:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def complete(
        self, route: Route, body: dict[str, Any], log: RequestLog, kind: Kind
    ) -> tuple[Deployment, Completion]:
        deployment = route.pick()
        log.upstream = deployment.name
        log.attempts += 1
        call = UpstreamCall(body, deployment.model)
        started = time.perf_counter()
        try:
            if kind == "chat":
                result = await deployment.adapter.chat(call)
            else:
                result = await deployment.adapter.embeddings(call)
        except UpstreamFailure as failure:
            self.metrics.count_attempt(deployment.name, failure.outcome)
            raise
        finally:
            log.upstream_seconds += time.perf_counter() - started
        self.metrics.count_attempt(deployment.name, "success")
        return deployment, result

    async def open_stream(
        self,
        route: Route,
        body: dict[str, Any],
        include_usage: bool,
        state: StreamState,
        log: RequestLog,
    ) -> tuple[Deployment, AsyncIterator[bytes], bytes]:
        """Start a stream and wait for its first chunk, the last point a retry is safe."""
        deployment = route.pick()
        log.upstream = deployment.name
        log.attempts += 1
        chunks = deployment.adapter.chat_stream(
            UpstreamCall(body, deployment.model, include_usage), state
        )
        started = time.perf_counter()
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            failure = UpstreamFailure("upstream_error", "the upstream sent an empty stream")
            self.metrics.count_attempt(deployment.name, failure.outcome)
            raise failure from None
        except UpstreamFailure as failure:
            self.metrics.count_attempt(deployment.name, failure.outcome)
            raise
        finally:
            log.upstream_seconds += time.perf_counter() - started
        return deployment, chunks, first
