"""`metergate check CONFIG`: validate a config and report every problem with its location."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from metergate.cli.common import console, load_or_exit


def check(
    config: Annotated[Path, typer.Argument(help="the YAML config file to validate")],
) -> None:
    """Validate a config file; exit 2 and list every problem if it is not usable."""
    loaded = load_or_exit(config)
    console.print(
        f"[green]ok[/green] {config}: {len(loaded.providers)} providers, "
        f"{len(loaded.upstreams)} upstreams, {len(loaded.models)} models"
    )
