"""`metergate keys create|list|update|revoke`: one key per calling service, in a team or
not, with default tags for its requests, and an expiry if it is to stop by itself."""

from __future__ import annotations

import datetime as dt
import re
import time
from decimal import Decimal
from typing import Annotated

import typer
from rich.table import Table

from metergate.auth.keys import KeyRecord
from metergate.auth.rules import (
    CAP_MAX,
    check_budget_limits,
    check_cap,
    check_expiry,
    check_name,
    check_rates,
)
from metergate.cli.common import (
    ConfigOption,
    console,
    errors,
    load_for_ledger,
    not_both,
    with_database,
)
from metergate.config.model import GatewayConfig, each_key_budgets
from metergate.errors import InvalidRequest
from metergate.storage import keys as store
from metergate.storage.database import Database
from metergate.storage.teams import get_team, list_teams
from metergate.teams import TeamError, check_tags

app = typer.Typer(help="Create, list and revoke gateway keys.", no_args_is_help=True)

EXPIRES_HELP = (
    "when it stops working: a duration from now (30d, 12h, 90m) or an ISO date or date-time "
    "(a date is its 00:00 UTC)"
)
Rpm = Annotated[
    int | None, typer.Option("--rpm", min=0, help="its own requests per minute (0: the config's)")
]
Tpm = Annotated[
    int | None, typer.Option("--tpm", min=0, help="its own tokens per minute (0: the config's)")
]
LIMIT_HELP = 'its own limit of a budget for each key (target "*"), e.g. per-user-daily=10 (repeat)'
_DURATION = re.compile(r"(\d{1,7})([dhm])")
_UNIT = {"d": 86_400, "h": 3_600, "m": 60}


@app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="the calling service, e.g. search-mcp")],
    models: Annotated[
        list[str] | None, typer.Option("--models", help="allowed models (repeat); all if omitted")
    ] = None,
    max_tokens_cap: Annotated[
        int | None,
        typer.Option("--max-tokens-cap", help=f"cap on max_tokens per request (1-{CAP_MAX})"),
    ] = None,
    team: Annotated[str | None, typer.Option("--team", help="the team it belongs to")] = None,
    tags: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="NAME=VALUE", help="default tag of its requests (repeat)"),
    ] = None,
    expires: Annotated[str | None, typer.Option("--expires", help=EXPIRES_HELP)] = None,
    budget_limits: Annotated[
        list[str] | None,
        typer.Option("--budget-limit", metavar="BUDGET=USD", help=LIMIT_HELP),
    ] = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    config: ConfigOption = None,
) -> None:
    """Create a key. Its secret is printed once and stored only as a hash."""
    try:  # the admin API's rules, so the CLI makes no key the API would refuse
        check_name(name, "--name")
        check_cap(max_tokens_cap, "--max-tokens-cap", unset=None)
        expires_at = None if expires is None else parse_expiry(expires, time.time(), new=True)
        rates = check_rates({"rpm": rpm or None, "tpm": tpm or None})
    except InvalidRequest as error:
        errors.print(error.message, markup=False, highlight=False)
        raise typer.Exit(2) from None
    loaded = load_for_ledger(config)
    unknown = [m for m in models or [] if m not in loaded.models]
    if unknown:
        errors.print(
            f"unknown model(s): {', '.join(map(repr, unknown))}; "
            f"configured: {', '.join(loaded.models)}"
        )
        raise typer.Exit(2)
    defaults = _tags_or_exit(tags or [])
    limits = _limits_or_exit(budget_limits or [], loaded)

    async def work(db: Database) -> tuple[str, KeyRecord]:
        await _team_or_exit(db, team)
        return await store.create_key(
            db,
            name,
            models,
            max_tokens_cap,
            team,
            defaults,
            expires_at,
            limits,
            rates["rpm"],
            rates["tpm"],
        )

    try:
        secret, record = with_database(loaded, work)
    except store.KeyNameTaken:
        errors.print(
            f"a key named {name!r} exists and is not revoked (an expired key keeps its "
            "name); revoke it first or pick another name"
        )
        raise typer.Exit(2) from None
    except store.TeamMissing:  # deleted since it was checked
        errors.print(f"no team named {team!r}; create it with `metergate teams create NAME`")
        raise typer.Exit(2) from None
    console.print(f"created key [bold]{record.name}[/bold] ({record.id}){_expiry(record)}")
    console.print("secret (shown once, store it now):")
    print(secret)


