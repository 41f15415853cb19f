"""`metergate keys create|list|revoke`: one key per calling service."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer
from rich.table import Table

from metergate.cli.common import ConfigOption, console, errors, load_or_exit, with_database
from metergate.storage import keys as store

app = typer.Typer(help="Create, list and revoke gateway keys.", no_args_is_help=True)


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="the calling service, e.g. search-mcp")],
    models: Annotated[
        list[str] | None, typer.Option("--models", help="allowed models (repeat); all if omitted")
    ] = None,
    max_tokens_cap: Annotated[
        int | None, typer.Option("--max-tokens-cap", min=1, help="cap on max_tokens per request")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create a key. Its secret is printed once and stored only as a hash."""
    loaded = load_or_exit(config)
    unknown = [m for m in models or [] if m not in loaded.models]
    if unknown:
        errors.print(
            f"unknown model(s): {', '.join(unknown)}; configured: {', '.join(loaded.models)}"
        )
        raise typer.Exit(2)
    try:
        secret, record = with_database(
            loaded, lambda db: store.create_key(db, name, models, max_tokens_cap)
        )
    except store.KeyNameTaken:
        errors.print(f"an active key named {name!r} exists; revoke it first or pick another name")
        raise typer.Exit(2) from None
    console.print(f"created key [bold]{record.name}[/bold] ({record.id})")
    console.print("secret (shown once, store it now):")
    print(secret)


@app.command("list")
def list_(config: ConfigOption = None) -> None:
    """List keys: name, id, last four characters, allowed models, state."""
    loaded = load_or_exit(config)
    records = with_database(loaded, store.list_keys)
    table = Table("name", "id", "key", "models", "max_tokens cap", "created", "state")
    for record in records:
        table.add_row(
            record.name,
            record.id,
            f"mgk_…{record.hint}",
            ", ".join(record.models) if record.models else "all",
            str(record.max_tokens_cap or ""),
            _when(record.created_at),
            f"revoked {_when(record.revoked_at)}" if record.revoked_at else "active",
        )
    console.print(table)


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="key name or id")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key; running gateways refuse it within seconds."""
    loaded = load_or_exit(config)
    count = with_database(loaded, lambda db: store.revoke_key(db, name))
    if not count:
        errors.print(f"no active key named or with id {name!r}")
        raise typer.Exit(1)
    console.print(f"revoked {name}")


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
