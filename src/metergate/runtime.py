"""Everything a running gateway holds, built from one config and torn down in order."""

from __future__ import annotations

import hashlib
import logging

from metergate import __version__
from metergate.auth.index import KeyIndex
from metergate.budgets import BudgetBook
from metergate.cache import ResponseCache
from metergate.config.model import GatewayConfig
from metergate.metering.ledger import LedgerWriter
from metergate.metering.meter import Meter
from metergate.metering.metrics import Metrics
from metergate.providers import Adapter, build_adapter
from metergate.routing.dispatch import Dispatcher
from metergate.routing.retry import RetryBudget
from metergate.routing.router import Router
from metergate.storage.database import Database, open_database
from metergate.storage.keys import list_keys

log = logging.getLogger("metergate")


def config_version(config: GatewayConfig) -> str:
    """A short stable id of a config's content (secrets included only as a hash input)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


class Runtime:
    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.version = config_version(config)
        self.metrics = metrics or Metrics()
        self.adapters: dict[str, Adapter] = {
            name: build_adapter(name, provider) for name, provider in config.providers.items()
        }
        self.router = Router(config, self.adapters, self._circuit_changed)
        self.dispatcher = Dispatcher(self.metrics, RetryBudget(config.retry_budget))
        self.database: Database | None = None
        self.ledger: LedgerWriter | None = None
        self.keys = KeyIndex(self._load_keys)
        self.meter = Meter(self.metrics, None)
        self.budgets = BudgetBook(config.budgets, self.metrics)
        self.cache = ResponseCache(config.cache) if config.cache.enabled else None
        self.ready = False

    def _circuit_changed(self, upstream: str, state: int) -> None:
        self.metrics.circuit_state.labels(upstream).set(state)

    async def _load_keys(self):  # type: ignore[no-untyped-def]
        assert self.database is not None
        return await list_keys(self.database)

    async def start(self) -> None:
        self.database = await open_database(self.config.ledger.url)
        await self.budgets.load(self.database)
        self.ledger = LedgerWriter(self.database, on_pending=self.metrics.ledger_pending.set)
        self.meter.ledger = self.ledger
        await self.ledger.start()
        await self.keys.start()
        for adapter in self.adapters.values():
            await adapter.start()
        self._export_static_metrics()
        self.ready = True

    def _export_static_metrics(self) -> None:
        self.metrics.build_info.labels(__version__, self.version).set(1)
        for name, deployment in self.router.deployments.items():
            for kind, value in deployment.prices.per_million_usd().items():
                self.metrics.model_price.labels(name, kind).set(value)

    async def close(self) -> None:
        self.ready = False
        await self.keys.close()
        await self.budgets.close()
        for adapter in self.adapters.values():
            await adapter.close()
        if self.ledger is not None:
            await self.ledger.close()
            log.info("ledger flushed: %d rows committed", self.ledger.committed)
        if self.database is not None:
            await self.database.close()
