"""A streamable-HTTP MCP server traced with metergate's middleware on its own
OpenTelemetry provider, exporting OTLP to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.

Run: python traced_server.py PORT. Tools: lookup (an answer).
"""

from __future__ import annotations

import sys

from mcp.server import MCPServer
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from metergate.mcp import instrument

provider = TracerProvider(resource=Resource.create({"service.name": "traced-search"}))
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=50))
mcp = MCPServer("traced", log_level="WARNING")


@mcp.tool()
def lookup(text: str) -> str:
    """Look `text` up."""
    return f"found {text}"


instrument(mcp, tracer_provider=provider)

if __name__ == "__main__":
    mcp.run("streamable-http", port=int(sys.argv[1]))
