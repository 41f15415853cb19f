"""Resolve a model name (and the caller's key) to the deployments that may serve it.

Load balancing picks, among a model's deployments whose circuit lets traffic through,
the one with the fewest requests in flight per unit of weight. In-flight count reacts
at once when an upstream slows down (requests pile up on it) and needs no tuning; a
latency average lags, and for LLMs mostly measures how long the answers were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from metergate.api.errors import GatewayError
from metergate.auth.keys import KeyRecord
from metergate.config.model import GatewayConfig, ModelConfig, Timeouts
from metergate.metering.pricing import UnitPrices, price_for
from metergate.providers.base import Adapter
from metergate.routing.circuit import CircuitBreaker


@dataclass(slots=True, eq=False)
class Deployment:
    """A configured upstream, resolved: adapter, provider model id, prices and health."""

    name: str
    adapter: Adapter
    model: str
    prices: UnitPrices
    priced: bool
    weight: int
    timeouts: Timeouts
    breaker: CircuitBreaker
    in_flight: int = 0


@dataclass(slots=True, eq=False)
class Route:
    name: str
    config: ModelConfig
    deployments: list[Deployment]
    fallbacks: list[Route] = field(default_factory=list)
    worst_prices: UnitPrices = field(default_factory=UnitPrices)
    _turn: int = 0

    @property
    def description(self) -> str:
        return self.config.description

    def pick(self, tried: set[str]) -> Deployment | None:
        """The least loaded available deployment, preferring ones not yet tried.

        Returns None when every deployment's circuit is open (or weight is 0).
        """
        candidates = [d for d in self.deployments if d.weight and d.breaker.available()]
        fresh = [d for d in candidates if d.name not in tried]
        pool = fresh or candidates
        if not pool:
            return None
        self._turn += 1
        count = len(pool)
        best = min(
            range(count),
            key=lambda i: ((pool[i].in_flight + 1) / pool[i].weight, (i - self._turn) % count),
        )
        chosen = pool[best]
        return chosen if chosen.breaker.allow() else None


class Router:
    def __init__(
        self,
        config: GatewayConfig,
        adapters: dict[str, Adapter],
        on_circuit_change: Callable[[str, int], None],
    ) -> None:
        self.deployments: dict[str, Deployment] = {}
        for name, upstream in config.upstreams.items():
            provider = config.providers[upstream.provider]
            price = price_for(upstream.model, upstream.price, provider.price_list)
            self.deployments[name] = Deployment(
                name=name,
                adapter=adapters[upstream.provider],
                model=upstream.model,
                prices=UnitPrices.from_price(price),
                priced=price is not None,
                weight=upstream.weight,
                timeouts=upstream.timeouts or provider.timeouts,
                breaker=CircuitBreaker(name, upstream.circuit, on_circuit_change),
            )
        self.routes = {
            name: Route(name, model, [self.deployments[u] for u in model.upstreams])
            for name, model in config.models.items()
        }
        for route in self.routes.values():
            route.fallbacks = [self.routes[name] for name in route.config.fallbacks]
            # Budgets reserve at the dearest price any deployment that may serve could charge.
            serving = [d for r in (route, *route.fallbacks) for d in r.deployments]
            route.worst_prices = UnitPrices(
                max(d.prices.input for d in serving),
                max(d.prices.cached_input for d in serving),
                max(d.prices.output for d in serving),
            )

    def route(self, model: object, key: KeyRecord) -> Route:
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400,
                "`model` is required and must be a string",
                param="model",
                code="missing_model",
            )
        found = self.routes.get(model)
        if found is None or not key.allows(model):
            allowed = ", ".join(self.models_for(key)) or "none"
            reason = "does not exist" if found is None else "is not allowed for this key"
            raise GatewayError(
                404,
                f"model {model!r} {reason}; models this key may use: {allowed}",
                outcome="invalid_request",
                code="model_not_found",
                param="model",
            )
        return found

    def models_for(self, key: KeyRecord) -> list[str]:
        return [name for name in self.routes if key.allows(name)]