@app.command("list")
def list_(
    search: Annotated[
        str | None,
        typer.Option("--search", help="part of a name (any case), an id, or the last four"),
    ] = None,
    team: Annotated[str | None, typer.Option("--team", help="only this team's keys")] = None,
    state: Annotated[
        store.KeyState, typer.Option("--state", help="active, expired, revoked or all")
    ] = "all",
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="at most this many keys (1000)")
    ] = 1_000,
    config: ConfigOption = None,
) -> None:
    """List keys, active first, then by name: name, id, last four characters, allowed
    models, state."""
    loaded = load_for_ledger(config)

    async def listing(db: Database) -> store.KeyPage:
        page = await store.page_of_keys(db, limit, state=state, search=search, team=team)
        if team is not None and not page.records:  # a misspelt team, not an empty one
            await _team_or_exit(db, team)
        return page

    page = with_database(loaded, listing)
    now = time.time()
    table = Table(
        "name", "id", "key", "models", "max_tokens cap", "team", "created", "expires", "state"
    )
    table.columns[1].overflow = "fold"  # folded in a narrow terminal, never cut: revoke takes it
    for record in page.records:
        table.add_row(
            record.name,
            record.id,
            f"mgk_…{record.hint}",
            ", ".join(record.models) if record.models else "all",
            str(record.max_tokens_cap or ""),
            record.team or "",
            _when(record.created_at),
            _when(record.expires_at),
            f"revoked {_when(record.revoked_at)}" if record.revoked_at else record.state(now),
        )
    console.print(table)
    if page.matched > len(page.records):
        console.print(
            f"{len(page.records):,} of {page.matched:,} keys; --search, --team or --limit "
            "for the others"
        )


@app.command("update")
def update(
    name: Annotated[str, typer.Argument(help="key name or id")],
    team: Annotated[str | None, typer.Option("--team", help="move it to this team")] = None,
    no_team: Annotated[bool, typer.Option("--no-team", help="take it out of its team")] = False,
    tags: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="NAME=VALUE", help="its default tags, replacing them"),
    ] = None,
    clear_tags: Annotated[bool, typer.Option("--clear-tags", help="remove its tags")] = False,
    expires: Annotated[str | None, typer.Option("--expires", help=EXPIRES_HELP)] = None,
    no_expiry: Annotated[bool, typer.Option("--no-expiry", help="it never expires")] = False,
    budget_limits: Annotated[
        list[str] | None,
        typer.Option("--budget-limit", metavar="BUDGET=USD", help=LIMIT_HELP + ", replacing"),
    ] = None,
    clear_limits: Annotated[
        bool, typer.Option("--clear-budget-limits", help="the config's limits again")
    ] = False,
    rpm: Rpm = None,
    tpm: Tpm = None,
    config: ConfigOption = None,
) -> None:
    """Change a key's team, default tags, expiry or own limits (an expired key too);
    running gateways follow within seconds."""
    not_both(
        ("--team", team, "--no-team", no_team),
        ("--expires", expires, "--no-expiry", no_expiry),
        ("--tag", tags, "--clear-tags", clear_tags),
        ("--budget-limit", budget_limits, "--clear-budget-limits", clear_limits),
    )
    changes: dict[str, object] = {}
    try:
        if expires is not None or no_expiry:
            changes["expires_at"] = None if no_expiry else parse_expiry(expires, time.time())
        rates = check_rates({"rpm": rpm or None, "tpm": tpm or None})
        for field, given in (("rpm", rpm), ("tpm", tpm)):
            if given is not None:  # 0: back to the config's
                changes[field] = rates[field]
    except InvalidRequest as error:
        errors.print(error.message, markup=False, highlight=False)
        raise typer.Exit(2) from None
    if team is not None or no_team:
        changes["team"] = team
    if tags or clear_tags:
        changes["tags"] = _tags_or_exit(tags or [])
    loaded = load_for_ledger(config)
    if budget_limits or clear_limits:
        changes["budget_limits"] = _limits_or_exit(budget_limits or [], loaded)
    if not changes:
        errors.print(
            "nothing to change: give --team, --tag, --expires, --budget-limit, --rpm or --tpm "
            "(or what clears one)"
        )
        raise typer.Exit(2)

    async def work(db: Database) -> KeyRecord | None:
        current = next(
            (k for k in await store.list_keys(db, False) if name in (k.name, k.id)), None
        )
        if current is None:
            return None
        await _team_or_exit(db, team)
        return await store.change_key(db, current.id, changes)

    try:
        record = with_database(loaded, work)
    except store.TeamMissing:  # deleted since it was checked
        errors.print(f"no team named {team!r}; create it with `metergate teams create NAME`")
        raise typer.Exit(2) from None
    if record is None:
        errors.print(f"no active key named or with id {name!r}")
        raise typer.Exit(2)  # a name given wrong, as elsewhere
    tag_text = ", ".join(f"{k}={v}" for k, v in record.tags) or "none"
    console.print(
        f"key {record.name}: team {record.team or 'none'}, tags {tag_text}{_expiry(record)}"
        f", budget limits {_limits(record) or 'as configured'}, rate limits {_rates(record)}"
    )


