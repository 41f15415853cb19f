"""The HTTP API: OpenAI-compatible endpoints plus health and metrics (see `api.app`)."""
