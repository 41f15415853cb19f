"""What a gateway's plan holds of the shared state: one link and what uses it."""

from __future__ import annotations

from metergate.config.model import RedisConfig
from metergate.metering.metrics import Metrics
from metergate.shared.cache import SharedCache
from metergate.shared.counters import SharedCounters
from metergate.shared.redis import RedisLink


class SharedState:
    """One Redis link and what uses it; carried over a reload while `redis:` is unchanged."""

    def __init__(self, config: RedisConfig, metrics: Metrics) -> None:
        self.config = config
        self.link = RedisLink(config, metrics)
        self.counters = SharedCounters(self.link)
        self.cache = SharedCache(self.link)

    async def start(self) -> None:
        await self.link.start()

    async def close(self) -> None:
        await self.counters.drain()
        await self.link.close()
