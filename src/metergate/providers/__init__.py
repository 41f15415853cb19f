"""Provider adapters: each turns OpenAI-format requests into one provider's wire format."""

from __future__ import annotations

import importlib

from metergate.config.model import ProviderConfig
from metergate.providers.base import (
    Adapter,
    Completion,
    StreamState,
    UpstreamCall,
    Usage,
)

# The optional extras a provider type needs: (module that must import, extra name).
EXTRAS: dict[str, tuple[str, str]] = {
    "bedrock": ("botocore", "bedrock"),
    "vertex": ("google.auth.transport.requests", "vertex"),
}


class MissingExtra(RuntimeError):
    """A provider type whose optional dependencies are not installed."""


def missing_extra(provider_type: str) -> str | None:
    """The pip command that installs what `provider_type` needs, None when it is there."""
    if provider_type not in EXTRAS:
        return None
    module, extra = EXTRAS[provider_type]
    try:
        importlib.import_module(module)
    except ImportError:
        return f"pip install 'metergate[{extra}]'"
    return None


def build_adapter(name: str, config: ProviderConfig) -> Adapter:
    """Create the adapter for a configured provider (imports only the kinds in use)."""
    command = missing_extra(config.type)
    if command is not None:
        raise MissingExtra(
            f"provider {name!r} is of type {config.type}, whose dependencies are not "
            f"installed: {command}"
        )
    if config.type == "openai" and config.chat_via_responses:
        from metergate.providers.responses_bridge import ResponsesBridgeAdapter

        return ResponsesBridgeAdapter(name, config)
    if config.type == "openai" and config.preset:
        from metergate.providers.compatible import PresetAdapter

        return PresetAdapter(name, config)
    if config.type == "openai":
        from metergate.providers.openai import OpenAIAdapter

        return OpenAIAdapter(name, config)
    if config.type == "azure":
        from metergate.providers.azure import AzureOpenAIAdapter

        return AzureOpenAIAdapter(name, config)
    if config.type == "bedrock":
        from metergate.providers.bedrock import BedrockAdapter

        return BedrockAdapter(name, config)
    if config.type == "vertex":
        from metergate.providers.vertex import VertexAdapter

        return VertexAdapter(name, config)
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
    "MissingExtra",
    "StreamState",
    "UpstreamCall",
    "Usage",
    "build_adapter",
    "missing_extra",
]
