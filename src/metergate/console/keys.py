"""Gateway keys for the console: listed with their spend, created, edited, revoked.

The list comes in pages (a gateway may hold a key per end user: 100,000 keys were 26 MB
of JSON in one answer), found by part of a name, an id or a hint.

Creating, listing and changing reuse `storage.keys`. Revoking by id alone lives here
because only the admin API needs it (the CLI's `revoke_key` also matches names, which
is right for a person typing, wrong for a button that means one row).

A key's *budget* is a config budget with `scope: key`, naming it or `target: "*"` (each
key its own share; enforced by the budget book and rebuilt from the ledger); the console
shows those next to the key, read-only. Giving one key an editable budget would need a
column and enforcement in the budget book.
"""

from __future__ import annotations

import re
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, get_args

from metergate.auth.keys import KeyRecord
from metergate.console.overview import budget_json, day_and_month, shares_json
from metergate.console.requests_log import check_query, int_value, query_value
from metergate.errors import InvalidRequest, NotFound
from metergate.metering.report import Spend, UsageFilter
from metergate.runtime import Runtime
from metergate.storage.database import Database
from metergate.storage.keys import KeyState, key_by_id, page_of_keys, revoke
from metergate.teams import usd_text


def key_json(record: KeyRecord) -> dict[str, Any]:
    """What the API shows of a key: never its hash, only the last four characters."""
    return {
        "id": record.id,
        "name": record.name,
        "hint": record.hint,
        "models": list(record.models) if record.models is not None else None,
        "max_tokens_cap": record.max_tokens_cap,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
        "expires_at": record.expires_at,
        "budget_limits": {name: usd_text(Decimal(n) / 10**9) for name, n in record.budget_limits},
        "rpm": None if record.rates is None else record.rates[0],
        "tpm": None if record.rates is None else record.rates[1],
        "state": record.state(time.time()),
        "team": record.team,
        "tags": dict(record.tags),
    }


async def find_key(database: Database, key_id: str) -> KeyRecord:
    """The key with this id, active or revoked; 404 when there is none."""
    found = await key_by_id(database, key_id)
    if found is None:
        raise NotFound(f"no key with id {key_id!r}", code="key_not_found")
    return found


def require_active(found: KeyRecord | None, key_id: str) -> KeyRecord:
    """A key that may change: a revoked key still exists (it is listed, its spend stays),
    but cannot change, so that is a 409 and not a 404."""
    if found is None:
        raise NotFound(f"no key with id {key_id!r}", code="key_not_found")
    if found.revoked_at is not None:
        raise InvalidRequest(
            f"key {key_id!r} ({found.name}) is revoked and cannot change; create a new key",
            status=409,
            code="key_revoked",
        )
    return found


async def revoke_key_by_id(database: Database, key_id: str) -> KeyRecord:
    """Revoke the key with this id (already revoked: unchanged)."""
    await find_key(database, key_id)
    async with database.transaction() as tx:
        await revoke(tx, key_id)
    return await find_key(database, key_id)


