"""Import-string entry point for servers that start their own worker processes."""

from __future__ import annotations

import os

from metergate.api.app import GatewayApp
from metergate.config import read_config


def create_app() -> GatewayApp:
    """Build the app from METERGATE_CONFIG (the embedded default when unset)."""
    loaded = read_config(os.environ.get("METERGATE_CONFIG") or None)
    return GatewayApp(loaded.config, loaded.text, loaded.source)