async def _team_or_exit(db: Database, team: str | None) -> None:
    if team is not None and await get_team(db, team) is None:
        known = ", ".join(t.name for t in await list_teams(db)) or "none yet"
        errors.print(
            f"no team named {team!r} (teams: {known}); create it with `metergate teams create NAME`"
        )
        raise typer.Exit(2)


def _limits_or_exit(items: list[str], config: GatewayConfig) -> dict[str, Decimal] | None:
    """`--budget-limit NAME=USD` options, checked as the admin API checks them."""
    limits: dict[str, str] = {}
    for item in items:
        name, sep, usd = item.partition("=")
        if not sep:
            errors.print(f"--budget-limit takes BUDGET=USD (got {item!r})")
            raise typer.Exit(2)
        limits[name] = usd
    try:
        return check_budget_limits(limits, each_key_budgets(config.budgets), "--budget-limit")
    except InvalidRequest as error:
        errors.print(error.message, markup=False, highlight=False)
        raise typer.Exit(2) from None


def _tags_or_exit(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        name, sep, value = item.partition("=")
        tags[name] = value
        if not sep:
            errors.print(f"--tag takes NAME=VALUE (got {item!r})")
            raise typer.Exit(2)
    try:
        check_tags(tags)
    except TeamError as error:
        errors.print(str(error), markup=False, highlight=False)
        raise typer.Exit(2) from None
    return tags


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="key name or id")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key; running gateways refuse it within seconds."""
    loaded = load_for_ledger(config)
    count = with_database(loaded, lambda db: store.revoke_key(db, name))
    if not count:
        errors.print(f"no active key named or with id {name!r}")
        raise typer.Exit(2)  # a name given wrong, as elsewhere
    console.print(f"revoked {name}")


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_expiry(text: str | None, now: float, new: bool = False) -> float:
    """Epoch seconds of `--expires`: a duration from `now`, or an ISO date (its 00:00 UTC)
    or date-time (UTC unless it says otherwise); InvalidRequest saying how otherwise, or,
    for a `new` key, that the time is past."""
    text = (text or "").strip()
    duration = _DURATION.fullmatch(text)
    if duration is not None:
        moment = now + int(duration[1]) * _UNIT[duration[2]]
    else:
        try:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()
        except ValueError:
            try:
                parsed = dt.datetime.fromisoformat(text)
            except ValueError:
                raise InvalidRequest(
                    "--expires takes a duration from now (30d, 12h, 90m) or an ISO date or "
                    f"date-time, e.g. 2027-01-31 or 2027-01-31T18:00+01:00 (got {text!r})"
                ) from None
            aware = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
            moment = aware.timestamp()
    expires_at = check_expiry(moment, "--expires", not_before=now if new else None)
    assert expires_at is not None
    return expires_at


def _expiry(record: KeyRecord) -> str:
    """How a changed or new key's expiry reads after its name."""
    if record.expires_at is None:
        return ", never expires"
    verb = "expired" if record.expires_at <= time.time() else "expires"
    return f", {verb} {_when(record.expires_at)}"


def _limits(record: KeyRecord) -> str:
    return ", ".join(f"{name} ${Decimal(nano) / 10**9}" for name, nano in record.budget_limits)


def _rates(record: KeyRecord) -> str:
    rpm, tpm = record.rates or (None, None)
    parts = [f"{rpm} rpm" if rpm else "", f"{tpm} tpm" if tpm else ""]
    return " ".join(p for p in parts if p) or "as configured"
