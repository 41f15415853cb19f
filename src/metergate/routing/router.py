"""Resolve a model name (and the caller's key) to the deployments that may serve it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from metergate.api.errors import GatewayError
from metergate.auth.keys import KeyRecord
from metergate.config.model import GatewayConfig, ModelConfig
from metergate.metering.pricing import UnitPrices, price_for
from metergate.providers.base import Adapter


@dataclass(slots=True)
class Deployment:
    """A configured upstream, resolved: its adapter, provider model id and prices."""

    name: str
    adapter: Adapter
    model: str
    prices: UnitPrices
    priced: bool


@dataclass(slots=True)
class Route:
    name: str
    config: ModelConfig
    deployments: list[Deployment]
    worst_prices: UnitPrices = field(init=False)
    _turn: itertools.cycle = field(init=False, repr=False)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(self.deployments)
        # Budgets reserve at the dearest price any deployment of the model could charge.
        self.worst_prices = UnitPrices(
            max(d.prices.input for d in self.deployments),
            max(d.prices.cached_input for d in self.deployments),
            max(d.prices.output for d in self.deployments),
        )

    @property
    def description(self) -> str:
        return self.config.description

    def pick(self) -> Deployment:
        """Round robin over the model's deployments."""
        return next(self._turn)


class Router:
    def __init__(self, config: GatewayConfig, adapters: dict[str, Adapter]) -> None:
        self.deployments: dict[str, Deployment] = {}
        for name, upstream in config.upstreams.items():
            provider = config.providers[upstream.provider]
            price = price_for(upstream.model, upstream.price, provider.price_list)
            self.deployments[name] = Deployment(
                name,
                adapters[upstream.provider],
                upstream.model,
                UnitPrices.from_price(price),
                price is not None,
            )
        self.routes = {
            name: Route(name, model, [self.deployments[u] for u in model.upstreams])
            for name, model in config.models.items()
        }

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
