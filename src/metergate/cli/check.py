"""`metergate check CONFIG` (or `-c CONFIG`): validate a config and report every problem
with its location."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metergate.cli.common import ConfigOption, console, errors, load_or_exit
from metergate.config.checks import config_warnings
from metergate.config.loader import format_path


def check(
    file: Annotated[
        Path | None,
        typer.Argument(help="the YAML config file to validate", show_default=False),
    ] = None,
    option: ConfigOption = None,
) -> None:
    """Validate a config file; exit 2 and list every problem if it is not usable.

    Warnings (an upstream without a price, an empty api_key, an MCP command not found
    here, an HTTP(S)_PROXY here that the gateway cannot use) do not fail the check.
    The file is an argument, or `-c FILE` as every other command takes it."""
    chosen = file if file is not None else option
    loaded = load_or_exit(chosen)
    config = chosen if chosen is not None else "the embedded default"
    for path, message, hint in config_warnings(loaded):
        errors.print(
            f"warning: {config}: {format_path(path)}: {message}\n    hint: {hint}",
            markup=False,
            highlight=False,
        )
    console.print(
        f"[green]ok[/green] {config}: {len(loaded.providers)} providers, "
        f"{len(loaded.upstreams)} upstreams, {len(loaded.models)} models"
    )
