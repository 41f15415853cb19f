"""The teams a running gateway enforces: loaded from the database every two seconds (and
at once after a change through this process's admin API), installed into the plan in
force: budgets into its budget book, limits into its rate limiter, default tags into
the meter. Idempotent: installing the same teams again changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from metergate.logs import RepeatedFailures
from metergate.metering.meter import Meter
from metergate.teams import TeamRecord

if TYPE_CHECKING:
    from metergate.runtime import Plan
    from metergate.storage.database import Database

log = logging.getLogger("metergate.teams")

Loader = Callable[[], Awaitable[list[TeamRecord]]]


class TeamRegistry:
    def __init__(
        self,
        load: Loader,
        meter: Meter,
        plan: Callable[[], Plan],
        flush: Callable[[], Awaitable[None]],
        refresh_seconds: float = 2.0,
    ) -> None:
        self._load = load
        self._meter = meter
        self._plan = plan
        self._flush = flush
        self._refresh_seconds = refresh_seconds
        self.teams: dict[str, TeamRecord] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self, database: Database) -> None:
        self.database = database
        await self.reload()
        self._task = asyncio.create_task(self._refresh_forever(), name="team-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> None:
        """Read the teams and install them into the plan in force."""
        async with self._lock:
            records = await self._load()
            self.teams = {record.name: record for record in records}
            await self.install(self._plan())

    async def install(self, plan: Plan) -> None:
        """Put the known teams' budgets and limits into `plan` (a new plan after a reload)."""
        budgets = {}
        for record in self.teams.values():
            budgets.update(record.budget_configs())
        if budgets != {n: b.config for n, b in plan.budgets.team_budgets().items()}:
            # Rows still queued belong in a new budget's spend: commit them first.
            with contextlib.suppress(Exception):
                await self._flush()
            await plan.budgets.set_team_budgets(budgets, self.database)
        limits = {name: limit for name, r in self.teams.items() if (limit := r.rate_limit())}
        plan.gate.rates.set_team_limits(limits)
        self._meter.team_tags = {name: r.tags for name, r in self.teams.items() if r.tags}

    async def _refresh_forever(self) -> None:
        failures = RepeatedFailures(log, "reloading teams", "keeping the previous set")
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.reload()
            except Exception as error:
                failures.failed(error)
            else:
                failures.succeeded()
