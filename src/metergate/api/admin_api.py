"""The admin JSON API under `/admin/api/...`, its OpenAPI document, and the console page.

One API, two faces: the browser console calls exactly these endpoints with the admin
key as a Bearer token, and so can a script or the CLI. The data itself is computed in
`metergate.console`; this module is only HTTP: auth, parameters, status codes, headers.
Paths with an id in them (`keys/{id}`, `rollouts/{name}/{action}`) are matched here,
since the app's route table is exact paths only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

import orjson

from metergate import __version__
from metergate.api.admin import AdminGuard, admin_endpoint, query_params, send_json
from metergate.asgi import Request, Send, base_headers, respond
from metergate.auth.rules import (
    RATE_FIELDS,
    check_budget_limits,
    check_cap,
    check_expiry,
    check_name,
    check_rates,
)
from metergate.config.model import each_key_budgets
from metergate.console import attribution, requests_log
from metergate.console import keys as console_keys
from metergate.console import request_detail as detail
from metergate.console.mcp import McpView
from metergate.console.openapi import openapi_document
from metergate.console.overview import overview
from metergate.console.rollouts import ACTIONS, rollouts
from metergate.console.security import PAGE_CSP, secure_headers
from metergate.console.static_files import load_assets
from metergate.console.upstreams import upstreams
from metergate.console.windows import parse_window
from metergate.errors import GatewayLimit, InvalidRequest, NotFound
from metergate.rollout import transitions
from metergate.runtime import Runtime
from metergate.storage import teams as team_store
from metergate.storage.database import Database
from metergate.storage.keys import KeyNameTaken, TeamMissing, change_key, create_key
from metergate.teams import TeamError, check_change

Handler = Callable[[Request, Send], Awaitable[None]]
BODY_LIMIT = 64 * 1024
# Paths with parameters: (method, segments with None for a parameter, handler name).
_PATTERNS: tuple[tuple[str, tuple[str | None, ...], str], ...] = (
    ("PATCH", ("admin", "api", "keys", None), "update_key"),
    ("POST", ("admin", "api", "keys", None, "revoke"), "revoke_key"),
    ("POST", ("admin", "api", "rollouts", None, None), "rollout_action"),
    ("PATCH", ("admin", "api", "teams", None), "update_team"),
    ("DELETE", ("admin", "api", "teams", None), "delete_team"),
    ("GET", ("admin", "api", "requests", None), "request_detail"),
)


def _match(segments: list[str], pattern: tuple[str | None, ...]) -> list[str] | None:
    if len(segments) != len(pattern):
        return None
    params = []
    for segment, expected in zip(segments, pattern, strict=True):
        if expected is None:
            if not segment:
                return None
            params.append(segment)
        elif segment != expected:
            return None
    return params


# what a key's create and PATCH may set (create also takes `name`)
KEY_FIELDS = (
    frozenset({"models", "max_tokens_cap", "team", "tags", "expires_at", "budget_limits"})
    | RATE_FIELDS
)


class AdminApi:
    def __init__(self, runtime: Runtime, guard: AdminGuard) -> None:
        self.runtime = runtime
        self.guard = guard
        self.mcp = McpView()
        self.assets = load_assets()
        self._openapi = (b"", b"")  # (config version, document): models are in it

    def routes(self) -> dict[tuple[str, str], Handler]:
        """The exact paths, for the app's route table."""
        routes: dict[tuple[str, str], Handler] = {
            ("GET", "/admin/openapi.json"): self.openapi,
            ("GET", "/admin/api/session"): self.session,
            ("GET", "/admin/api/overview"): self.overview,
            ("GET", "/admin/api/upstreams"): self.upstreams,
            ("GET", "/admin/api/keys"): self.list_keys,
            ("POST", "/admin/api/keys"): self.create_key,
            ("GET", "/admin/api/rollouts"): self.list_rollouts,
            ("GET", "/admin/api/mcp"): self.mcp_servers,
            ("GET", "/admin/api/requests"): self.requests,
            ("GET", "/admin/api/requests.csv"): self.requests_csv,
            ("GET", "/admin/api/request-log.jsonl"): self.export_request_log,
            ("GET", "/admin/api/teams"): self.list_teams,
            ("POST", "/admin/api/teams"): self.create_team,
            ("GET", "/admin/api/usage"): self.usage,
        }
        for path in self.assets:
            routes[("GET", path)] = self.asset
        return routes

    async def dispatch(
        self, request: Request, send: Send, routes: Mapping[tuple[str, str], object]
    ) -> bool:
        """Serve an admin or console path the route table has no exact entry for (one with
        an id in it, or an unknown one, answered here so that it gets the admin headers);
        False when the path is not the admin API's."""
        path: str = request.scope["path"]
        if not (path.startswith("/admin/") or path.startswith("/console")):
            return False
        await self._dispatch(request, send, path, routes)
        return True

    @admin_endpoint
    async def _dispatch(
        self, request: Request, send: Send, path: str, routes: Mapping[tuple[str, str], object]
    ) -> None:
        segments = path.strip("/").split("/")
        allowed = sorted(method for method, exact in routes if exact == path)
        for method, pattern, name in _PATTERNS:
            params = _match(segments, pattern)
            if params is None:
                continue
            if method == request.scope["method"]:
                await getattr(self, name)(request, send, *params)
                return
            allowed.append(method)
        if allowed:
            raise InvalidRequest(
                f"method {request.scope['method']} is not allowed on {path}; "
                f"use {', '.join(allowed)}",
                status=405,
                code="method_not_allowed",
                headers=[(b"allow", ", ".join(allowed).encode())],
            )
        raise NotFound(
            f"no such admin endpoint: {path}; see /admin/openapi.json", code="unknown_endpoint"
        )

    async def _database(self, fresh: bool = False) -> Database:
        """The ledger database; with `fresh`, its connection for reports (apart from the
        one requests and the ledger writer use), after committing the rows still queued,
        so the console shows the requests that just finished."""
        database = self.runtime.database
        if database is None:
            raise GatewayLimit("the gateway is starting; try again", code="not_ready")
        if not fresh:
            return database
        ledger = self.runtime.ledger
        if ledger is not None:
            with contextlib.suppress(Exception):  # the writer keeps and retries its rows
                await ledger.flush()
        return await database.reports()

    # -- console page and OpenAPI ------------------------------------------------------

    @admin_endpoint
    async def asset(self, request: Request, send: Send) -> None:
        asset = self.assets[request.scope["path"]]
        cache = "no-store" if asset.is_page else "no-cache"
        headers = [*base_headers(request), *secure_headers(PAGE_CSP, cache), (b"etag", asset.etag)]
        if not asset.is_page and request.headers.get(b"if-none-match") == asset.etag:
            await respond(send, 304, b"", headers)
            return
        await respond(
            send, 200, asset.body, [*headers, (b"content-type", asset.content_type.encode())]
        )

    @admin_endpoint
    async def openapi(self, request: Request, send: Send) -> None:
        """Public: the API's shape is no secret, and tools fetch it without credentials.
        It lists the configured models, so it is rebuilt when the config changes; with
        the admin API off it answers 404, like every admin endpoint."""
        self.guard.require_enabled()
        query_params(request)
        plan = self.runtime.plan
        version = plan.version.encode()
        if self._openapi[0] != version:
            document = openapi_document(
                __version__, list(plan.config.models), each_key_budgets(plan.config.budgets)
            )
            self._openapi = (version, orjson.dumps(document))
        headers = [
            *base_headers(request),
            (b"content-type", b"application/json"),
            *secure_headers(),
        ]
        await respond(send, 200, self._openapi[1], headers)

    # -- read -----------------------------------------------------------------------

    @admin_endpoint
    async def session(self, request: Request, send: Send) -> None:
        """Sign-in check for the console: 200 means the key is the admin key."""
        self.guard.authorize(request)
        query_params(request)
        runtime = self.runtime
        await send_json(
            request,
            send,
            {
                "gateway_version": __version__,
                "config_version": runtime.plan.version,
                "models": list(runtime.plan.config.models),
                "upstreams": list(runtime.plan.config.upstreams),
                "rollouts": list(runtime.plan.config.rollouts),
            },
        )

    @admin_endpoint
    async def overview(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        window = parse_window(requests_log.query_value(query_params(request, "window"), "window"))
        database = await self._database(fresh=True)
        await send_json(request, send, await overview(self.runtime, database, window))

    @admin_endpoint
    async def upstreams(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        window = parse_window(requests_log.query_value(query_params(request, "window"), "window"))
        database = await self._database(fresh=True)
        await send_json(request, send, await upstreams(self.runtime, database, window))

    @admin_endpoint
    async def mcp_servers(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        query_params(request)
        await send_json(request, send, await self.mcp.read_off_loop(self.runtime.metrics.registry))

    @admin_endpoint
    async def requests(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        filters = requests_log.parse_filters(
            query_params(request, *requests_log.FILTERS), 100, requests_log.PAGE_MAX
        )
        database = await self._database(fresh=True)
        rows = await requests_log.latest(database, filters)
        choices = await requests_log.filter_choices(database, list(self.runtime.plan.config.models))
        next_before = rows[-1]["id"] if len(rows) == filters.limit else None
        await send_json(
            request, send, {"requests": rows, "next_before": next_before, "filters": choices}
        )

    @admin_endpoint
    async def requests_csv(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        filters = requests_log.parse_filters(
            query_params(request, *requests_log.FILTERS), 10_000, requests_log.CSV_MAX
        )
        database = await self._database(fresh=True)
        body = requests_log.to_csv(await requests_log.latest(database, filters))
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        headers = [
            *base_headers(request),
            (b"content-type", b"text/csv; charset=utf-8"),
            (
                b"content-disposition",
                f'attachment; filename="metergate-requests-{stamp}.csv"'.encode(),
            ),
            *secure_headers(),
        ]
        await respond(send, 200, body, headers)

    # -- keys -----------------------------------------------------------------------

    @admin_endpoint
    async def list_keys(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        wanted = console_keys.parse_key_query(query_params(request, *console_keys.KEY_FILTERS))
        database = await self._database(fresh=True)
        await send_json(
            request, send, await console_keys.keys_with_spend(self.runtime, database, wanted)
        )

    @admin_endpoint
    async def create_key(self, request: Request, send: Send) -> None:
        """Create a key; the secret is in this one response (no-store) and nowhere else."""
        self.guard.authorize(request)
        query_params(request)
        body = await request.json(BODY_LIMIT)
        console_keys.check_fields(body, KEY_FIELDS | {"name"})
        name = check_name(body.get("name"))
        models = console_keys.check_models(self.runtime, body.get("models"))
        cap = check_cap(body.get("max_tokens_cap"))
        expires_at = check_expiry(body.get("expires_at"))
        limits = self._budget_limits(body)
        rates = check_rates(body)
        given = attribution.key_attribution(body)
        database = await self._database()
        team = given.get("team")
        tags = dict(given.get("tags", ()))
        try:
            secret, record = await create_key(
                database,
                name,
                models,
                cap,
                team,
                tags,
                expires_at,
                limits,
                rates["rpm"],
                rates["tpm"],
            )
        except TeamMissing:  # checked in the insert's transaction: never a deleted team
            raise attribution.no_team(str(team)) from None
        except KeyNameTaken:
            raise InvalidRequest(
                f"a key named {name!r} exists and is not revoked (an expired key keeps its "
                "name); revoke it first or pick another name",
                status=409,
                code="key_name_taken",
                param="name",
            ) from None
        await self.runtime.keys.refresh()
        await send_json(
            request, send, {"key": console_keys.key_json(record), "secret": secret}, 201
        )

    async def update_key(self, request: Request, send: Send, key_id: str) -> None:
        """PATCH: the fields present are changed (`KEY_FIELDS`); null clears all but the
        tags, `{}` those; an empty object changes nothing (and answers the key as it is).
        All is checked before anything is written. An expired key may be changed (given a
        later expiry), a revoked one not."""
        self.guard.authorize(request)
        query_params(request)
        body = await request.json(BODY_LIMIT)
        console_keys.check_fields(body, KEY_FIELDS)
        cap = check_cap(body.get("max_tokens_cap"))
        expires_at = check_expiry(body.get("expires_at"))
        limits = self._budget_limits(body)
        given = attribution.key_attribution(body)
        changes: dict[str, Any] = dict(given)  # team, tags
        if "max_tokens_cap" in body:
            changes["max_tokens_cap"] = cap
        if "expires_at" in body:
            changes["expires_at"] = expires_at
        if "budget_limits" in body:
            changes["budget_limits"] = limits
        changes.update((name, value) for name, value in check_rates(body).items() if name in body)
        database = await self._database()
        if "models" in body:  # it may keep its own models that have left the config since
            current = console_keys.require_active(
                await console_keys.find_key(database, key_id), key_id
            )
            changes["models"] = console_keys.check_models(
                self.runtime, body["models"], current.models
            )
        try:  # only the fields sent are written, so a concurrent PATCH of others stays
            changed = await change_key(database, key_id, changes)
        except TeamMissing:
            raise attribution.no_team(str(changes.get("team"))) from None
        record = console_keys.require_active(changed, key_id)
        await self.runtime.keys.refresh()
        await send_json(request, send, {"key": console_keys.key_json(record)})

    def _budget_limits(self, body: dict[str, Any]) -> dict[str, Decimal] | None:
        budgets = each_key_budgets(self.runtime.plan.config.budgets)
        return check_budget_limits(body.get("budget_limits"), budgets)

    async def revoke_key(self, request: Request, send: Send, key_id: str) -> None:
        """Revoke at once here; other gateway processes follow within two seconds.
        Revoking a revoked key changes nothing."""
        self.guard.authorize(request)
        query_params(request)
        database = await self._database()
        record = await console_keys.revoke_key_by_id(database, key_id)
        await self.runtime.keys.refresh()
        await send_json(request, send, {"key": console_keys.key_json(record)})

    # -- teams and attribution --------------------------------------------------------

    @admin_endpoint
    async def list_teams(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        query_params(request)
        database = await self._database(fresh=True)
        await send_json(request, send, await attribution.teams_view(self.runtime, database))

    @admin_endpoint
    async def create_team(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        query_params(request)
        body = await request.json(BODY_LIMIT)
        try:
            values = check_change(body, creating=True)
        except TeamError as error:
            raise attribution.invalid(error) from None
        database = await self._database()
        try:
            record = await team_store.create_team(database, values)
        except team_store.TeamExists:
            raise InvalidRequest(
                f"a team named {values['name']!r} exists",
                status=409,
                code="team_name_taken",
                param="name",
            ) from None
        await self.runtime.teams.reload()
        await send_json(request, send, {"team": record.to_json()}, 201)

    async def update_team(self, request: Request, send: Send, name: str) -> None:
        """PATCH: the fields present replace the team's (`budgets` and `tags` whole); an
        empty object changes nothing (and answers the team as it is)."""
        self.guard.authorize(request)
        query_params(request)
        body = await request.json(BODY_LIMIT)
        try:
            values = check_change(body, creating=False)
        except TeamError as error:
            raise attribution.invalid(error) from None
        database = await self._database()
        if values:
            record = await team_store.update_team(database, name, values)
        else:
            record = await team_store.get_team(database, name)
        if record is None:
            raise attribution.team_not_found(name)
        if values:
            await self.runtime.teams.reload()
        await send_json(request, send, {"team": record.to_json()})

    async def delete_team(self, request: Request, send: Send, name: str) -> None:
        self.guard.authorize(request)
        query_params(request)
        try:
            found = await team_store.delete_team(await self._database(), name)
        except team_store.TeamInUse as in_use:
            raise InvalidRequest(
                f"team {name!r} still has active keys: {in_use}; move them to another team first",
                status=409,
                code="team_in_use",
            ) from None
        if not found:
            raise attribution.team_not_found(name)
        await self.runtime.teams.reload()
        await send_json(request, send, {"deleted": name})

    @admin_endpoint
    async def usage(self, request: Request, send: Send) -> None:
        """Usage grouped by model, key, upstream, team or tag:NAME over a window."""
        self.guard.authorize(request)
        query = query_params(request, "window", "by", "team", "tag", "limit", "p95")
        value = requests_log.query_value
        window = parse_window(value(query, "window"))
        grouping, only = attribution.parse_grouping(
            value(query, "by"), value(query, "team"), value(query, "tag")
        )
        limit = requests_log.int_value(query, "limit", 1, attribution.GROUPS_MAX)
        p95 = attribution.parse_p95(value(query, "p95"))
        database = await self._database(fresh=True)
        view = await attribution.usage_view(
            database, window, grouping, only, limit or attribution.GROUPS_DEFAULT, p95
        )
        await send_json(request, send, view)

    # -- request log ----------------------------------------------------------------

    async def request_detail(self, request: Request, send: Send, row_id: str) -> None:
        self.guard.authorize(request)
        query_params(request)
        database = await self._database(fresh=True)
        await send_json(request, send, await detail.request_detail(self.runtime, database, row_id))

    @admin_endpoint
    async def export_request_log(self, request: Request, send: Send) -> None:
        """The request log's records of a period as JSON Lines (a download)."""
        self.guard.authorize(request)
        query = query_params(request, "since")
        start, end = detail.export_period(requests_log.query_value(query, "since"))
        database = await self._database(fresh=True)
        body = await detail.export_records(self.runtime, database, start, end, detail.EXPORT_MAX)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        headers = [
            *base_headers(request),
            (b"content-type", b"application/x-ndjson"),
            (
                b"content-disposition",
                f'attachment; filename="metergate-request-log-{stamp}.jsonl"'.encode(),
            ),
            *secure_headers(),
        ]
        await respond(send, 200, body, headers)

    # -- rollouts -------------------------------------------------------------------

    @admin_endpoint
    async def list_rollouts(self, request: Request, send: Send) -> None:
        self.guard.authorize(request)
        query_params(request)
        database = await self._database()
        await send_json(request, send, await rollouts(self.runtime, database))

    async def rollout_action(self, request: Request, send: Send, name: str, action: str) -> None:
        self.guard.authorize(request)
        query_params(request)
        rollout = self.runtime.plan.rollouts.rollouts.get(name)
        if rollout is None:
            configured = ", ".join(self.runtime.plan.rollouts.rollouts) or "none"
            raise NotFound(
                f"no rollout {name!r}; configured: {configured}", code="rollout_not_found"
            )
        change = ACTIONS.get(action)
        if change is None:
            raise NotFound(
                f"no rollout action {action!r}; one of: {', '.join(ACTIONS)}",
                code="unknown_action",
            )
        database = await self._database()
        try:
            await transitions.apply(database, rollout, change, "admin API")
        except transitions.TransitionRefused as refused:
            raise InvalidRequest(str(refused), status=409, code="transition_refused") from None
        result = await rollouts(self.runtime, database)
        current = next(r for r in result["rollouts"] if r["name"] == name)
        await send_json(request, send, {"rollout": current})
