"""Record one finished request everywhere it must appear: metrics, cost, ledger, and
(when configured) its trace and its request log record.

The handler fills a `RequestLog` as the request moves along (`Meter.begin`, then
`identify`, `attach`, `fail`; the dispatcher adds its attempts); `Meter.finish` is the
one place that turns it into metric samples and a ledger row, so the two always agree.
Spans and request log records are made from the same record, after the fact, and
handed to background writers: with tracing and the request log off, a request carries
no trace context, no attempt list and no captured body.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from metergate.config.model import KeyLabel
from metergate.errors import GatewayError
from metergate.metering import tags as tagging
from metergate.metering.ledger import LedgerRow, LedgerWriter
from metergate.metering.metrics import ALL_KEYS, NO_UPSTREAM, UNKNOWN_KEY, UNKNOWN_MODEL, Metrics
from metergate.metering.pricing import nano_to_usd
from metergate.providers.base import Usage
from metergate.providers.http import answered_status

if TYPE_CHECKING:
    from metergate.auth.keys import KeyRecord
    from metergate.routing.router import Deployment
    from metergate.tracing.context import TraceContext


class AttemptRecord:
    """One upstream attempt as the trace and the request log show it."""

    __slots__ = ("deployment", "ended", "error", "outcome", "span_id", "started", "status")

    def __init__(self, deployment: Deployment, started: float, span_id: int = 0) -> None:
        self.deployment = deployment
        self.started = started  # perf_counter
        self.ended = started
        self.outcome = "success"
        self.error: str | None = None
        self.status: int | None = None  # the upstream's HTTP status, when it answered one
        self.span_id = span_id  # its span, named in the traceparent sent upstream
        answered_status.set(None)  # not an earlier attempt's

    def end(self, error: BaseException | None) -> None:
        self.ended = time.perf_counter()
        if error is None:
            self.status = answered_status.get()
            return
        if isinstance(error, GatewayError):
            self.outcome, self.error, self.status = (
                error.outcome,
                error.message,
                error.upstream_status,
            )
        else:
            self.outcome, self.error = "cancelled", "the caller went away"


class RequestLog:
    """Everything known about one request by the time it ends."""

    __slots__ = (
        "affinity",
        "api",
        "attempt_seconds",
        "attempts",
        "body",
        "body_bytes",
        "cache_hit",
        "capture",
        "cost_nano",
        "ended",
        "failure",
        "gone",
        "headers",
        "key",
        "key_tags",
        "model",
        "operation",
        "outcome",
        "prompt",
        "raw",
        "request_id",
        "response",
        "saved_nano",
        "started",
        "status",
        "steps",
        "stream",
        "tags",
        "team",
        "trace",
        "ttft",
        "upstream",
        "upstream_headers",
        "upstream_seconds",
        "usage",
        "usage_estimated",
    )

    def __init__(
        self, request_id: str, started: float, headers: dict[bytes, bytes] | None = None
    ) -> None:
        self.request_id = request_id
        self.started = started
        self.key = UNKNOWN_KEY
        self.model = UNKNOWN_MODEL
        self.upstream = NO_UPSTREAM
        self.outcome = "success"
        self.status = 200
        self.attempts = 0
        self.usage: Usage | None = None
        self.usage_estimated = False  # the gateway's bound (a cut stream), not the upstream's
        self.cost_nano = 0
        self.saved_nano = 0
        self.ttft: float | None = None
        self.upstream_seconds = 0.0
        self.cache_hit = False
        self.stream = False
        self.gone = False  # the caller left before its answer was complete
        self.ended: float | None = None  # settled at (time.time()): its ledger row's ts
        self.affinity: str | None = None  # sticky rollout side: key name or header value
        self.attempt_seconds = 0.0  # the last attempt, up to its answer or first chunk
        self.api = "chat"  # the door it came in by: chat, responses, messages, completions, ...
        self.headers = headers
        self.body: dict[str, Any] | None = None
        self.body_bytes = 0  # its size as received (what a queued record holds of it)
        self.raw = b""  # the body as received, for the request log (b"": none read)
        self.team: str | None = None
        self.key_tags: tuple[tuple[str, str], ...] = ()
        self.tags: dict[str, str] | None = None  # the request's own (header, metadata)
        self.operation = "chat"
        self.failure: GatewayError | None = None
        # Filled only when tracing or the request log is on (`Meter.begin`):
        self.trace: TraceContext | None = None
        self.steps: list[AttemptRecord] | None = None  # every attempt, in order
        self.capture = False  # keep the whole answer the caller got (`response`)
        self.response: bytes | None = None
        self.prompt: dict[str, Any] | None = None  # the request in chat terms, as sent on
        self.upstream_headers = b""  # header lines for the attempt being made

    def identify(self, key: KeyRecord) -> None:
        """The caller is known: its key's name, team and default tags."""
        self.key = key.name
        self.team = key.team
        self.key_tags = key.tags

    def attach(self, body: dict[str, Any], raw: bytes) -> None:
        """The body is parsed: read the request's tags (a 400 when they are malformed)."""
        self.body, self.raw, self.body_bytes = body, raw, len(raw)
        tags = tagging.request_tags(self.headers, body)
        if tags:
            self.tags = tags

    def fail(self, error: GatewayError) -> None:
        self.outcome, self.status, self.failure = error.request_outcome, error.status, error


