"""Make the upstream attempts for a routed request: retries, fallbacks, circuit breakers.

For one request: try the model's deployments (least loaded first, skipping open
circuits), retry retryable failures with backoff while the retry budget allows, then
move down the model's fallback chain. A caller's own mistake (a 4xx the provider
blames on the request) is never retried nor sent elsewhere, and neither is a failure
after part of the answer arrived (the upstream did the work). Streams are retried only
until their first chunk: once a byte has reached the caller, a failure is final. No
attempt is made once the caller has left (`RequestLog.gone`). While a rollout is in
progress, its last stage (100 %) included, a candidate's failure that is not final is
always tried again on the baseline (whatever the model's `retry_on`), and a request the
candidate's open circuits turn away is served by the baseline (`Route.pick`); once the
rollout completes the baseline serves nothing.

Every attempt is counted by outcome and timed. Only what the upstream did is reported
to its circuit breaker and rollout statistics: a failure of the gateway itself (a full
connection pool, a request it could not encode, a bug) is final, counted as
`gateway_error`, and leaves the upstream's health untouched (`metergate.errors`). A
request turned away by the candidate's open circuits counts in the rollout statistics
as a failed candidate attempt (what the candidate did opened them). A rollout is judged
on its own model's attempts only: another model served by the same upstreams (its
callers' mistakes, its load) says nothing about this move.

When the request is traced or logged (`RequestLog.steps` is a list), each attempt is
also recorded there, gets its own span id, and sends the upstream a `traceparent` that
names it. The answer itself is kept by the handler, as its caller gets it in the door's
shape (`RequestLog.response`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

from metergate.errors import (
    ClientGone,
    GatewayError,
    InternalError,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamServerError,
    is_final,
)
from metergate.metering.meter import AttemptRecord, RequestLog
from metergate.metering.metrics import Metrics
from metergate.providers.base import Completion, NativeRequest, StreamState, UpstreamCall
from metergate.routing.circuit import CLOSED, HALF_OPEN, OPEN
from metergate.routing.retry import RetryBudget, backoff_seconds
from metergate.routing.router import Deployment, Route, any_untried
from metergate.tracing.context import new_span_id

Kind = Literal["chat", "embeddings"]
T = TypeVar("T")
Attempt = Callable[[Deployment], Awaitable[T]]


class Dispatcher:
    def __init__(self, metrics: Metrics, retry_budget: RetryBudget) -> None:
        self.metrics = metrics
        self.retry_budget = retry_budget

    async def complete(
        self,
        route: Route,
        body: dict[str, Any],
        log: RequestLog,
        kind: Kind,
        native: NativeRequest | None = None,
    ) -> tuple[Deployment, Completion]:
        """`native`: the caller's own request, for deployments whose adapter speaks its
        protocol (their answer is then in that protocol, not OpenAI chat)."""

        async def attempt(deployment: Deployment) -> Completion:
            call = UpstreamCall(
                body,
                deployment.model,
                timeouts=deployment.timeouts,
                extra_headers=log.upstream_headers,
            )
            if native is not None:
                call.native = native.served_by(deployment.adapter)
            if kind == "chat":
                return await deployment.adapter.chat(call)
            return await deployment.adapter.embeddings(call)

        log.operation = kind
        deployment, _, completion = await self._run(route, log, attempt, keep_open=False)
        return deployment, completion

    async def open_stream(
        self,
        route: Route,
        body: dict[str, Any],
        include_usage: bool,
        state: StreamState,
        log: RequestLog,
        native: NativeRequest | None = None,
    ) -> tuple[Deployment, Route, AsyncIterator[bytes], bytes]:
        """Start a stream and wait for its first chunk, the last point a retry is safe.

        The attempt stays open: call `stream_finished` with the deployment and the route
        (`route` or a fallback) that serve it when the stream ends.
        """

        async def attempt(deployment: Deployment) -> tuple[AsyncIterator[bytes], bytes]:
            call = UpstreamCall(
                body,
                deployment.model,
                include_usage,
                deployment.timeouts,
                extra_headers=log.upstream_headers,
            )
            if native is not None:
                call.native = native.served_by(deployment.adapter)
            chunks = deployment.adapter.chat_stream(call, state)
            try:
                return chunks, await anext(chunks)
            except StopAsyncIteration:
                raise UpstreamProtocolError("the upstream sent an empty stream") from None
            except asyncio.CancelledError:  # the request ends here: what its opening
                await chunks.aclose()  # type: ignore[attr-defined]  # reported is billed
                raise
            except BaseException:
                await chunks.aclose()  # type: ignore[attr-defined]
                state.forget()
                raise

        deployment, served, (chunks, first) = await self._run(route, log, attempt, True)
        return deployment, served, chunks, first

    def stream_finished(
        self,
        deployment: Deployment,
        served: Route,
        error: BaseException | None,
        log: RequestLog,
    ) -> None:
        """Account for a stream's attempt, however it ended (`error` None: completely)."""
        if log.steps:
            log.steps[-1].end(error)
        self._account(deployment, served, error, log.attempt_seconds)

    async def _run(
        self, route: Route, log: RequestLog, attempt: Attempt[T], keep_open: bool
    ) -> tuple[Deployment, Route, T]:
        """The deployment that answered, the route it served for (`route` or one of its
        fallbacks), and its answer."""
        self.retry_budget.on_request()
        failure: GatewayError | None = None
        origin: str | None = None  # the first deployment chosen: "from" of a fallback
        for position, current in enumerate((route, *route.fallbacks)):
            policy = current.config.retry
            tried: set[str] = set()
            retries = 0
            while (deployment := current.pick(tried, log.affinity)) is not None:
                if log.gone:  # told by the HTTP protocol: no attempt for a caller that left
                    deployment.breaker.release()  # the half-open probe slot `pick` took
                    raise ClientGone("the caller closed the connection before its answer")
                if origin is None:
                    origin = deployment.name
                elif position and not tried:
                    self.metrics.fallbacks.labels(route.name, origin, deployment.name).inc()
                tried.add(deployment.name)
                try:
                    done = await self._attempt(deployment, current, attempt, log, keep_open)
                    return deployment, current, done
                except GatewayError as error:
                    failure = error
                if is_final(failure):  # the caller's fault, the gateway's, or work done
                    raise failure
                if current.baseline_after(deployment, tried):
                    # A bad candidate is not the caller's to pay for: the baseline serves
                    # it, whatever the model's retry_on, outside max_retries and the retry
                    # budget (the baseline gets at most the traffic it had before the
                    # rollout). retry_on chooses what is retried on the same deployments;
                    # what it leaves out still goes on to fallbacks, and the baseline is
                    # the model's own deployment from before the rollout.
                    continue
                if failure.outcome not in policy.retry_on:
                    break
                if retries >= policy.max_retries:
                    break
                wait: float | None = 0.0
                if not any_untried(current.serving(), tried):
                    wait = backoff_seconds(policy, retries, failure.retry_after)
                # Budget is spent only on a retry that will be made (not on a too-long Retry-After).
                if wait is None or not self.retry_budget.try_spend():
                    break
                retries += 1
                if wait:
                    await asyncio.sleep(wait)
            if origin is None:
                origin = current.serving()[0].name
        raise failure or _no_upstream(route)

    async def _attempt(
        self,
        deployment: Deployment,
        route: Route,
        attempt: Attempt[T],
        log: RequestLog,
        keep_open: bool,
    ) -> T:
        log.upstream = deployment.name
        log.attempts += 1
        deployment.in_flight += 1
        started = time.perf_counter()
        error: BaseException | None = None
        record = None
        if log.steps is not None:
            record = _record(deployment, started, log)
        try:
            return await attempt(deployment)
        except GatewayError as failure:
            error = failure
            raise
        except Exception as exc:
            # A bug of the gateway or an adapter (say, a body it cannot encode): final,
            # and never the upstream's fault.
            error = InternalError(
                f"internal gateway error; quote request id {log.request_id} to the operator"
            )
            raise error from exc
        except BaseException as exc:  # cancelled: the caller went away
            error = exc
            raise
        finally:
            log.attempt_seconds = time.perf_counter() - started
            log.upstream_seconds += log.attempt_seconds
            if not keep_open or error is not None:
                if record is not None:
                    record.end(error)
                self._account(deployment, route, error, log.attempt_seconds)

    def _account(
        self, deployment: Deployment, route: Route, error: BaseException | None, seconds: float
    ) -> None:
        """Count the attempt; judge the upstream only by what it did (success or an
        upstream failure), never by the caller's mistakes or the gateway's own; and the
        rollout of the model it served, if any, by this attempt."""
        deployment.in_flight -= 1
        if error is None:
            outcome = "success"
        elif isinstance(error, GatewayError):
            outcome = error.outcome
        else:
            outcome = "cancelled"  # CancelledError: the caller went away
        self.metrics.count_attempt(deployment.name, outcome)
        if error is not None and not isinstance(error, UpstreamFailure):
            deployment.breaker.release()  # a half-open probe slot, if it held one
            return
        deployment.breaker.record(outcome)
        if route.rollout is not None:
            route.rollout.observe(deployment.name, outcome, seconds)


