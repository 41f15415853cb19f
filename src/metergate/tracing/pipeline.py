"""The export side of tracing: OpenTelemetry's SDK batch processor and OTLP exporter.

Spans go into a bounded queue and a background thread exports them in batches
(`BatchSpanProcessor`), so a request never waits on the collector. The bound is kept
here, in front of the SDK's own queue: when `max_queue_size` spans are waiting or being
exported, a new span is dropped and counted in `metergate_trace_spans_dropped_total`
instead of displacing an older one with a warning per span; a batch the collector
refuses, or cannot take in `export_timeout_seconds` (retries included), is counted
there too. A batch is sent in parts of at most `MAX_EXPORT_BYTES`, so that a batch
of large spans (captured content, many tags, a large `max_export_batch_size`) is not
refused whole by a collector's request limit. Importing this module needs the
`metergate[tracing]` extra.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from metergate import __version__
from metergate.config.observe import TracingConfig
from metergate.config.secrets import url_secrets

log = logging.getLogger("metergate.tracing")

SCOPE = InstrumentationScope("metergate", __version__)

# One export request's spans, estimated as encoded: under the 4 MiB a gRPC server takes
# by default (the OpenTelemetry Collector's OTLP receivers: 4 MiB gRPC, 20 MiB HTTP).
MAX_EXPORT_BYTES = 3 * 1024 * 1024
_SPAN_BYTES = 256  # ids, times, name, kind, status: what a span costs beyond attributes
_ATTRIBUTE_BYTES = 96  # an attribute's key and framing (`metergate.tag.<name>`: up to 78)


def build_exporter(config: TracingConfig) -> SpanExporter:
    headers = {name: value.get_secret_value() for name, value in config.headers.items()}
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(
            endpoint=config.endpoint,
            insecure=config.endpoint.startswith("http://"),
            headers=headers or None,
            timeout=config.export_timeout_seconds,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=config.endpoint, headers=headers or None, timeout=config.export_timeout_seconds
    )


class _WithoutSecrets(logging.Filter):
    """Masks the endpoint's secrets in the exporter's log lines: a failed export names
    its URL, query string (a collector's `?token=`) included."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        trace = record.exc_text or ""
        if record.exc_info and not trace:
            trace = logging.Formatter().formatException(record.exc_info)
        if any(secret in message or secret in trace for secret in self.secrets):
            for secret in self.secrets:
                message, trace = message.replace(secret, "***"), trace.replace(secret, "***")
            record.msg, record.args = message, None
            record.exc_text = trace or None  # a handler prints this in place of exc_info
        return True


def _exporter_loggers(exporter: SpanExporter) -> list[logging.Logger]:
    """The loggers an exporter writes to: its classes' modules' (the SDK logs by module)."""
    modules = {cls.__module__ for cls in type(exporter).__mro__}
    return [log, *(logging.getLogger(name) for name in sorted(modules) if "." in name)]


class _Counting(SpanExporter):
    """Wraps the exporter: counts what left the queue, and what never reached the collector."""

    def __init__(self, inner: SpanExporter, pipeline: SpanPipeline) -> None:
        self.inner = inner
        self.pipeline = pipeline
        self.stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send the batch in parts a collector takes; after a part fails, the rest of
        the batch is dropped rather than waiting on the collector again."""
        failed = False
        for part in export_parts(spans, MAX_EXPORT_BYTES):
            result = SpanExportResult.FAILURE
            try:
                if not failed:
                    result = self.inner.export(part)
            except Exception:
                log.exception("exporting %d spans failed", len(part))
            finally:
                self.pipeline.exported(len(part), result is SpanExportResult.SUCCESS)
            failed = result is not SpanExportResult.SUCCESS
        return SpanExportResult.FAILURE if failed else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Stop the exporter: a retry in progress gives up, later exports fail at once."""
        if not self.stopped:
            self.stopped = True
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def export_parts(spans: Sequence[ReadableSpan], limit: int) -> Iterator[Sequence[ReadableSpan]]:
    """Consecutive parts of `spans` of at most `limit` estimated bytes each (a span
    larger than that goes alone)."""
    start, size = 0, 0
    for index, span in enumerate(spans):
        weight = span_bytes(span)
        if size + weight > limit and index > start:
            yield spans[start:index]
            start, size = index, 0
        size += weight
    if start < len(spans):
        yield spans[start:] if start else spans


def span_bytes(span: ReadableSpan) -> int:
    """An upper estimate of a span's encoded size: a fixed cost per span and attribute
    (keys are short), plus the attributes' text. Cheap, as it runs for every span."""
    attributes = span.attributes
    if not attributes:
        return _SPAN_BYTES
    size = _SPAN_BYTES + _ATTRIBUTE_BYTES * len(attributes)
    for value in attributes.values():
        if value.__class__ is str:
            size += len(value) if value.isascii() else 4 * len(value)
        elif value.__class__ is tuple or value.__class__ is list:
            size += sum(len(item) + 8 if item.__class__ is str else 16 for item in value)
    return size


class SpanPipeline:
    """A bounded queue of finished spans and the thread that exports them."""

    def __init__(self, config: TracingConfig, dropped: Any) -> None:
        self.config = config
        self.dropped = dropped  # the Prometheus counter
        host = socket.gethostname()
        self.resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": __version__,
                # which replica and worker: built in each worker, after the fork
                "service.instance.id": f"{host}:{os.getpid()}",
                "host.name": host,
                "process.pid": os.getpid(),
                **config.resource_attributes,
            }
        )
        # Written by one thread each (submit: the event loop; exported: the export
        # thread), so their difference is what waits, without a lock on the hot path.
        self._submitted = itertools.count(1)
        self._last_submitted = 0
        self._finished = 0
        inner = build_exporter(config)
        self.exporter = _Counting(inner, self)
        secrets = url_secrets(config.endpoint)
        mask = _WithoutSecrets(secrets)
        self._masked = _exporter_loggers(inner) if secrets else []
        for logger in self._masked:
            logger.addFilter(mask)
        self._mask = mask
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=config.max_queue_size,
            schedule_delay_millis=config.export_interval_seconds * 1000,
            max_export_batch_size=min(config.max_export_batch_size, config.max_queue_size),
            export_timeout_millis=config.export_timeout_seconds * 1000,
        )
        self.provider = TracerProvider(
            resource=self.resource, sampler=ParentBasedTraceIdRatio(config.sample_rate)
        )
        self.provider.add_span_processor(_Bounded(self))

    @property
    def full(self) -> bool:
        return self._last_submitted - self._finished >= self.config.max_queue_size

    def submit(self, span: ReadableSpan) -> None:
        """Queue a finished span, or drop and count it when the queue is full."""
        if self.full:
            self.dropped.inc()
            return
        self._last_submitted = next(self._submitted)
        self.processor.on_end(span)

    def exported(self, count: int, ok: bool) -> None:
        self._finished += count
        if not ok:
            self.dropped.inc(count)

    @property
    def waiting(self) -> int:
        return self._last_submitted - self._finished

    def shutdown(self, timeout_seconds: float) -> None:
        """Export what is queued, for at most `timeout_seconds`, then stop; what is left
        unexported is counted as dropped. Blocking: run it in a thread."""
        flusher = threading.Thread(target=self.processor.force_flush, daemon=True)
        flusher.start()
        flusher.join(timeout_seconds)
        self.exporter.shutdown()  # a collector that is down: its retries give up now
        flusher.join(1.0)
        self.processor.shutdown()
        left = self.waiting
        if left > 0:
            self.dropped.inc(left)
            self._finished += left
        for logger in self._masked:
            logger.removeFilter(self._mask)


class _Bounded(SpanProcessor):
    """Spans the SDK's own tracer makes (the MCP spans) take the same bounded path."""

    def __init__(self, pipeline: SpanPipeline) -> None:
        self.pipeline = pipeline

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.pipeline.submit(span)