class Answered:
    """What a stream sent its caller, as the door relayed it, kept for the request log and
    spans (only of requests whose content is captured) up to `LIMIT`: the request log cuts
    bodies at a few MiB at most."""

    LIMIT = 16 * 1024 * 1024
    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        if self.size < self.LIMIT:
            self.parts.append(data)
            self.size += len(data)

    def body(self) -> bytes:
        return b"".join(self.parts)


class Observer(Protocol):
    """A background consumer of finished requests: the tracer, the request log."""

    def finish(self, log: RequestLog, ts: float, duration: float, tags: dict[str, str]) -> None:
        """Take the record; never block, never raise."""


class Meter:
    def __init__(self, metrics: Metrics, ledger: LedgerWriter | None) -> None:
        self.metrics = metrics
        self.ledger = ledger
        self.tracing: Any = None  # metergate.tracing.Tracing, when `tracing.enabled`
        self.recorder: Any = None  # metergate.requestlog.RequestRecorder, when enabled
        self.tag_labels: tagging.TagLabels | None = None
        self.team_tags: dict[str, tuple[tuple[str, str], ...]] = {}  # team -> default tags
        self.key_label: KeyLabel = "name"  # `server.metrics_key_label`
        self._observers: tuple[Observer, ...] = ()

    def observe(self, tracing: Any, recorder: Any, tag_labels: tagging.TagLabels | None) -> None:
        """Install (or remove, with None) the tracer, the request log and tag labels."""
        self.tracing, self.recorder = tracing, recorder
        self.tag_labels = tag_labels if tag_labels else None
        self._observers = tuple(o for o in (tracing, recorder) if o is not None)

    def begin(
        self, request_id: str, started: float, headers: dict[bytes, bytes] | None = None
    ) -> RequestLog:
        """The record of a request that just arrived (its trace, when tracing is on)."""
        log = RequestLog(request_id, started, headers)
        if self._observers:
            log.steps = []
            tracing, recorder = self.tracing, self.recorder
            if tracing is not None:
                log.trace = tracing.start(headers or {})
                log.capture = tracing.capture_content and log.trace.sampled
            if recorder is not None and recorder.wants():
                log.capture = True
        return log

    def finish(self, log: RequestLog) -> None:
        duration = time.perf_counter() - log.started
        usage = log.usage or _NO_USAGE
        tags = self._tags(log)
        # dated when it was settled: spend kept through a Redis outage is dated alike
        now = time.time() if log.ended is None else log.ended
        if self.ledger is not None and log.key is not UNKNOWN_KEY:
            # Unauthenticated requests are counted in metrics only: a flood of bad keys
            # must not be able to fill the ledger's disk. The row goes first: a metric
            # that cannot be written (a full disk under the workers' files) loses no row.
            self.ledger.append(
                LedgerRow(
                    now,
                    log.request_id,
                    log.key,
                    log.model,
                    log.upstream,
                    log.attempts,
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.output_tokens,
                    log.cost_nano,
                    log.saved_nano,
                    duration * 1000,
                    None if log.ttft is None else log.ttft * 1000,
                    log.outcome,
                    log.status,
                    int(log.cache_hit),
                    int(log.stream),
                    int(log.usage_estimated),
                    log.api,
                    log.team,
                    orjson.dumps(tags).decode() if tags else None,
                )
            )
        key = log.key
        if self.key_label != "name" and key is not UNKNOWN_KEY:
            key = (log.team or ALL_KEYS) if self.key_label == "team" else ALL_KEYS
        labels = (log.model, log.upstream, key)
        series = self.metrics.series(*labels)
        self.metrics.count_request(series, labels, log.outcome, log.api)
        series.duration.observe(duration)
        if log.ttft is not None:
            series.ttft.observe(log.ttft)
        if log.attempts:
            self.metrics.observe_overhead(max(0.0, duration - log.upstream_seconds))
        if usage.input_tokens:
            series.tokens[0].inc(usage.input_tokens)
        if usage.cached_input_tokens:
            series.tokens[1].inc(usage.cached_input_tokens)
        if usage.output_tokens:
            series.tokens[2].inc(usage.output_tokens)
        if log.cost_nano:
            series.cost.inc(nano_to_usd(log.cost_nano))
        if log.team is not None and log.cost_nano:
            self.metrics.team_cost(log.team).inc(nano_to_usd(log.cost_nano))
        if tags and self.tag_labels is not None:
            for name, value in self.tag_labels.labels(tags):
                self.metrics.count_tag(name, value, log.cost_nano)
        for observer in self._observers:
            observer.finish(log, now, duration, tags)

    def _tags(self, log: RequestLog) -> dict[str, str]:
        """Team defaults < key defaults < the request's own tags."""
        team = self.team_tags.get(log.team) if log.team is not None else None
        if not (team or log.key_tags or log.tags):
            return _NO_TAGS
        return tagging.merge(dict(team or ()), dict(log.key_tags), log.tags)


_NO_USAGE = Usage()
_NO_TAGS: dict[str, str] = {}
