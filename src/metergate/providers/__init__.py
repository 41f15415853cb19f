"""Provider adapters: each turns OpenAI-format requests into one provider's wire format."""

from __future__ import annotations

from metergate.config.model import ProviderConfig
from metergate.providers.base import (
    Adapter,
    Completion,
    StreamState,
    UpstreamCall,
    Usage,
)


def build_adapter(name: str, config: ProviderConfig) -> Adapter:
    """Create the adapter for a configured provider (imports only the kinds in use)."""
    if config.type == "openai":
        from metergate.providers.openai import OpenAIAdapter

        return OpenAIAdapter(name, config)
    if config.type == "anthropic":
        from metergate.providers.anthropic import AnthropicAdapter

        return AnthropicAdapter(name, config)
    if config.type == "gemini":
        from metergate.providers.gemini import GeminiAdapter

        return GeminiAdapter(name, config)
    from metergate.providers.simulated import SimulatedAdapter

    return SimulatedAdapter(name, config)


__all__ = [
    "Adapter",
    "Completion",
    "StreamState",
    "UpstreamCall",
    "Usage",
    "build_adapter",
]
