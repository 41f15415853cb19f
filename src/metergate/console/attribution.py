"""Whose money: teams (with their keys, spend, budgets and limits) and usage grouped by
any request tag, for the console's Teams page and the admin API.

Spend is read from the ledger (each row records its request's team and tags), today
and this month in UTC as elsewhere in the console; budgets as `overview.budget_json`
reads them.
"""

from __future__ import annotations

import time
from typing import Any

from metergate.config.observe import TAG_NAME
from metergate.console.overview import budget_json, day_and_month, group_json, share_of
from metergate.console.windows import Window
from metergate.errors import InvalidRequest, NotFound
from metergate.metering.report import (
    UnknownGrouping,
    UsageFilter,
    group_expression,
    top_usage,
)
from metergate.runtime import Runtime
from metergate.storage import teams as store
from metergate.storage.database import Database
from metergate.teams import TeamError, TeamRecord, budget_name, check_name, check_tags

TEAM_KEYS_SHOWN = 50  # key names listed per team; the Keys page filters by team for all
GROUPS_DEFAULT = 100  # usage groups per answer: a key or tag value per end user is many
GROUPS_MAX = 1_000


def invalid(error: TeamError | UnknownGrouping) -> InvalidRequest:
    return InvalidRequest(str(error), param=getattr(error, "field", None))


def team_not_found(name: str) -> NotFound:
    return NotFound(f"no team named {name!r}", code="team_not_found")


def key_attribution(body: dict[str, Any]) -> dict[str, Any]:
    """The `team` (a team name or null) and `tags` of a key's create or change body, those
    it has, validated before anything is written."""
    values: dict[str, Any] = {}
    try:
        if "team" in body:
            values["team"] = None if body["team"] is None else check_name(body["team"], "team")
        if "tags" in body:
            values["tags"] = check_tags(body["tags"])
    except TeamError as error:
        raise invalid(error) from None
    return values


async def require_team(database: Database, team: str | None) -> None:
    """A key's `team` must name a team. When it names none, the key (the request's
    target) is still there, so that is a 409 and not a 404: the request conflicts with
    what exists, and is right once the team is created."""
    if team is not None and await store.get_team(database, team) is None:
        raise no_team(team)


def no_team(team: str) -> InvalidRequest:
    return InvalidRequest(
        f"no team named {team!r}; create it first (POST /admin/api/teams)",
        status=409,
        code="team_not_found",
        param="team",
    )


async def teams_view(runtime: Runtime, database: Database) -> dict[str, Any]:
    """Every team: its record, active keys (the first TEAM_KEYS_SHOWN names and how many
    in all), spend today and this month, budgets' state: its own, then the config's
    that name it or are for each team."""
    now = time.time()
    today, month = await day_and_month(database, "team", now)
    book, gate = runtime.plan.budgets, runtime.plan.gate
    installed = book.team_budgets()
    rows = []
    for record in await store.list_teams(database):
        budgets = [
            await budget_json(database, gate, installed[name], now)
            for b in record.budgets
            if (name := budget_name(record.name, b.period)) in installed
        ]
        for budget in book.budgets:  # the config's (the teams' own are in it too)
            if (
                budget.config.scope == "team"
                and budget.target == record.name
                and budget.name not in installed
            ):
                budgets.append(await budget_json(database, gate, budget, now))
        for each in book.each:
            if each.config.scope == "team":
                share = share_of(each, record.name, each.limit_nano, now)
                budgets.append(await budget_json(database, gate, share, now))
        spent_month, spent_today = month.get(record.name), today.get(record.name)
        keys, key_count = await store.team_keys(database, record.name, TEAM_KEYS_SHOWN)
        rows.append(
            {
                **record.to_json(),
                "keys": keys,
                "key_count": key_count,
                "requests_month": spent_month.requests if spent_month else 0,
                "spend_today_nano": spent_today.cost_nano if spent_today else 0,
                "spend_month_nano": spent_month.cost_nano if spent_month else 0,
                "budget_state": budgets,
            }
        )
    return {"now": now, "teams": rows}


def team_json(record: TeamRecord) -> dict[str, Any]:
    return record.to_json()


def _tag_name(name: str, param: str) -> None:
    if not TAG_NAME.fullmatch(name):  # the whole string: not even a newline after it
        raise InvalidRequest(
            f"tag name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            param=param,
        )


def parse_grouping(by: str | None, team: str | None, tag: str | None) -> tuple[str, UsageFilter]:
    """`by` (model, key, upstream, team, tag:NAME) and the filters `team`, `tag=NAME:VALUE`."""
    grouping = by or "team"
    if grouping.startswith("tag:"):
        _tag_name(grouping[4:], "by")
    try:
        group_expression("sqlite", grouping)
    except UnknownGrouping as error:
        raise InvalidRequest(str(error), param="by") from None
    tags: tuple[tuple[str, str], ...] = ()
    if tag is not None:
        name, sep, value = tag.partition(":")
        if not sep or not value:
            raise InvalidRequest(f"`tag` takes NAME:VALUE (got {tag!r})", param="tag")
        _tag_name(name, "tag")
        tags = ((name, value),)
    return grouping, UsageFilter(team, tags)


def parse_p95(value: str | None) -> bool:
    """`p95=false`: spend alone, without the latency percentiles that rank every request
    of the window (seconds at a month of a busy ledger; the sums take milliseconds)."""
    if value is None or value == "true":
        return True
    if value == "false":
        return False
    raise InvalidRequest(f"`p95` takes true or false (got {value!r})", param="p95")


async def usage_view(
    database: Database,
    window: Window,
    grouping: str,
    only: UsageFilter,
    limit: int = GROUPS_DEFAULT,
    p95: bool = True,
) -> dict[str, Any]:
    """The `limit` costliest groups; `total` covers every group, `group_count` counts
    them."""
    now = time.time()
    usage = await top_usage(database, grouping, now - window.seconds, now, only, limit, p95)
    return {
        "window": window.name,
        "now": now,
        "by": grouping,
        "groups": [{"name": g.name, **group_json(g)} for g in usage.groups],
        "group_count": usage.group_count,
        "total": group_json(usage.total),
    }
