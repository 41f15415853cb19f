"""Prometheus metrics of the gateway, exactly as the metric contract in the design names them.

Labelled children are cached per label tuple, so the hot path does one dict lookup and a
few increments per request. With several worker processes the values live in
prometheus_client's shared memory-mapped files (PROMETHEUS_MULTIPROC_DIR), so a scrape
of any worker sums all of them and counters never go backwards; they are written by
metering/multiprocess.py's value class and merged by metering/multiprocess_exposition.py.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from metergate.config.model import KeyLabel
from metergate.metering import multiprocess as multiprocess_values
from metergate.metering import multiprocess_exposition
from metergate.metering.exposition import FastExposition

# `_created` samples double the series count and no rule or dashboard here reads them.
disable_created_metrics()

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
TOKEN_TYPES = ("input", "cached_input", "output")

# The contract's `outcome` values, in the order reports list them.
OUTCOMES = (
    "success",
    "invalid_request",
    "unauthorized",
    "rate_limited",
    "budget_exceeded",
    "upstream_error",
    "upstream_rejected",
    "timeout",
    "connection_error",
    "cancelled",
    "gateway_error",
)
# The contract's `api` values: the protocol a caller spoke (which door it came in by).
APIS = ("chat", "responses", "messages", "completions", "embeddings")
UNKNOWN_MODEL = "unknown"
UNKNOWN_KEY = "unknown"
NO_UPSTREAM = "none"
# The `key` label of a key not broken out (`server.metrics_key_label` team or none): no
# key or team name can be "-" (both start with a letter or digit).
ALL_KEYS = "-"


def key_labels(
    keys: Iterable[tuple[str, str | None, Iterable[str] | None]], by: KeyLabel
) -> list[tuple[str, tuple[str, ...] | None]]:
    """The `key` label values live keys are counted under, each with the models any of
    its keys may use (None: all), from (name, team, models) of each key: what `prime`
    starts. By name: one per key; by team: one per team, and `-` for keys in none; by
    none: `-` alone (when there is a key at all)."""
    if by == "name":
        return [(name, None if models is None else tuple(models)) for name, _, models in keys]
    labels: dict[str, frozenset[str] | None] = {}
    for _, team, models in keys:
        label = (team or ALL_KEYS) if by == "team" else ALL_KEYS
        allowed = labels.get(label, frozenset())
        if allowed is not None:
            labels[label] = None if models is None else allowed.union(models)
    return [(label, None if m is None else tuple(m)) for label, m in labels.items()]


# How each gauge combines the workers' values with `serve --workers N` (its
# `multiprocess_mode`). Every gauge here is the state of a running process: the config it
# runs (prices, budget limits, rollout weights, build info), its circuit breakers, what
# it holds in flight, its last sight of the shared budget spend. So every mode is a
# `live*` one, which leaves out the file of a worker that died: that file keeps its last
# values for as long as the gateway runs, and would show an open circuit, an old limit, a
# removed budget, a past period's spend or a past config version after the live workers
# moved on. (A dead worker's counters and histograms still count: totals never go back.)
# - livesum: what each worker holds apart (requests in flight, ledger rows not written);
# - livemax: what every worker sets alike from the config; the worst of their circuits;
#   and budget spend, which each worker shows as of its last settle against the spend it
#   shares with the others (the host's table, or Redis): within a period it only grows,
#   so the highest is the latest (a replacement shows the ledger's at its start);
# - livemin: up (Redis, an MCP server) only while every worker is.


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# Written only by the event loop's thread, on every request: in multi-process mode their
# values take no lock (metering/multiprocess.py). A metric any other thread writes (the
# tracing export thread's dropped spans, say) must not be listed here.
LOOP_ONLY = frozenset(
    {
        "metergate_requests",
        "metergate_request_duration_seconds",
        "metergate_time_to_first_token_seconds",
        "metergate_upstream_attempts",
        "metergate_overhead_seconds",
        "metergate_tokens",
        "metergate_cost_usd",
        "metergate_active_requests",
        "metergate_fallbacks",
        "metergate_cache_requests",
        "metergate_budget_spent_usd",
        "metergate_team_cost_usd",
        "metergate_tag_requests",
        "metergate_tag_cost_usd",
    }
)
# Before any metric exists: prometheus_client reads values.ValueClass per value.
if _directory := multiprocess_dir():
    multiprocess_values.install(_directory, LOOP_ONLY)
else:
    multiprocess_values.install_in_process(LOOP_ONLY)


# Per-request writes go to the children's values directly. prometheus_client's `inc` and
# `observe` check on every call that the metric has no unset labels and that a counter's
# amount is not negative: three Python calls around one addition, ~25 per request. The
# labels are set once here, and what is counted is never negative (token counts are
# checked where an upstream reports them: providers.base.token_count).


class _Histogram:
    """A histogram child's `observe`: the bucket found by bisection, the sum added."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._bounds: list[float] = child._upper_bounds  # sorted, the last +Inf
        self._buckets = child._buckets
        self._sum = child._sum

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect_left(self._bounds, amount)].inc(1)


