"""OpenTelemetry traces of the gateway's requests (`tracing:`; off by default).

When off, nothing of this package runs per request: no context is parsed, no id made,
no header built, no span object created. When on:

- `Tracing.start` reads the caller's W3C `traceparent`/`tracestate` (or starts a trace,
  sampled at `sample_rate`) when a request arrives;
- the dispatcher gives each upstream attempt a span id and sends it upstream in a
  `traceparent` (`metergate.routing.dispatch`), so the trace runs caller → gateway →
  provider;
- `Tracing.finish` builds the request's spans from its record once it ends
  (`spans.SpanBuilder`) and queues them for the exporter thread (`pipeline`).

The OpenTelemetry SDK and OTLP exporter are the optional `metergate[tracing]` extra;
this module imports them only when tracing is enabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from metergate import __version__
from metergate.config.observe import TracingConfig
from metergate.tracing.context import TraceContext, start_context

if TYPE_CHECKING:
    from metergate.metering.meter import RequestLog

log = logging.getLogger("metergate.tracing")


class Tracing:
    """The tracer of one `tracing:` config: starts contexts, turns records into spans."""

    def __init__(self, config: TracingConfig, dropped: Any) -> None:
        try:
            from metergate.tracing.pipeline import SpanPipeline
            from metergate.tracing.spans import SpanBuilder

            self.pipeline = SpanPipeline(config, dropped)
        except ImportError as error:
            extra = "tracing-grpc" if config.protocol == "grpc" else "tracing"
            raise RuntimeError(
                f"tracing is enabled but OpenTelemetry is missing ({error.name}): "
                f"pip install 'metergate[{extra}]'"
            ) from error

        self.config = config
        self.sample_rate = config.sample_rate
        self.capture_content = config.capture_content
        self.builder = SpanBuilder(
            self.pipeline.resource, config.capture_content, config.max_content_bytes
        )
        self.mcp_tracer = self.pipeline.provider.get_tracer("metergate.mcp", __version__)

    def start(self, headers: dict[bytes, bytes]) -> TraceContext:
        return start_context(headers, self.sample_rate)

    def finish(self, record: RequestLog, ts: float, duration: float, tags: dict[str, str]) -> None:
        trace = record.trace
        if trace is None or not trace.sampled:
            return
        if self.pipeline.full:  # the collector is behind: drop before building anything
            self.pipeline.dropped.inc(1 + len(record.steps or ()))
            return
        try:
            for span in self.builder.build(record, ts, duration, tags):
                self.pipeline.submit(span)
        except Exception:  # a span is never worth a request
            log.exception("could not build the spans of request %s", record.request_id)

    async def close(self) -> None:
        """Export what is queued (a few seconds at most), then stop the exporter."""
        timeout = self.config.export_timeout_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.pipeline.shutdown, timeout), timeout + 5)
