"""`metergate teams create|list|update|delete`: groups of keys with budgets and rate
limits of their own, on top of each key's. Running gateways pick changes up within two
seconds. Put a key in a team with `metergate keys create --team` or `keys update --team`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from metergate.cli import common
from metergate.cli.common import ConfigOption, console, errors, load_for_ledger, with_database
from metergate.console.overview import day_and_month
from metergate.storage import teams as store
from metergate.storage.database import Database
from metergate.teams import TeamError, TeamRecord, check_change, parse_budget_option

_KEYS_SHOWN = 10  # key names per team in `teams list`; `keys list --team NAME` shows them all

app = typer.Typer(help="Create, list, change and delete teams.", no_args_is_help=True)

Budgets = Annotated[
    list[str] | None,
    typer.Option(
        "--budget",
        metavar="PERIOD:USD[:soft]",
        help="a budget per day or month, e.g. month:200 or day:10:soft (repeat)",
    ),
]
Tags = Annotated[
    list[str] | None,
    typer.Option("--tag", metavar="NAME=VALUE", help="default tag of its keys' requests (repeat)"),
]
Rpm = Annotated[int | None, typer.Option("--rpm", min=0, help="requests per minute (0: none)")]
Tpm = Annotated[int | None, typer.Option("--tpm", min=0, help="tokens per minute (0: none)")]


def _tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise TeamError(f"--tag takes NAME=VALUE (got {item!r})")
        tags[name] = value
    return tags


def _body(
    description: str | None,
    budgets: list[str] | None,
    no_budgets: bool,
    tags: list[str] | None,
    clear_tags: bool,
    rpm: int | None,
    tpm: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if description is not None:
        body["description"] = description
    if budgets or no_budgets:
        body["budgets"] = [parse_budget_option(b) for b in budgets or []]
    if tags or clear_tags:
        body["tags"] = _tags(tags or [])
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            body[name] = value or None
    return body


def _or_exit(work: Any) -> Any:
    try:
        return work()
    except TeamError as error:
        errors.print(str(error), markup=False, highlight=False)
        raise typer.Exit(2) from None


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="team name, e.g. search")],
    description: Annotated[str | None, typer.Option("--description")] = None,
    budgets: Budgets = None,
    tags: Tags = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    config: ConfigOption = None,
) -> None:
    """Create a team with its budgets, rate limits and default tags."""
    values = _or_exit(
        lambda: check_change(
            {"name": name, **_body(description, budgets, False, tags, False, rpm, tpm)},
            creating=True,
        )
    )
    loaded = load_for_ledger(config)
    try:
        record = with_database(loaded, lambda db: store.create_team(db, values))
    except store.TeamExists:
        errors.print(f"a team named {name!r} exists")
        raise typer.Exit(2) from None
    console.print(f"created team [bold]{record.name}[/bold]: {_limits(record)}")


@app.command("update")
def update(
    name: Annotated[str, typer.Argument()],
    description: Annotated[str | None, typer.Option("--description")] = None,
    budgets: Budgets = None,
    no_budgets: Annotated[bool, typer.Option("--no-budgets", help="remove its budgets")] = False,
    tags: Tags = None,
    clear_tags: Annotated[bool, typer.Option("--clear-tags", help="remove its tags")] = False,
    rpm: Rpm = None,
    tpm: Tpm = None,
    config: ConfigOption = None,
) -> None:
    """Change a team: options given replace what it had (budgets and tags as a whole)."""
    common.not_both(
        ("--budget", budgets, "--no-budgets", no_budgets),
        ("--tag", tags, "--clear-tags", clear_tags),
    )
    body = _or_exit(lambda: _body(description, budgets, no_budgets, tags, clear_tags, rpm, tpm))
    if not body:
        errors.print("nothing to change: give --budget, --rpm, --tpm, --tag or --description")
        raise typer.Exit(2)
    values = _or_exit(lambda: check_change(body, creating=False))
    loaded = load_for_ledger(config)
    record = with_database(loaded, lambda db: store.update_team(db, name, values))
    if record is None:
        errors.print(f"no team named {name!r}")
        raise typer.Exit(2)  # a name given wrong, as elsewhere
    console.print(f"updated team [bold]{record.name}[/bold]: {_limits(record)}")


@app.command("delete")
def delete(name: Annotated[str, typer.Argument()], config: ConfigOption = None) -> None:
    """Delete a team that no active key belongs to."""
    loaded = load_for_ledger(config)
    try:
        found = with_database(loaded, lambda db: store.delete_team(db, name))
    except store.TeamInUse as in_use:
        errors.print(
            f"team {name!r} still has keys: {in_use}; move them first "
            "(metergate keys update KEY --team OTHER, or --no-team)"
        )
        raise typer.Exit(2) from None
    if not found:
        errors.print(f"no team named {name!r}")
        raise typer.Exit(2)  # a name given wrong, as elsewhere
    console.print(f"deleted team {name}")


@app.command("list")
def list_(config: ConfigOption = None) -> None:
    """Teams with their keys, limits, and spend today and this month (UTC)."""
    loaded = load_for_ledger(config)
    records, keys, today, month = with_database(loaded, _overview)
    table = Table("team", "keys", "budgets", "rate limits", "tags", "today", "this month")
    for record in records:
        table.add_row(
            record.name,
            store.named_keys(*keys.get(record.name, ([], 0))),
            _budgets(record),
            _rates(record),
            ", ".join(f"{k}={v}" for k, v in record.tags),
            f"${today.get(record.name, 0) / 1e9:,.6f}",
            f"${month.get(record.name, 0) / 1e9:,.6f}",
        )
    console.print(table)


async def _overview(
    db: Database,
) -> tuple[list[TeamRecord], dict[str, tuple[list[str], int]], dict[str, int], dict[str, int]]:
    records = await store.list_teams(db)
    keys = {r.name: await store.team_keys(db, r.name, _KEYS_SHOWN) for r in records}
    today, month = await day_and_month(db, "team", time.time())
    return (
        records,
        keys,
        {name or "": g.cost_nano for name, g in today.items()},
        {name or "": g.cost_nano for name, g in month.items()},
    )


def _budgets(record: TeamRecord) -> str:
    return ", ".join(
        f"${b.limit_usd} per {b.period}{'' if b.hard else ' (soft)'}" for b in record.budgets
    )


def _rates(record: TeamRecord) -> str:
    parts = [f"{record.rpm} rpm" if record.rpm else "", f"{record.tpm} tpm" if record.tpm else ""]
    return ", ".join(p for p in parts if p)


def _limits(record: TeamRecord) -> str:
    return "; ".join(p for p in (_budgets(record), _rates(record)) if p) or "no limits"
