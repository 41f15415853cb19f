"""Everything a running gateway holds, and how a new config replaces the old one live.

Long-lived parts (database, ledger, keys, metrics) live as long as the process. The
parts built from a config (adapters, router, dispatcher, budgets, cache, rollouts) form
a `Plan`; applying a new config builds a new plan and swaps it in with one assignment.

A request takes the plan in force when it arrives (`Plan.enter`) and uses only that
plan until it ends (`Plan.leave`), whatever reloads happen at its awaits: reading the
body, waiting for a retry, relaying a stream. A replaced plan's adapters (and Redis
link) are closed when its last request leaves. What did not change is carried over:
adapters keep their connections, circuit breakers and budget spend their state, rate
limits their buckets, and the Redis link (`redis:`, shared state for a fleet) its
connections and this process's holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metergate import __version__
from metergate.auth.index import KeyIndex
from metergate.auth.keys import KeyRecord
from metergate.budgets import BudgetBook
from metergate.budgets.budget import Budget, ledger_spend
from metergate.budgets.host import BUDGETS_FILE, HostBudgets
from metergate.cache import ResponseCache
from metergate.config import ConfigError, ConfigProblem, parse_config, read_config
from metergate.config.checks import targets_nobody_has
from metergate.config.loader import format_path
from metergate.config.model import EACH, GatewayConfig, LedgerConfig
from metergate.config.restart import restart_needed
from metergate.limits.admission import Gate
from metergate.limits.host import RATES_FILE, HostTats
from metergate.limits.rate import RateLimiter
from metergate.logs import RepeatedFailures
from metergate.metering.ledger import LedgerWriter
from metergate.metering.meter import Meter
from metergate.metering.metrics import Metrics, key_labels
from metergate.metering.multiprocess import remove_series
from metergate.metering.observers import Observers
from metergate.metering.spool import Spool
from metergate.providers import Adapter, build_adapter
from metergate.rollout import RolloutController, warn_of_one_workers_judging
from metergate.routing.dispatch import Dispatcher
from metergate.routing.retry import RetryBudget
from metergate.routing.router import Router
from metergate.storage import config_versions
from metergate.storage.database import Database, open_database
from metergate.storage.keys import find_keys, keys_changed
from metergate.storage.teams import list_teams
from metergate.teams import TeamRecord
from metergate.teams.registry import TeamRegistry

if TYPE_CHECKING:
    from metergate.mcp.gateway import McpGateway
    from metergate.shared.state import SharedState

log = logging.getLogger("metergate")
MANY_KEYS = 1_000  # live keys past which a series per key is worth a warning


@dataclass(eq=False)
class Plan:
    """The parts of a gateway that one config determines."""

    config: GatewayConfig
    version: str
    adapters: dict[str, Adapter]
    router: Router
    dispatcher: Dispatcher
    budgets: BudgetBook
    cache: ResponseCache | None
    rollouts: RolloutController
    gate: Gate  # rate limits + budgets, admitted in one step
    shared: SharedState | None  # Redis, when configured
    active: int = 0  # requests that entered this plan and have not left it
    _on_idle: Callable[[], None] | None = None

    def enter(self) -> Plan:
        self.active += 1
        return self

    def leave(self) -> None:
        self.active -= 1
        if not self.active and self._on_idle is not None:
            on_idle, self._on_idle = self._on_idle, None
            on_idle()

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` once no request uses this plan (now, if none does)."""
        if self.active:
            self._on_idle = callback
        else:
            callback()


