"""metergate: one OpenAI-compatible gate that routes, meters and guards LLM and MCP traffic."""

__version__ = "0.1.0"
