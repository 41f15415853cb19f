"""Local OTLP collectors for tests: they decode the real protobuf payloads the gateway's
exporter sends (HTTP/protobuf on /v1/traces, or gRPC TraceService/Export) with the
official `opentelemetry-proto` messages, and keep every span as a plain dict."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.harness import BackgroundLoop, UpstreamServer, free_port

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict[str, Any]]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "name": span.name,
                        "kind": KINDS.get(span.kind, str(span.kind)),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                        "events": [
                            {
                                "name": e.name,
                                "time": e.time_unix_nano,
                                "attributes": {kv.key: _value(kv.value) for kv in e.attributes},
                            }
                            for e in span.events
                        ],
                        "status": STATUS.get(span.status.code, str(span.status.code)),
                        "status_message": span.status.message,
                        "scope": scope_spans.scope.name,
                        "resource": resource,
                    }
                )
    return spans


class Spans:
    """What a collector received, with a way to wait for it."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self.requests += 1
            self.spans.extend(decode(request))

    def wait(self, predicate: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll until `predicate(spans)` is true (returns the spans), or fail."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snapshot = list(self.spans)
            if predicate(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise AssertionError(f"spans did not arrive; got {[s['name'] for s in snapshot]}")
            time.sleep(0.05)

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


class HttpCollector(Spans):
    """OTLP/HTTP with protobuf bodies, as a collector's :4318 receiver speaks it."""

    def __init__(self, bg: BackgroundLoop) -> None:
        super().__init__()
        self.content_types: list[str] = []

        async def traces(request: web.Request) -> web.Response:
            self.content_types.append(request.headers.get("content-type", ""))
            message = trace_service_pb2.ExportTraceServiceRequest()
            message.ParseFromString(await request.read())
            self.add(message)
            reply = trace_service_pb2.ExportTraceServiceResponse()
            body = reply.SerializeToString()
            return web.Response(body=body, content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self.server = UpstreamServer(bg, app)
        self.endpoint = f"{self.server.url}/v1/traces"

    def close(self) -> None:
        self.server.close()


class GrpcCollector(Spans):
    """OTLP/gRPC: the TraceService a collector's :4317 receiver implements."""

    def __init__(self) -> None:
        super().__init__()
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                collector.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        import grpc

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        port = free_port()
        self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.stop(0)


class SilentCollector:
    """A collector that is down in the worst way: it accepts connections and never
    answers, so every export waits until its timeout."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.bg = bg
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self.connections = 0
        self._held: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._held.append(writer)

        async def start() -> asyncio.Server:
            return await asyncio.start_server(hold, "127.0.0.1", self.port)

        self.server = bg.run(start())

    def close(self) -> None:
        async def stop() -> None:
            for writer in self._held:
                writer.close()
            self.server.close()

        self.bg.run(stop())
