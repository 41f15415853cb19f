"""Configuration: schema, loading with located error reports, and the embedded default."""

from metergate.config.loader import (
    DEFAULT_CONFIG,
    ConfigError,
    ConfigProblem,
    LoadedConfig,
    load_config,
    parse_config,
    read_config,
)
from metergate.config.model import GatewayConfig

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ConfigProblem",
    "GatewayConfig",
    "LoadedConfig",
    "load_config",
    "parse_config",
    "read_config",
]