class Runtime:
    def __init__(
        self,
        config: GatewayConfig,
        metrics: Metrics | None = None,
        text: str | None = None,
        source: str = "<config>",
        joining: bool = False,
        host: tuple[Path, int] | None = None,
    ) -> None:
        """`joining`: a worker of `serve --workers N`, whose parent recorded the config:
        it takes the version the gateway runs (a newer one, when it replaces a worker that
        died) instead of recording its own. `host`: the directory of the tables the
        workers of the host share (rate limits, `limits.host`; budgets, `budgets.host`)
        and this worker's number among them."""
        self.metrics = metrics or Metrics()
        self.joining = joining
        self.host_rates: HostTats | None = None
        self.host_budgets: HostBudgets | None = None
        self.worker: int | None = None  # this worker's number (serve --workers N)
        if host is not None:
            directory, worker = host
            self.worker = worker
            self.host_rates = HostTats(directory / RATES_FILE)
            self.host_budgets = HostBudgets(directory / BUDGETS_FILE, worker, self.host_rates)
        self.source = source
        self.text = text if text is not None else config.model_dump_json()
        self.database: Database | None = None
        self.ledger: LedgerWriter | None = None
        self.keys = KeyIndex(self._load_keys, self._find_keys, self._keys_changed)
        # (name, team, models) of each live key: the series `_prime_series` starts
        self._live_keys: list[tuple[str, str | None, tuple[str, ...] | None]] = []
        self._told_many_keys = False
        self.meter = Meter(self.metrics, None)
        self.observers = Observers(self.meter)  # tracing, request log, tag labels
        self.teams = TeamRegistry(self._load_teams, self.meter, lambda: self.plan, self._flush)
        self.ready = False
        self._retired: set[asyncio.Task[None]] = set()
        self._draining: set[Plan] = set()  # replaced plans that requests still use
        self._follower: asyncio.Task[None] | None = None
        self._switching = asyncio.Lock()  # one config change at a time
        self.plan = self._build(config, config_versions.text_hash(self.text), None)
        self.started_with = config  # what a reload cannot change (`config.restart`)
        self.mcp: McpGateway | None = None
        if config.mcp is not None:
            try:
                from metergate.mcp.gateway import McpGateway
            except ImportError as exc:
                raise RuntimeError(
                    "the config has an mcp: section; install it with pip install 'metergate[mcp]'"
                ) from exc
            self.mcp = McpGateway(config.mcp, self)

    def _build(self, config: GatewayConfig, version: str, old: Plan | None) -> Plan:
        adapters = {
            name: (
                old.adapters[name]
                if old and old.config.providers.get(name) == provider
                else build_adapter(name, provider)
            )
            for name, provider in config.providers.items()
        }
        rollouts = RolloutController(
            config.rollouts, self.metrics, carry=old.rollouts if old else None
        )
        router = Router(
            config,
            adapters,
            self._circuit_changed,
            rollouts,
            carry=old.router if old else None,
        )
        retry_budget = (
            old.dispatcher.retry_budget
            if old and old.config.retry_budget == config.retry_budget
            else RetryBudget(config.retry_budget)
        )
        shared = old.shared if old and old.config.redis == config.redis else None
        if shared is None and config.redis is not None:
            from metergate.shared.state import SharedState  # the Redis client, only if used

            shared = SharedState(config.redis, self.metrics)
        cache = (
            old.cache
            if old and old.config.cache == config.cache and old.shared is shared
            else (
                ResponseCache(config.cache, shared.cache if shared else None)
                if config.cache.enabled
                else None
            )
        )
        budgets = BudgetBook(config.budgets, self.metrics, carry=old.budgets if old else None)
        rates = RateLimiter(
            config.rate_limits, carry=old.gate.rates if old else None, host=self.host_rates
        )
        return Plan(
            config=config,
            version=version,
            adapters=adapters,
            router=router,
            dispatcher=Dispatcher(self.metrics, retry_budget),
            budgets=budgets,
            cache=cache,
            rollouts=rollouts,
            gate=Gate(
                budgets,
                rates,
                shared.counters if shared else None,
                None if shared else self.host_budgets,  # Redis, when configured, shares them
            ),
            shared=shared,
        )

    def _circuit_changed(self, upstream: str, state: int) -> None:
        self.metrics.circuit_state.labels(upstream).set(state)

    async def _load_keys(self, since: int) -> tuple[list[KeyRecord], int]:
        assert self.database is not None
        return await keys_changed(self.database, since)

    def _keys_changed(self) -> None:
        records = self.keys.records()
        self._live_keys = [(k.name, k.team, k.models) for k in records if k.revoked_at is None]
        self._prime_series()  # a new key's series exist before its first request
        by = self.plan.config.server.metrics_key_label
        if by == "name" and len(self._live_keys) > MANY_KEYS and not self._told_many_keys:
            self._told_many_keys = True
            log.warning(
                "%d keys, each with its own series of requests, tokens and cost per model: "
                "/metrics grows with them; server.metrics_key_label: team (or none) counts "
                "them by team (the ledger and console keep each key's spend)",
                len(self._live_keys),
            )

    def _warn_of_targets_nobody_has(self, config: GatewayConfig) -> None:
        """A budget or rate limit for a key or team the ledger has none of (one process
        of a host says it)."""
        if self.worker not in (None, 0):
            return
        keys = {k.name for k in self.keys.records() if k.revoked_at is None}
        for path, message, hint in targets_nobody_has(config, keys, set(self.teams.teams)):
            log.warning("config %s: %s; %s", format_path(path), message, hint)

    async def _find_keys(self, digests: Sequence[str]) -> list[KeyRecord]:
        assert self.database is not None
        return await find_keys(self.database, digests)

    async def _load_teams(self) -> list[TeamRecord]:
        assert self.database is not None
        return await list_teams(self.database)

    async def _flush(self) -> None:
        if self.ledger is not None:
            await self.ledger.flush()

    async def start(self) -> None:
        plan = self.plan
        ledger = plan.config.ledger
        self.database = await open_database(ledger.url, ledger.timeout_seconds)
        self.ledger = await self._open_ledger(self.database, ledger)
        await plan.budgets.load(self.database)
        self.meter.ledger = self.ledger
        await self.ledger.start()
        await self.observers.apply(plan.config, self.database)
        await self.teams.start(self.database)
        await self._start_shared(plan)
        await self.keys.start()
        self._warn_of_targets_nobody_has(plan.config)
        if self.mcp is not None:
            await self.mcp.start()
        for adapter in plan.adapters.values():
            await adapter.start()
        await plan.rollouts.start(self.database)
        if not self.joining:
            await config_versions.record(self.database, self.text, self.source, "started")
        self._export_static_metrics(None)
        refused = await self._catch_up() if self.joining else None
        self._follower = asyncio.create_task(
            self._follow_config(refused=refused), name="config-follower"
        )
        self.ready = True

    async def _open_ledger(self, database: Database, config: LedgerConfig) -> LedgerWriter:
        """The ledger writer, with the rows an outage left in the spool written first:
        budgets load their spend from the ledger next and must find them."""
        spool = Spool(Path(config.spool_directory))
        problem = spool.problem()
        if problem:
            log.warning(
                "ledger spool unusable (%s): rows refused in an outage stay in memory", problem
            )
        ledger = LedgerWriter(
            database,
            on_pending=self.metrics.ledger_pending.set,
            spool=spool,
            spool_after=config.spool_after_seconds,
        )
        ledger.adopt_spool()
        if ledger.pending:
            try:
                await ledger.flush()
            except Exception:
                log.exception("ledger spool not written yet: %d rows wait", ledger.pending)
        return ledger

    async def reload_from_source(self, trigger: str) -> bool:
        """Re-read the config file, validate it, apply it and record it as the newest
        version. An invalid file raises ConfigError and the running config stays."""
        assert self.database is not None
        if self.source == "<config>":
            raise ConfigError(
                [
                    ConfigProblem(
                        self.source,
                        (),
                        "this gateway was not started from a file",
                        "start it with --config FILE",
                    )
                ]
            )
        try:
            loaded = read_config(self.source)
        except ConfigError as error:
            log.error(
                "config reload (%s) refused, keeping version %s:\n%s",
                trigger,
                self.plan.version,
                error,
            )
            raise
        async with self._switching:  # the follower must not apply the previous version
            # The version is recorded after it is applied: a database that cannot record
            # it must fail the reload before anything changed (a config that reads
            # nothing from it would otherwise run here, unrecorded, through the outage).
            await config_versions.latest(self.database)
            applied = await self.apply(loaded.config, loaded.text, loaded.source)
            await config_versions.record(self.database, loaded.text, loaded.source, trigger)
        return applied

    async def _follow_config(self, every: float = 2.0, refused: str | None = None) -> None:
        """Apply the newest recorded version when another process (a worker that got
        SIGHUP, a replica, `metergate config rollback`) recorded one. Also shows, within
        `every` seconds, the circuits whose open time is up as half-open, and budgets
        whose period has ended as the new period's (no request may come to roll them)."""
        failures = RepeatedFailures(log, "following the config history")
        while True:
            await asyncio.sleep(every)
            try:
                self.plan.router.tick_circuits()  # open ones whose time is up: half-open
                self.plan.budgets.roll(self.plan.budgets.budgets)
                self.plan.budgets.sweep()  # past periods' members of budgets for each key
                refused = await self._take_recorded(refused)
            except Exception as error:
                failures.failed(error)
            else:
                failures.succeeded()

    async def _catch_up(self) -> str | None:
        """A joining process takes the version the gateway runs before it serves; failing
        that (the database fails now), the follower takes it within seconds."""
        try:
            refused = await self._take_recorded(None)
            log.info("joined the gateway at config version %s", self.plan.version)
            return refused
        except Exception:
            log.exception("taking the gateway's config version failed; retrying")
            return None

    async def _take_recorded(self, refused: str | None) -> str | None:
        """Apply the newest recorded config version unless this process runs it, or it is
        `refused` (already found not applicable here). Returns the refused version."""
        assert self.database is not None
        async with self._switching:
            newest = await config_versions.latest(self.database)
            if newest is None or newest.hash in (self.plan.version, refused):
                return refused
            try:
                text = config_versions.with_secrets(newest, self.source, self.text)
                await self.apply(parse_config(text, newest.source), text, newest.source)
            except ConfigError as error:
                log.error(
                    "config version %s cannot be applied here, keeping %s:\n%s",
                    newest.hash,
                    self.plan.version,
                    error,
                )
                return newest.hash
        return refused

    async def apply(self, config: GatewayConfig, text: str, source: str) -> bool:
        """Switch to `config` without dropping requests; False when it is already running."""
        version = config_versions.text_hash(text)
        if version == self.plan.version and config == self.plan.config:
            return False  # (the same version with other literal secrets is a change)
        assert self.database is not None and self.ledger is not None
        old = self.plan
        plan = self._build(config, version, old)
        # What reads the database goes first: a reload the ledger cannot answer (an
        # outage) fails here, having started and stopped nothing.
        await self.ledger.flush()  # budgets that changed rebuild their spend from the ledger
        await plan.budgets.load(self.database, only_new=True)
        await plan.rollouts.load(self.database)
        await self._start_new_parts(plan, old)
        await self.observers.apply(config, self.database)  # tracing, request log, tags
        await plan.rollouts.replace(old.rollouts)
        plan.budgets.take_over()
        self.plan = plan
        await self.teams.install(plan)
        if self.mcp is not None and config.mcp is not None:
            await self.mcp.apply(config.mcp)
        self.text, self.source = text, source
        self._export_static_metrics(old)
        self._draining.add(old)
        old.when_idle(lambda: self._drained(old))
        log.info("config %s applied (was %s) from %s", version, old.version, source)
        if self.worker == 0:  # every worker applies it: one says what serve said at start
            warn_of_one_workers_judging(config.rollouts, old.config.rollouts, None)
        self._warn_of_targets_nobody_has(config)
        pending = self.restart_pending()
        if pending:
            log.warning("these settings take effect only after a restart: %s", ", ".join(pending))
        return True

    async def _start_new_parts(self, plan: Plan, old: Plan) -> None:
        """Start the adapters and Redis link `plan` does not carry from `old`; if one
        fails, close those started, so that a refused reload leaves nothing open."""
        started: list[Adapter] = []
        try:
            for name, adapter in plan.adapters.items():
                if old.adapters.get(name) is not adapter:
                    started.append(adapter)
                    await adapter.start()
            if plan.shared is not old.shared:
                await self._start_shared(plan)
        except BaseException:
            for adapter in started:
                await adapter.close()
            if plan.shared is not None and plan.shared is not old.shared:
                await plan.shared.close()
            raise

    def restart_pending(self) -> list[str]:
        """The running config's settings this process has not applied (it started with
        others, and they are read at start only)."""
        return restart_needed(self.started_with, self.plan.config)

    def _drained(self, old: Plan) -> None:
        """A replaced plan's last request left: close what no plan in use still holds.

        An adapter (or Redis link) carried from plan to plan is shared, so it closes only
        when neither the current plan nor any plan still draining holds it.
        """
        self._draining.discard(old)
        holding = [self.plan, *self._draining]
        in_use = {id(a) for p in holding for a in p.adapters.values()}
        adapters = [a for a in old.adapters.values() if id(a) not in in_use]
        shared = old.shared
        if shared is not None and any(p.shared is shared for p in holding):
            shared = None

        async def close() -> None:
            for adapter in adapters:
                await adapter.close()
            if shared is not None:
                await shared.close()

        if adapters or shared is not None:
            task = asyncio.get_running_loop().create_task(close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def _start_shared(self, plan: Plan) -> None:
        """Connect to Redis and seed the budgets' shared counters from the ledger; the
        same seeding runs again each time Redis comes back after an outage."""
        shared = plan.shared
        if shared is None:
            return
        database, ledger = self.database, self.ledger
        assert database is not None and ledger is not None

        async def spend_of(budget: Budget, until: float) -> int:
            await ledger.flush()  # this process's rows so far are among those summed
            return await ledger_spend(database, budget, until)

        async def resync() -> None:  # on the plan in force (or being installed)
            assert shared is not None
            book = self.plan.budgets if self.plan.shared is shared else plan.budgets
            await shared.counters.resync(book)

        shared.counters.spend_of = spend_of
        shared.link.on_recover = resync
        await shared.start()

    def _export_static_metrics(self, old: Plan | None) -> None:
        if old is not None:
            self._retire_series(old)
        self.meter.key_label = self.plan.config.server.metrics_key_label
        self.metrics.build_info.labels(__version__, self.plan.version).set(1)
        for name, deployment in self.plan.router.deployments.items():
            for kind, value in deployment.prices.per_million_usd().items():
                self.metrics.model_price.labels(name, kind).set(value)
        self._prime_series()

    def _retire_series(self, old: Plan) -> None:
        """Take out the gauge series of what the new config no longer has (its version,
        upstreams' prices and circuits, budgets, rollouts' targets): left, they would
        keep their last value, and an alert on them keep firing, until a restart. Also
        in a worker's metric file (`remove_series`), where a plain removal is ignored."""
        metrics, new = self.metrics, self.plan
        remove_series(metrics.build_info, __version__, old.version)
        for name in old.router.deployments.keys() - new.router.deployments.keys():
            for kind in old.router.deployments[name].prices.per_million_usd():
                remove_series(metrics.model_price, name, kind)
            remove_series(metrics.circuit_state, name)
        for budget in old.config.budgets.keys() - new.config.budgets.keys():
            remove_series(metrics.budget_spent, budget)
            remove_series(metrics.budget_limit, budget)
        for budget, cfg in new.config.budgets.items():  # now for each key: no spent series
            before = old.config.budgets.get(budget)
            if cfg.target == EACH and before is not None and before.target != EACH:
                remove_series(metrics.budget_spent, budget)
        targets = {
            (name, target)
            for name, rollout in new.config.rollouts.items()
            for target in (*rollout.baseline, *rollout.candidate)
        }
        for name, rollout in old.config.rollouts.items():
            for target in (*rollout.baseline, *rollout.candidate):
                if (name, target) not in targets:
                    remove_series(metrics.rollout_weight, name, target)

    def _prime_series(self) -> None:
        """Start the series of every configured model, serving upstream and live key at 0
        (`Metrics.prime`), after a start, a config change or a change of keys."""
        plan = self.plan
        serving = {
            name: [
                d.name
                for r in (route, *route.fallbacks)
                for d in (*r.deployments, *r.baseline, *r.candidate)
            ]
            for name, route in plan.router.routes.items()
        }
        keys = key_labels(self._live_keys, plan.config.server.metrics_key_label)
        self.metrics.prime(serving, keys, plan.config.rollouts)

    async def close(self) -> None:
        self.ready = False
        if self.mcp is not None:
            await self.mcp.close()
        for task in [*self._retired, *([self._follower] if self._follower else [])]:
            task.cancel()
        await self.keys.close()
        await self.teams.close()
        plan = self.plan
        await plan.rollouts.close()
        if plan.shared is not None:
            await plan.shared.close()
        await plan.budgets.close()
        for adapter in plan.adapters.values():
            await adapter.close()
        await self.observers.close()
        if self.ledger is not None:
            await self.ledger.close()
            log.info(
                "ledger flushed: %d rows committed since the process started",
                self.ledger.committed,
            )
        if self.database is not None:
            await self.database.close()
