"""What watches finished requests besides metrics and the ledger: the tracer, the request
log and the tag labels, built from a config's `tracing:`, `request_log:` and `tags:`
sections and swapped on a reload when those sections change.
"""

from __future__ import annotations

import asyncio
import logging

from metergate.config.model import GatewayConfig
from metergate.config.secrets import without_password
from metergate.metering.meter import Meter
from metergate.metering.tags import TagLabels
from metergate.requestlog import RequestRecorder
from metergate.storage.database import Database
from metergate.tracing import Tracing

log = logging.getLogger("metergate")


class Observers:
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.config: GatewayConfig | None = None
        self.tracing: Tracing | None = None
        self.recorder: RequestRecorder | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def apply(self, config: GatewayConfig, database: Database | None) -> None:
        """Install the sections of `config`; what did not change keeps running."""
        old = self.config
        tracing, recorder = self.tracing, self.recorder
        retired: list[Tracing | RequestRecorder] = []
        if old is None or old.tracing != config.tracing:
            if tracing is not None:
                retired.append(tracing)
            tracing = (
                Tracing(config.tracing, self.meter.metrics.trace_spans_dropped)
                if config.tracing.enabled
                else None
            )
        if old is None or old.request_log != config.request_log:
            if recorder is not None:
                retired.append(recorder)
            recorder = None
            if config.request_log.enabled:
                recorder = RequestRecorder(config.request_log, self.meter.metrics, database)
                await recorder.start()
        labels = self.meter.tag_labels
        if old is None or old.tags != config.tags:
            labels = TagLabels(config.tags)
        self.config, self.tracing, self.recorder = config, tracing, recorder
        self.meter.observe(tracing, recorder, labels)
        for part in retired:  # after the swap (a collector that is down must not hold it)
            task = asyncio.create_task(part.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if tracing is not None and (old is None or old.tracing != config.tracing):
            log.info(
                "tracing: exporting OTLP (%s) to %s",
                config.tracing.protocol,
                without_password(config.tracing.endpoint),
            )

    def mcp_tracer(self) -> object | None:
        """The tracer of the MCP spans, while tracing is on."""
        return self.tracing.mcp_tracer if self.tracing is not None else None

    async def close(self) -> None:
        self.meter.observe(None, None, None)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=10)
        for part in (self.recorder, self.tracing):
            if part is not None:
                await part.close()
        self.tracing = self.recorder = None
