"""Exact cost: prices become integer pico-USD per token, costs integer nano-USD.

Floats drift when millions of small costs are added; integers do not. A price with up
to six decimals per million tokens is exact in pico-USD per token, so a request's cost
is exact in pico-USD and rounded once, half up, to the nano-USD the ledger stores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from metergate.config.model import SERVICE_TIERS, Price, TokenPrice
from metergate.providers.base import Usage

PRICE_LISTS_FILE = Path(__file__).with_name("prices.yaml")
PROVIDER_PRICES_FILE = Path(__file__).with_name("provider_prices.yaml")
DEFAULT_PRICE_LIST = "official"
FREE = "free"  # every model at 0: local servers (the ollama and vllm presets)
# Geographies of Bedrock's cross-region inference profiles, the prefix of their ids.
_PROFILE_PREFIXES = frozenset({"us", "eu", "apac", "global", "us-gov", "jp", "au", "ca"})
_PICO_PER_MILLION = Decimal(1_000_000)  # USD per 1e6 tokens -> pico-USD per token
_PRICED_APART = frozenset(SERVICE_TIERS)  # other tiers ("default", "auto") are standard
log = logging.getLogger("metergate.metering")


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """Pico-USD per token of each type."""

    input: int = 0
    cached_input: int = 0
    output: int = 0
    cache_write: int = 0  # prompt-cache writes (5 minutes), which are also input tokens
    cache_write_1h: int = 0  # ... and writes kept for an hour
    web_search: int = 0  # one search by a provider's server-side tool
    # Those of the processing tiers priced apart (`Price.flex`, `.priority`), by name.
    tiers: tuple[tuple[str, UnitPrices], ...] = ()
    owner: str = ""  # the deployment they are of, named when a tier has no price
    # tiers said to have no price (once per deployment and config: a reload says again)
    unpriced: set[str] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def from_price(cls, price: Price | None, owner: str = "") -> UnitPrices:
        if price is None:
            return cls(owner=owner)
        web_search = _pico(price.web_search) * 1000  # per 1,000 searches, not 1e6
        tiers = tuple(
            (name, cls._of(tier, web_search, owner=owner))
            for name in SERVICE_TIERS
            if (tier := getattr(price, name)) is not None
        )
        return cls._of(price, web_search, tiers, owner)

    @classmethod
    def _of(
        cls,
        price: TokenPrice,
        web_search: int,
        tiers: tuple[tuple[str, UnitPrices], ...] = (),
        owner: str = "",
    ) -> UnitPrices:
        return cls(
            _pico(price.input),
            _pico(price.cached),
            _pico(price.output),
            _pico(price.write),
            _pico(price.write_1h),
            web_search,
            tiers,
            owner,
        )

    def cost_nano(self, usage: Usage) -> int:
        if usage.billed_nano is not None:  # the upstream's own figure (Usage.billed_nano)
            return usage.billed_nano
        if usage.service_tier in _PRICED_APART:  # (None is not)
            return self._tier(usage.service_tier).tokens_nano(usage)
        return self.tokens_nano(usage)

    def tokens_nano(self, usage: Usage) -> int:
        """What `usage`'s tokens and searches cost at these prices, whatever its tier."""
        pico = (
            usage.input_tokens * self.input
            + usage.cached_input_tokens * self.cached_input
            + usage.output_tokens * self.output
        )
        if usage.cache_write_tokens:  # counted as input above: add what a write costs more
            hour = usage.cache_write_1h_tokens
            pico += (usage.cache_write_tokens - hour) * (self.cache_write - self.input)
            pico += hour * (self.cache_write_1h - self.input)
        if usage.web_searches:
            pico += usage.web_searches * self.web_search
        return (pico + 500) // 1000

    def _tier(self, name: str) -> UnitPrices:
        """The prices of tier `name`: its own when the config has them, else the standard
        ones, said once (the answer is billed either way)."""
        for found, prices in self.tiers:
            if found == name:
                return prices
        if name not in self.unpriced:
            self.unpriced.add(name)
            log.warning(
                "upstream %r served a request on its %r tier, which its price does not "
                "list: billed at the standard price; set its price.%s",
                self.owner,
                name,
                name,
            )
        return self

    def every_tier(self) -> tuple[UnitPrices, ...]:
        """These prices and those of each tier priced apart."""
        return (self, *(prices for _, prices in self.tiers))

    @staticmethod
    def dearest(prices: Iterable[UnitPrices]) -> UnitPrices:
        """Each price at its highest among `prices` (what budgets hold a worst case at)."""
        every = tuple(prices)
        return UnitPrices(
            max(p.input for p in every),
            max(p.cached_input for p in every),
            max(p.output for p in every),
            max(p.cache_write for p in every),
            max(p.cache_write_1h for p in every),
            max(p.web_search for p in every),
        )

    def per_million_usd(self) -> dict[str, float]:
        return {
            "input": self.input / 1e6,
            "cached_input": self.cached_input / 1e6,
            "output": self.output / 1e6,
        }


def _pico(per_million: Decimal) -> int:
    return int((per_million * _PICO_PER_MILLION).to_integral_value())


def nano_to_usd(nano: int) -> float:
    return nano / 1e9


@cache
def shipped_price_lists() -> dict[str, dict[str, Price]]:
    raw = yaml.safe_load(PRICE_LISTS_FILE.read_text(encoding="utf-8"))
    lists = {
        name: {model: Price(**price) for model, price in table.items()}
        for name, table in raw.items()
    }
    for name, entry in _provider_lists().items():
        lists[name] = {model: Price(**price) for model, price in entry["models"].items()}
    lists[FREE] = {}
    return lists


@cache
def price_list_sources() -> dict[str, str]:
    """Where each provider price list's figures come from, and when they were read."""
    return {name: f"{e['source']}, as of {e['as_of']}" for name, e in _provider_lists().items()}


def _provider_lists() -> dict[str, dict[str, Any]]:
    raw = yaml.safe_load(PROVIDER_PRICES_FILE.read_text(encoding="utf-8"))
    return dict(raw or {})


def load_price_list(name_or_path: str) -> dict[str, Price]:
    """A shipped list by name, or a YAML file mapping model id -> price."""
    lists = shipped_price_lists()
    if name_or_path in lists:
        return lists[name_or_path]
    raw = yaml.safe_load(Path(name_or_path).read_text(encoding="utf-8"))
    return {model: Price(**price) for model, price in (raw or {}).items()}


def price_for(model: str, explicit: Price | None, price_list: str | None) -> Price | None:
    """The price of an upstream: its own, else its provider's list entry, else None.

    The `free` list prices every model at 0. A Bedrock cross-region inference profile
    id (`us.anthropic...`) is priced as the model it routes to.
    """
    if explicit is not None:
        return explicit
    name = price_list or DEFAULT_PRICE_LIST
    if name == FREE:
        return Price()
    table = shipped_price_lists().get(name, {})
    found = table.get(model)
    if found is None:
        region, dot, rest = model.partition(".")
        if dot and region in _PROFILE_PREFIXES:
            found = table.get(rest)
    return found