def _record(deployment: Deployment, started: float, log: RequestLog) -> AttemptRecord:
    """Note an attempt in the request's record; when traced, name its span upstream."""
    assert log.steps is not None
    trace = log.trace
    if trace is None:
        record = AttemptRecord(deployment, started)
    else:
        record = AttemptRecord(deployment, started, new_span_id())
        log.upstream_headers = trace.outgoing(record.span_id)
    log.steps.append(record)
    return record


def _no_upstream(route: Route) -> UpstreamFailure:
    """No deployment of the model or its fallbacks lets a request through: their
    circuits are open, or half-open with every probe slot taken by a request in flight
    (the one that frees first decides), or their weight is 0."""
    deployments = [d for r in (route, *route.fallbacks) for d in r.serving()]
    wait = max(1.0, min(d.breaker.retry_in() for d in deployments))
    by_state: dict[int, list[str]] = {}
    for deployment in deployments:
        by_state.setdefault(deployment.breaker.state, []).append(deployment.name)
    reasons = [
        f"{what} for {', '.join(by_state[state])}"
        for state, what in (
            (OPEN, "circuits open"),
            (HALF_OPEN, "circuits half-open with every probe in flight"),
            (CLOSED, "weight 0"),
        )
        if state in by_state
    ]
    return UpstreamServerError(
        f"no upstream can serve model {route.name!r} now: {'; '.join(reasons)}; "
        f"retry in {wait:.0f}s",
        status=503,
        retry_after=wait,
    )