def value_of(child: Any) -> Any:
    """A counter's or gauge's value: `inc(amount)` and `set(value)` with no checks."""
    return child._value


class _Series:
    """The values of one (model, upstream, key) combination, resolved once."""

    __slots__ = ("cost", "duration", "outcomes", "tokens", "ttft")

    def __init__(self, metrics: Metrics, model: str, upstream: str, key: str) -> None:
        self.duration = _Histogram(metrics.request_duration.labels(model, upstream))
        self.ttft = _Histogram(metrics.time_to_first_token.labels(model, upstream))
        self.tokens = tuple(
            value_of(metrics.tokens.labels(model, upstream, key, t)) for t in TOKEN_TYPES
        )
        self.cost = value_of(metrics.cost.labels(model, upstream, key))
        self.outcomes: dict[tuple[str, str], Any] = {}  # (outcome, api) -> value


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "metergate_requests",
            "Requests by outcome.",
            ["model", "upstream", "key", "outcome", "api"],
            registry=r,
        )
        self.request_duration = Histogram(
            "metergate_request_duration_seconds",
            "Whole request time as the caller sees it.",
            ["model", "upstream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "metergate_time_to_first_token_seconds",
            "Time to the first streamed token.",
            ["model", "upstream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "metergate_upstream_attempts",
            "Attempts against upstreams by outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.overhead = Histogram(
            "metergate_overhead_seconds",
            "Gateway time minus upstream time.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.observe_overhead = _Histogram(self.overhead).observe
        self.tokens = Counter(
            "metergate_tokens", "Tokens by type.", ["model", "upstream", "key", "type"], registry=r
        )
        self.cost = Counter(
            "metergate_cost_usd",
            "Cost in USD at the configured prices.",
            ["model", "upstream", "key"],
            registry=r,
        )
        self.model_price = Gauge(
            "metergate_model_price_usd_per_million_tokens",
            "Configured price per upstream.",
            ["upstream", "type"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.active_requests = Gauge(
            "metergate_active_requests",
            "Requests in flight.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.fallbacks = Counter(
            "metergate_fallbacks",
            "Requests served by a fallback upstream.",
            ["model", "from_upstream", "to_upstream"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "metergate_circuit_state",
            "0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_requests = Counter(
            "metergate_cache_requests", "Response cache lookups.", ["model", "result"], registry=r
        )
        self.budget_spent = Gauge(
            "metergate_budget_spent_usd",
            "Spend in the budget's current period.",
            ["budget"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.budget_limit = Gauge(
            "metergate_budget_limit_usd",
            "Limit of the budget in its period (hard: enforced; soft: alerts only).",
            ["budget"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.budget_alerts = Counter(
            "metergate_budget_alerts",
            "Budget alert thresholds crossed (percent of the limit).",
            ["budget", "threshold"],
            registry=r,
        )
        self.rollout_weight = Gauge(
            "metergate_rollout_weight",
            "Share of a rollout's traffic per target.",
            ["rollout", "target"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_transitions = Counter(
            "metergate_rollout_transitions",
            "Rollout stage changes.",
            ["rollout", "event"],
            registry=r,
        )
        self.ledger_pending = Gauge(
            "metergate_ledger_pending_rows",
            "Ledger rows not yet committed.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "metergate_build_info",
            "Version of the running gateway and its config.",
            ["version", "config_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.team_cost_usd = Counter(
            "metergate_team_cost_usd",
            "Cost in USD of each team's keys.",
            ["team"],
            registry=r,
        )
        self.tag_requests = Counter(
            "metergate_tag_requests",
            "Requests by allow-listed tag (tags.metric_labels).",
            ["tag", "value"],
            registry=r,
        )
        self.tag_cost_usd = Counter(
            "metergate_tag_cost_usd",
            "Cost in USD by allow-listed tag (tags.metric_labels).",
            ["tag", "value"],
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "metergate_trace_spans_dropped",
            "Spans not exported: the queue was full or the collector refused or was down.",
            registry=r,
        )
        self.request_log_records = Counter(
            "metergate_request_log_records",
            "Request log records by what became of them.",
            ["result"],
            registry=r,
        )
        self._teams: dict[str, Any] = {}
        self._tags: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._active: dict[str, Any] = {}
        self._exposition: FastExposition | None = None
        self._exposition_lock = threading.Lock()
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._attempts: dict[tuple[str, str], Any] = {}
        self._redis_up: Gauge | None = None
        # what `prime` last started: model -> upstreams, key -> its models, rollouts
        self._primed_routes: dict[str, tuple[str, ...]] = {}
        self._primed_keys: dict[str, frozenset[str] | None] = {}
        self._primed_rollouts: frozenset[str] = frozenset()

    def redis_up(self) -> Gauge:
        """`metergate_redis_up`, registered on first use: only a gateway configured with
        Redis exports it (an untouched gauge would read 0, "down", everywhere else)."""
        if self._redis_up is None:
            self._redis_up = Gauge(
                "metergate_redis_up",
                "1 while the shared-state Redis is reachable, 0 while degraded.",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        return self._redis_up

    def active(self, model: str) -> Any:
        """The in-flight gauge's value of a model: `inc(1)`, `inc(-1)` (cached: labels()
        is not free)."""
        found = self._active.get(model)
        if found is None:
            found = self._active[model] = value_of(self.active_requests.labels(model))
        return found

    def series(self, model: str, upstream: str, key: str) -> _Series:
        found = self._series.get((model, upstream, key))
        if found is None:
            found = self._series[(model, upstream, key)] = _Series(self, model, upstream, key)
        return found

    def count_request(
        self, series: _Series, labels: tuple[str, str, str], outcome: str, api: str = "chat"
    ) -> None:
        """`api` is one of APIS (set by the gateway's doors, never by the caller)."""
        value = series.outcomes.get((outcome, api))
        if value is None:
            child = self.requests.labels(*labels, outcome, api)
            value = series.outcomes[(outcome, api)] = value_of(child)
        value.inc(1)

    def count_attempt(self, upstream: str, outcome: str) -> None:
        value = self._attempts.get((upstream, outcome))
        if value is None:
            child = self.upstream_attempts.labels(upstream, outcome)
            value = self._attempts[(upstream, outcome)] = value_of(child)
        value.inc(1)

    def prime(
        self,
        serving: Mapping[str, Iterable[str]],
        keys: Iterable[tuple[str, Iterable[str] | None]],
        rollouts: Iterable[str] = (),
    ) -> None:
        """Create at 0 every series the alerts need before their first increment: cost,
        tokens and successful requests for each configured model, each upstream that may
        serve it (its own, its rollout's, its fallbacks') and each key allowed to use it;
        and each rollout's `rolled_back` count. `increase()` needs a sample before the
        first increment: without one, a burst on a new key or a first rollback would be
        invisible to MetergateHighSpending and MetergateRolloutRolledBack. Only
        configured names and existing keys, as the metric contract allows; a call
        starts only what is new since the last one (all keys again when the models'
        upstreams changed).

        `serving`: model -> upstream names; `keys`: (name, the models it may use or
        None for all) of the keys in use."""
        routes = {model: tuple(sorted(set(ups))) for model, ups in serving.items()}
        allowed = {name: None if m is None else frozenset(m) for name, m in keys}
        if routes == self._primed_routes:
            # only keys that are new or may use other models (100,000 keys: ~40 ms, where
            # starting them all again took ~190 ms of the event loop per change of keys)
            known = self._primed_keys
            fresh = {k: m for k, m in allowed.items() if k not in known or known[k] != m}
        else:
            fresh = allowed
        self._primed_routes, self._primed_keys = routes, allowed
        for model, upstreams in routes.items():
            for key, models in fresh.items():
                if models is not None and model not in models:
                    continue
                for upstream in upstreams:
                    series = self.series(model, upstream, key)
                    # One api suffices: the rules sum requests over it.
                    if ("success", "chat") not in series.outcomes:
                        series.outcomes[("success", "chat")] = value_of(
                            self.requests.labels(model, upstream, key, "success", "chat")
                        )
        started = frozenset(rollouts)
        for rollout in started - self._primed_rollouts:
            self.rollout_transitions.labels(rollout, "rolled_back")
        self._primed_rollouts = started

    def team_cost(self, team: str) -> Any:
        found = self._teams.get(team)
        if found is None:
            found = self._teams[team] = self.team_cost_usd.labels(team)
        return found

    def count_tag(self, tag: str, value: str, cost_nano: int) -> None:
        found = self._tags.get((tag, value))
        if found is None:
            found = self._tags[(tag, value)] = (
                self.tag_requests.labels(tag, value),
                self.tag_cost_usd.labels(tag, value),
            )
        found[0].inc()
        if cost_nano:
            found[1].inc(cost_nano / 1e9)

    def exposition(self) -> bytes:
        """The text a scrape returns: all workers' values when running several. Safe to
        call from any thread (/metrics renders in one) while the loop writes values;
        renders run one at a time."""
        directory = multiprocess_dir()
        if directory:
            return multiprocess_exposition.shared(directory).render()
        with self._exposition_lock:
            if self._exposition is None:
                self._exposition = FastExposition(self.registry)
            return self._exposition.render()