def check_fields(body: dict[str, Any], known: AbstractSet[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"send only {', '.join(f'`{k}`' for k in sorted(known))}",
            param=unknown[0],
        )


def check_models(
    runtime: Runtime, value: Any, kept: tuple[str, ...] | list[str] | None = None
) -> list[str] | None:
    """None means every model; otherwise each must be a configured model, or one of
    `kept`: the models the key has now, which it may keep after they left the config (a
    change that keeps them must not have to drop them, or worse, allow every model).
    An empty list is refused: read as "every model" it would turn a list a script
    filtered down to nothing into an unrestricted key."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise InvalidRequest("`models` must be a list of model names or null", param="models")
    if not value:
        raise InvalidRequest(
            "`models` is empty: a key may not be limited to no model; give null for every "
            "model, or revoke the key",
            param="models",
        )
    if not all(value):
        raise InvalidRequest("`models` holds an empty model name", param="models")
    configured = runtime.plan.config.models
    unknown = [m for m in value if m not in configured and m not in (kept or ())]
    if unknown:
        raise InvalidRequest(
            f"unknown model(s): {', '.join(unknown)}; configured: {', '.join(configured)}",
            param="models",
        )
    return list(dict.fromkeys(value))


KEY_FILTERS = ("limit", "after", "search", "state", "team")
PAGE_DEFAULT = 100
PAGE_MAX = 1_000
KEY_STATES: tuple[KeyState, ...] = get_args(KeyState)


@dataclass(frozen=True, slots=True)
class KeyQuery:
    limit: int = PAGE_DEFAULT
    after: tuple[int, str, str] | None = None
    state: KeyState = "all"
    search: str | None = None
    team: str | None = None


def parse_key_query(query: dict[str, list[str]]) -> KeyQuery:
    """The keys list's paging and filters; `after` is the `next_after` of a page before."""
    check_query(query, KEY_FILTERS)
    given = query_value(query, "state") or "all"
    state = next((known for known in KEY_STATES if known == given), None)
    if state is None:
        raise InvalidRequest(f"`state` must be one of: {', '.join(KEY_STATES)}", param="state")
    after = query_value(query, "after")
    return KeyQuery(
        limit=int_value(query, "limit", 1, PAGE_MAX) or PAGE_DEFAULT,
        after=None if after is None else _place(after),
        state=state,
        search=query_value(query, "search"),
        team=query_value(query, "team"),
    )


CURSOR = re.compile(r"([01])\.(key_[0-9a-f]{16})\.(.+)", re.DOTALL)
"""`next_after`: `<1 if revoked>.<id>.<name>` of a page's last key. Readable on purpose:
every string of this shape is a place in the order (the key need not exist any more),
so the API never rejects a well-formed cursor; a revoked flag in it keeps paging steady
when that key is revoked between two pages."""


def _cursor(place: tuple[int, str, str]) -> str:
    revoked, name, key_id = place
    return f"{revoked}.{key_id}.{name}"


def _place(cursor: str) -> tuple[int, str, str]:
    found = CURSOR.fullmatch(cursor)
    if found is None:
        raise InvalidRequest(
            "`after` is not a place this list gave (`next_after`, like "
            "`0.key_0123456789abcdef.name`); leave it out for the first page",
            param="after",
        )
    revoked, key_id, name = found.groups()
    return int(revoked), name, key_id


async def keys_with_spend(runtime: Runtime, database: Database, query: KeyQuery) -> dict[str, Any]:
    """A page of keys (active ones first, then by name), with the spend of their names
    today and this month (UTC) and the key-scoped budgets of the config; spend is by
    name, as the ledger records it, so a replaced key's spend shows on the active key of
    that name. `matched` counts the keys the filters match on all pages."""
    now = time.time()
    page = await page_of_keys(
        database, query.limit, query.after, query.state, query.search, query.team
    )
    names = tuple(dict.fromkeys(record.name for record in page.records))
    day: dict[str, Spend] = {}
    month: dict[str, Spend] = {}
    if names:
        day, month = await day_and_month(database, "key", now, UsageFilter(keys=names))
    key_budgets: dict[str, list[dict[str, Any]]] = {}
    book, gate = runtime.plan.budgets, runtime.plan.gate
    for budget in book.budgets:
        target = budget.target
        if budget.config.scope == "key" and target in names:
            shown = await budget_json(database, gate, budget, now)
            key_budgets.setdefault(target, []).append(shown)
    limits = {r.name: dict(r.budget_limits) for r in page.records if r.revoked_at is None}
    for each in book.each:  # each key's own share, read for this page's names at once
        if each.config.scope == "key" and names:
            shares = await shares_json(database, gate, each, names, limits, now)
            for name, share in shares.items():
                key_budgets.setdefault(name, []).append(share)
    rows = []
    for record in page.records:
        spent_month, spent_today = month.get(record.name), day.get(record.name)
        rows.append(
            {
                **key_json(record),
                "requests_month": spent_month.requests if spent_month else 0,
                "spend_today_nano": spent_today.cost_nano if spent_today else 0,
                "spend_month_nano": spent_month.cost_nano if spent_month else 0,
                "budgets": key_budgets.get(record.name, []),
            }
        )
    return {
        "keys": rows,
        "next_after": None if page.after is None else _cursor(page.after),
        "matched": page.matched,
        "models": list(runtime.plan.config.models),
    }
