"""A minimal OTLP/HTTP collector for benchmarks: accepts `POST /v1/traces` (protobuf),
counts the spans it decodes, answers `GET /count` with that number.

Run: python otlp_sink.py PORT (pinned away from the gateway's CPU by the caller).
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

_lock = threading.Lock()
_spans = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        global _spans
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with _lock:
            _spans += count
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self._answer(reply, "application/x-protobuf")

    def do_GET(self) -> None:
        self._answer(str(_spans).encode(), "text/plain")

    def _answer(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
