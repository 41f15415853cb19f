"""Record one finished request everywhere it must appear: metrics, cost, ledger.

The handler fills a `RequestLog` as the request moves along; `Meter.finish` is the one
place that turns it into metric samples and a ledger row, so the two always agree.
"""

from __future__ import annotations

import time

from metergate.metering.ledger import LedgerRow, LedgerWriter
from metergate.metering.metrics import NO_UPSTREAM, UNKNOWN_KEY, UNKNOWN_MODEL, Metrics
from metergate.metering.pricing import nano_to_usd
from metergate.providers.base import Usage


class RequestLog:
    """Everything known about one request by the time it ends."""

    __slots__ = (
        "affinity",
        "api",
        "attempt_seconds",
        "attempts",
        "cache_hit",
        "cost_nano",
        "key",
        "model",
        "outcome",
        "request_id",
        "saved_nano",
        "started",
        "status",
        "stream",
        "ttft",
        "upstream",
        "upstream_seconds",
        "usage",
        "usage_estimated",
    )

    def __init__(self, request_id: str, started: float) -> None:
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
        self.affinity: str | None = None  # sticky rollout side: key name or header value
        self.attempt_seconds = 0.0  # the last attempt, up to its answer or first chunk
        self.api = "chat"  # the door it came in by: chat, responses, messages, completions, ...


class Meter:
    def __init__(self, metrics: Metrics, ledger: LedgerWriter | None) -> None:
        self.metrics = metrics
        self.ledger = ledger

    def finish(self, log: RequestLog) -> None:
        duration = time.perf_counter() - log.started
        labels = (log.model, log.upstream, log.key)
        series = self.metrics.series(*labels)
        self.metrics.count_request(series, labels, log.outcome, log.api)
        series.duration.observe(duration)
        if log.ttft is not None:
            series.ttft.observe(log.ttft)
        if log.attempts:
            self.metrics.overhead.observe(max(0.0, duration - log.upstream_seconds))
        usage = log.usage or _NO_USAGE
        if usage.input_tokens:
            series.tokens[0].inc(usage.input_tokens)
        if usage.cached_input_tokens:
            series.tokens[1].inc(usage.cached_input_tokens)
        if usage.output_tokens:
            series.tokens[2].inc(usage.output_tokens)
        if log.cost_nano:
            series.cost.inc(nano_to_usd(log.cost_nano))
        if self.ledger is not None and log.key is not UNKNOWN_KEY:
            # Unauthenticated requests are counted in metrics only: a flood of bad keys
            # must not be able to fill the ledger's disk.
            self.ledger.append(
                LedgerRow(
                    time.time(),
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
                )
            )


_NO_USAGE = Usage()
