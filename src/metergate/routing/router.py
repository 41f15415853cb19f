"""Resolve a model name (and the caller's key) to the deployments that may serve it.

Load balancing picks, among a model's deployments whose circuit lets traffic through,
the one with the fewest requests in flight per unit of weight; ties (light traffic,
where nothing is in flight) go by smooth weighted round robin, so weights also split
sequential traffic. In-flight count reacts at once when an upstream slows down
(requests pile up on it) and needs no tuning; a latency average lags, and for LLMs
mostly measures how long the answers were.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from metergate.auth.keys import KeyRecord
from metergate.config.model import GatewayConfig, ModelConfig, Timeouts
from metergate.errors import InvalidRequest, NotFound, quoted
from metergate.metering.pricing import UnitPrices, price_for
from metergate.providers.base import Adapter
from metergate.rollout.controller import RolloutController
from metergate.rollout.state import Rollout
from metergate.routing.circuit import OPEN, CircuitBreaker


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
    credit: int = 0  # smooth weighted round robin among equally loaded deployments


@dataclass(slots=True, eq=False)
class Route:
    name: str
    config: ModelConfig
    deployments: list[Deployment]
    fallbacks: list[Route] = field(default_factory=list)
    worst_prices: UnitPrices = field(default_factory=UnitPrices)
    rollout: Rollout | None = None
    baseline: list[Deployment] = field(default_factory=list)
    candidate: list[Deployment] = field(default_factory=list)
    version: bytes = b""  # what its answers depend on in the config (`_version`)

    @property
    def description(self) -> str:
        return self.config.description

    def pick(self, tried: set[str], affinity: str | None = None) -> Deployment | None:
        """The least loaded available deployment, preferring ones not yet tried.

        While a rollout is in progress (its last stage included) the request's side
        (candidate or baseline) comes first and the other side serves only retries and
        what the first side's open circuits turn away; a request meant for the candidate
        that every candidate circuit turns away counts against it (`Rollout.turned_away`).
        Returns None when every deployment's circuit is open (or weight is 0).
        """
        if len(self.deployments) == 1 and self.rollout is None:  # the common case, fast
            only = self.deployments[0]
            if only.weight and only.breaker.available():
                return only if only.breaker.allow() else None
            return None
        groups = self._groups(affinity, first=not tried)
        for fresh_only in (True, False):
            for group in groups:
                pool = [
                    d
                    for d in group
                    if d.weight and d.breaker.available() and not (fresh_only and d.name in tried)
                ]
                if pool:
                    chosen = _least_loaded(pool)
                    return chosen if chosen.breaker.allow() else None
        return None

    def baseline_after(self, failed: Deployment, tried: set[str]) -> bool:
        """Did the candidate of a rollout in progress fail, with a baseline deployment
        untried and available? Then `pick` gives the baseline next (once the candidate's
        deployments are tried)."""
        rollout = self.rollout
        return (
            rollout is not None
            and rollout.in_progress
            and failed in self.candidate
            and any_untried(self.baseline, tried)
        )

    def serving(self) -> list[Deployment]:
        """The deployments that may take this model's traffic now (at a rollout's last
        stage the baseline still takes what the candidate fails or turns away)."""
        rollout = self.rollout
        if rollout is None or not rollout.active:
            return self.deployments
        if rollout.in_progress:
            return [*self.candidate, *self.baseline]
        return self.candidate if rollout.weight >= 1 else self.baseline

    def _groups(self, affinity: str | None, first: bool) -> tuple[list[Deployment], ...]:
        """The deployments to pick from, in order; `first`: the request's first pick."""
        rollout = self.rollout
        if rollout is None or not rollout.in_progress:
            return (self.serving(),)
        if not rollout.to_candidate(affinity):
            return (self.baseline, self.candidate)
        if first and not any_untried(self.candidate, set()) and _open(self.candidate):
            rollout.turned_away()
        return (self.candidate, self.baseline)


def _within(route: Route, key: KeyRecord) -> Route:
    """`route` for a key with an allow-list: without the fallbacks the key may not use.
    A fallback answers for a model the key could not ask for by name, at that model's
    price and with that provider, which an allow-list exists to rule out."""
    allowed = [fallback for fallback in route.fallbacks if key.allows(fallback.name)]
    if len(allowed) == len(route.fallbacks):
        return route
    # Cached answers are kept apart from those a left-out fallback may have given.
    names = ",".join(fallback.name for fallback in allowed).encode()
    return replace(
        route,
        fallbacks=allowed,
        worst_prices=_worst_prices(route, allowed),
        version=route.version + b"/" + names,
    )


def _may_serve(route: Route, fallbacks: list[Route]) -> list[Deployment]:
    return [d for r in (route, *fallbacks) for d in (*r.deployments, *r.baseline, *r.candidate)]


