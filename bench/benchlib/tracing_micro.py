"""CPU per request of tracing's parts, in process (min of 5 rounds), and of the request
record with tracing and the request log off: what `bench/tracing.py` reports beside its
wrk runs, which are noisy on a shared machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource

from metergate.auth.keys import KeyRecord
from metergate.metering.meter import AttemptRecord, Meter
from metergate.metering.metrics import Metrics
from metergate.providers.base import Usage
from metergate.tracing.context import start_context
from metergate.tracing.pipeline import MAX_EXPORT_BYTES, export_parts
from metergate.tracing.spans import SpanBuilder

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "bench-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7},
    }
)
HEADERS = {b"authorization": b"Bearer mgk_x", b"content-type": b"application/json"}
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}


def _best(work: Callable[[], Any], count: int) -> float:
    """Microseconds per call, the fastest of 5 rounds."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            work()
        rounds.append((time.perf_counter() - started) / count * 1e6)
    return min(rounds)


class _NoLedger:
    def append(self, row: object) -> None:
        pass


def measure() -> dict[str, float]:
    provider = SimpleNamespace(type="openai", base_url="http://127.0.0.1:8080/v1")
    deployment: Any = SimpleNamespace(
        name="bench-upstream", model="bench-model", adapter=SimpleNamespace(config=provider)
    )
    key = KeyRecord("key_1", "bench", "hash", "abcd", None, 0.0)
    meter = Meter(Metrics(), _NoLedger())  # type: ignore[arg-type]
    builder = SpanBuilder(Resource.create({"service.name": "bench"}), False, 64 * 1024)

    def request(traced: bool) -> Any:
        log = meter.begin("req", time.perf_counter(), HEADERS)
        log.identify(key)
        log.attach(BODY)
        log.model, log.upstream, log.attempts = "bench", "bench-upstream", 1
        log.usage, log.cost_nano = Usage(11, 0, 7), 25_000
        if traced:
            log.trace = start_context(HEADERS, 1.0)
            log.steps = [AttemptRecord(deployment, log.started, 1)]
            log.response = ANSWER
        return log

    def record_off() -> None:
        meter.finish(request(False))

    def spans() -> Any:
        return builder.build(request(True), time.time(), 0.001, {})

    batch = [span for _ in range(256) for span in spans()]
    return {
        "request record and metering, tracing and request log off (µs)": _best(record_off, 20_000),
        "trace context and spans built, per sampled request (µs, event loop)": _best(spans, 10_000)
        - _best(record_off, 20_000),
        "OTLP protobuf encoding, per span (µs, export thread)": _best(
            lambda: encode_spans(batch).SerializePartialToString(), 5
        )
        / len(batch),
        "export parts: each span's size estimated, per span (µs, export thread)": _best(
            lambda: sum(1 for _ in export_parts(batch, MAX_EXPORT_BYTES)), 200
        )
        / len(batch),
    }


if __name__ == "__main__":
    for name, value in measure().items():
        print(f"{name}: {value:.1f}")