def _worst_prices(route: Route, fallbacks: list[Route]) -> UnitPrices:
    """Budgets reserve at the dearest price any deployment that may serve could charge,
    on any tier its price lists (one may be the account's default)."""
    return UnitPrices.dearest(
        prices for d in _may_serve(route, fallbacks) for prices in d.prices.every_tier()
    )


def _version(config: GatewayConfig, model: str, upstreams: set[str]) -> bytes:
    """A digest of what a model's answers depend on in the config: its own settings and
    those of every upstream that may serve it, and their providers'. The response cache
    keys answers by it, so that a reload that changes any of them (another upstream,
    another price) does not serve answers from before."""
    parts: list[Any] = [config.models[model].model_dump(mode="json")]
    for name in sorted(upstreams):
        upstream = config.upstreams[name]
        provider = config.providers[upstream.provider]
        parts.append([name, upstream.model_dump(mode="json"), provider.model_dump(mode="json")])
    return hashlib.sha256(orjson.dumps(parts)).digest()[:16]


def any_untried(deployments: list[Deployment], tried: set[str]) -> bool:
    """Is one of `deployments` untried, weighted and let through by its circuit?"""
    return any(d.name not in tried and d.weight and d.breaker.available() for d in deployments)


def _open(deployments: list[Deployment]) -> bool:
    """Is one of `deployments` turning traffic away behind an open circuit? (One that
    is half-open with its probes in flight is being judged by them, not by the
    requests it cannot take meanwhile.)"""
    return any(d.weight and d.breaker.state == OPEN for d in deployments)


def _least_loaded(pool: list[Deployment]) -> Deployment:
    """Fewest in flight per unit of weight; ties by smooth weighted round robin."""
    least = min(d.in_flight / d.weight for d in pool)
    tied = [d for d in pool if d.in_flight / d.weight == least]
    for d in tied:
        d.credit += d.weight
    chosen = max(tied, key=lambda d: d.credit)
    chosen.credit -= sum(d.weight for d in tied)
    return chosen


class Router:
    def __init__(
        self,
        config: GatewayConfig,
        adapters: dict[str, Adapter],
        on_circuit_change: Callable[[str, int], None],
        rollouts: RolloutController | None = None,
        carry: Router | None = None,
    ) -> None:
        """`carry`: the router of the config being replaced; an upstream whose config did
        not change keeps its circuit breaker (and so its health history)."""
        self.config = config
        self.deployments: dict[str, Deployment] = {}
        for name, upstream in config.upstreams.items():
            provider = config.providers[upstream.provider]
            kept = carry.deployments.get(name) if carry else None
            same = (
                carry is not None
                and kept is not None
                and carry.config.upstreams.get(name) == upstream
                and carry.config.providers.get(upstream.provider) == provider
            )
            price = price_for(upstream.model, upstream.price, provider.price_list)
            self.deployments[name] = Deployment(
                name=name,
                adapter=adapters[upstream.provider],
                model=upstream.model,
                prices=UnitPrices.from_price(price, name),
                priced=price is not None,
                weight=upstream.weight,
                timeouts=provider.timeouts.under(upstream.timeouts),
                breaker=(
                    kept.breaker
                    if same and kept is not None
                    else CircuitBreaker(name, upstream.circuit, on_circuit_change)
                ),
            )
        self.routes = {
            name: Route(name, model, [self.deployments[u] for u in model.upstreams])
            for name, model in config.models.items()
        }
        for route in self.routes.values():
            rollout = rollouts.for_model(route.name) if rollouts else None
            if rollout is not None:
                route.rollout = rollout
                route.baseline = [self.deployments[u] for u in rollout.config.baseline]
                route.candidate = [self.deployments[u] for u in rollout.config.candidate]
        for route in self.routes.values():
            route.fallbacks = [self.routes[name] for name in route.config.fallbacks]
            route.worst_prices = _worst_prices(route, route.fallbacks)
            serving = _may_serve(route, route.fallbacks)
            route.version = _version(config, route.name, {d.name for d in serving})

    def route(self, model: object, key: KeyRecord) -> Route:
        if not isinstance(model, str) or not model:
            raise InvalidRequest(
                "`model` is required and must be a string",
                param="model",
                code="missing_model",
            )
        found = self.routes.get(model)
        if found is None or not key.allows(model):
            allowed = ", ".join(self.models_for(key)) or "none"
            reason = "does not exist" if found is None else "is not allowed for this key"
            raise NotFound(
                f"model {quoted(model)} {reason}; models this key may use: {allowed}",
                code="model_not_found",
                param="model",
            )
        if key.models is not None and found.fallbacks:
            return _within(found, key)
        return found

    def models_for(self, key: KeyRecord) -> list[str]:
        return [name for name in self.routes if key.allows(name)]

    def tick_circuits(self) -> None:
        """Move the open circuits whose time is up to half-open (`CircuitBreaker.tick`)."""
        for deployment in self.deployments.values():
            deployment.breaker.tick()
