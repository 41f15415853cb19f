"""Unit tests of the resilience building blocks, with an injected clock.

CircuitBreaker transitions, backoff bounds, the retry budget, and weighted picking.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from metergate.config.model import (
    CircuitConfig,
    RetryBudgetConfig,
    RetryConfig,
    RolloutConfig,
    Timeouts,
)
from metergate.errors import ClientGone, UpstreamServerError
from metergate.metering.meter import RequestLog
from metergate.metering.metrics import Metrics
from metergate.metering.pricing import UnitPrices
from metergate.rollout.state import Rollout
from metergate.routing import retry as retry_module
from metergate.routing.circuit import CLOSED, FAILURES, HALF_OPEN, OPEN, CircuitBreaker
from metergate.routing.dispatch import Dispatcher
from metergate.routing.retry import RetryBudget, backoff_seconds
from metergate.routing.router import Deployment, Route


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(clock: Clock, changes: list[tuple[str, int]] | None = None, **settings: Any):
    config = CircuitConfig(**settings)
    record = changes if changes is not None else []
    return CircuitBreaker("up", config, lambda name, state: record.append((name, state)), clock)


def fail(b: CircuitBreaker, times: int, outcome: str = "upstream_error") -> None:
    for _ in range(times):
        b.record(outcome)


# --- circuit breaker -----------------------------------------------------------------


def test_opens_after_consecutive_failures_and_reports_each_change(caplog):
    """`failure_threshold` consecutive failures open it; the callback and log see it."""
    clock, changes = Clock(), []
    b = breaker(clock, changes, failure_threshold=3, min_requests=100)
    assert changes == [("up", CLOSED)]
    with caplog.at_level(logging.WARNING, logger="metergate.circuit"):
        fail(b, 2)
        assert b.state == CLOSED and b.allow()
        fail(b, 1)
    assert b.state == OPEN
    assert changes == [("up", CLOSED), ("up", OPEN)]
    assert "circuit up: closed -> open" in caplog.text


def test_a_success_resets_the_consecutive_count():
    b = breaker(Clock(), failure_threshold=3, min_requests=100)
    fail(b, 2)
    b.record("success")
    fail(b, 2)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN


@pytest.mark.parametrize("outcome", sorted(FAILURES))
def test_every_failure_outcome_counts(outcome: str):
    b = breaker(Clock(), failure_threshold=2, min_requests=100)
    fail(b, 2, outcome)
    assert b.state == OPEN


def test_caller_faults_and_cancellations_do_not_count_as_failures():
    """4xx the caller caused (and cancelled attempts) never open the breaker."""
    b = breaker(Clock(), failure_threshold=2, min_requests=2, failure_ratio=0.5)
    for _ in range(20):
        b.record("upstream_rejected")
        b.record("invalid_request")
        b.record("cancelled")
    assert b.state == CLOSED
    # A cancellation between two failures neither resets nor extends the streak.
    b = breaker(Clock(), failure_threshold=2, min_requests=100)
    fail(b, 1)
    b.record("cancelled")
    fail(b, 1)
    assert b.state == OPEN


def test_opens_on_failure_ratio_once_min_requests_seen():
    clock = Clock()
    b = breaker(clock, failure_threshold=100, failure_ratio=0.5, min_requests=6)
    for _ in range(2):
        b.record("success")
        fail(b, 1)
    b.record("success")
    assert b.state == CLOSED  # 2 of 5 failed, and only 5 seen
    fail(b, 1)
    assert b.state == OPEN  # 3 of 6 failed: ratio 0.5 reached with min_requests


def test_ratio_below_threshold_keeps_it_closed():
    b = breaker(Clock(), failure_threshold=100, failure_ratio=0.5, min_requests=4)
    for _ in range(10):
        b.record("success")
        b.record("success")
        fail(b, 1)
    assert b.state == CLOSED  # a third failed: under 0.5


def test_results_older_than_the_window_are_forgotten():
    clock = Clock()
    b = breaker(clock, failure_threshold=100, failure_ratio=0.5, min_requests=4, window_seconds=10)
    fail(b, 3)
    clock.advance(11)  # those three are now outside the window
    for _ in range(3):
        b.record("success")
    fail(b, 1)
    assert b.state == CLOSED  # 1 of 4 in the window failed (4 of 7 counting the old ones)
    fail(b, 2)
    assert b.state == OPEN  # 3 of 6


def test_a_result_counts_for_90_to_100_percent_of_the_window():
    """The window is ten buckets of a tenth of it: 8.9 s after a failure, 10 s windows
    still count it; 9.1 s after, when a new tenth began, they may not."""
    settings = dict(failure_threshold=100, failure_ratio=0.5, min_requests=4, window_seconds=10)
    for later, counted in ((8.9, True), (9.1, False)):
        clock = Clock()
        b = breaker(clock, **settings)
        clock.advance(0.95)  # late in a tenth of the window
        fail(b, 3)
        clock.advance(later)
        b.record("success")
        assert b.state == (OPEN if counted else CLOSED), later  # 3 of 4, or 0 of 1


def test_open_rejects_until_open_seconds_then_half_opens():
    clock, changes = Clock(), []
    b = breaker(clock, changes, failure_threshold=1, open_seconds=30, half_open_probes=2)
    fail(b, 1)
    assert b.state == OPEN
    assert not b.allow() and not b.available()
    clock.advance(10)
    assert b.retry_in() == pytest.approx(20)
    assert not b.allow()
    clock.advance(20)
    assert b.available()
    assert b.state == OPEN  # `available` only looks
    assert b.allow()
    assert b.state == HALF_OPEN
    assert changes[-2:] == [("up", OPEN), ("up", HALF_OPEN)]


def test_half_open_allows_only_probe_limit_concurrently():
    clock = Clock()
    b = breaker(clock, failure_threshold=1, open_seconds=5, half_open_probes=2)
    fail(b, 1)
    clock.advance(5)
    assert b.allow() and b.allow()
    assert not b.allow() and not b.available()
    b.record("success")  # one probe back: a slot frees, one success counted
    assert b.state == HALF_OPEN and b.available()


def test_closes_after_probe_limit_successes(caplog):
    clock = Clock()
    b = breaker(clock, failure_threshold=1, open_seconds=5, half_open_probes=2)
    fail(b, 1)
    clock.advance(5)
    with caplog.at_level(logging.WARNING, logger="metergate.circuit"):
        assert b.allow()
        b.record("success")
        assert b.state == HALF_OPEN
        assert b.allow()
        b.record("success")
    assert b.state == CLOSED
    assert "circuit up: open -> half-open" in caplog.text
    assert "circuit up: half-open -> closed" in caplog.text
    # Closed means a fresh start: one failure short of the threshold does not reopen.
    assert b.allow()


def test_a_failed_probe_reopens_for_another_open_seconds():
    clock = Clock()
    b = breaker(clock, failure_threshold=1, open_seconds=5, half_open_probes=2)
    fail(b, 1)
    clock.advance(5)
    assert b.allow()
    b.record("success")
    assert b.allow()
    b.record("timeout")
    assert b.state == OPEN
    assert b.retry_in() == pytest.approx(5)
    assert not b.allow()
    clock.advance(5)
    assert b.allow() and b.state == HALF_OPEN


def test_probe_successes_do_not_carry_over_a_reopen():
    clock = Clock()
    b = breaker(clock, failure_threshold=1, open_seconds=5, half_open_probes=2)
    fail(b, 1)
    clock.advance(5)
    b.allow()
    b.record("success")
    b.allow()
    b.record("upstream_error")
    clock.advance(5)
    b.allow()
    b.record("success")
    assert b.state == HALF_OPEN  # needs two fresh successes


def test_cancelled_probe_frees_its_slot_without_deciding():
    clock = Clock()
    b = breaker(clock, failure_threshold=1, open_seconds=5, half_open_probes=1)
    fail(b, 1)
    clock.advance(5)
    assert b.allow()
    assert not b.available()
    b.record("cancelled")
    assert b.state == HALF_OPEN and b.available()
    assert b.allow()
    b.record("upstream_rejected")  # the upstream answered: a 4xx is a healthy probe
    assert b.state == CLOSED


def test_results_arriving_while_open_are_ignored():
    """Attempts that started before the breaker opened do not extend or end the outage."""
    clock = Clock()
    b = breaker(clock, failure_threshold=1, open_seconds=5)
    fail(b, 1)
    clock.advance(3)
    b.record("success")
    fail(b, 1)
    assert b.state == OPEN
    assert b.retry_in() == pytest.approx(2)


def test_disabled_breaker_never_opens():
    b = breaker(Clock(), enabled=False, failure_threshold=1)
    fail(b, 50)
    assert b.state == CLOSED and b.allow() and b.available()


# --- backoff ----------------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_maximum(monkeypatch):
    """Full jitter draws from [0, min(max, base * 2**n)]."""
    draws: list[tuple[float, float]] = []
    monkeypatch.setattr(retry_module.random, "uniform", lambda lo, hi: draws.append((lo, hi)) or hi)
    policy = RetryConfig(backoff_base=0.25, backoff_max=3)
    waits = [backoff_seconds(policy, n, None) for n in range(6)]
    assert waits == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert all(lo == 0 for lo, _ in draws)


def test_backoff_is_jittered_within_bounds():
    random.seed(7)
    policy = RetryConfig(backoff_base=0.1, backoff_max=0.3)
    for retry, ceiling in ((0, 0.1), (1, 0.2), (2, 0.3), (5, 0.3)):
        waits = [backoff_seconds(policy, retry, None) for _ in range(500)]
        assert all(w is not None and 0 <= w <= ceiling for w in waits)
        # Full jitter spreads over the whole range, not near the ceiling only.
        assert min(waits) < 0.1 * ceiling and max(waits) > 0.9 * ceiling
        assert sum(waits) / len(waits) == pytest.approx(ceiling / 2, rel=0.15)


def test_zero_base_means_no_wait():
    assert backoff_seconds(RetryConfig(backoff_base=0), 3, None) == 0


@pytest.mark.parametrize(
    ("retry_after", "expected"), [(0.0, 0.0), (1.0, 1.0), (7.5, 7.5), (30.0, 30.0)]
)
def test_retry_after_is_honoured_exactly_up_to_the_maximum(retry_after, expected):
    policy = RetryConfig(backoff_base=0.01, backoff_max=0.02, max_retry_after=30)
    assert backoff_seconds(policy, 0, retry_after) == expected


def test_retry_after_beyond_the_maximum_means_move_on():
    policy = RetryConfig(max_retry_after=30)
    assert backoff_seconds(policy, 0, 30.5) is None
    assert backoff_seconds(RetryConfig(max_retry_after=0), 0, 1) is None


# --- retry budget -------------------------------------------------------------------------


@pytest.fixture
def budget_clock(monkeypatch) -> Clock:
    """The retry module's clock, replaced (only in that module)."""
    clock = Clock()
    monkeypatch.setattr(retry_module, "time", SimpleNamespace(monotonic=clock))
    return clock


def drain(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_spend():
        spent += 1
        assert spent < 10_000
    return spent


def test_budget_starts_with_a_burst_of_its_capacity(budget_clock):
    assert drain(RetryBudget(RetryBudgetConfig(ratio=0.1, min_per_second=0))) == 10
    assert drain(RetryBudget(RetryBudgetConfig(ratio=0.1, min_per_second=5))) == 50


def test_budget_ratio_earns_one_retry_per_tenth_request(budget_clock):
    budget = RetryBudget(RetryBudgetConfig(ratio=0.1, min_per_second=0))
    drain(budget)
    for _ in range(9):
        budget.on_request()
    assert not budget.try_spend()
    budget.on_request()  # the tenth request: 10 x 0.1 = one retry
    assert budget.try_spend()
    assert not budget.try_spend()
    for _ in range(95):
        budget.on_request()
    assert drain(budget) == 9


def test_budget_floor_refills_with_time(budget_clock):
    budget = RetryBudget(RetryBudgetConfig(ratio=0, min_per_second=2))
    assert drain(budget) == 20
    budget_clock.advance(0.25)
    assert not budget.try_spend()  # half a token
    budget_clock.advance(0.25)
    assert budget.try_spend()
    assert not budget.try_spend()
    budget_clock.advance(3)
    assert drain(budget) == 6


def test_budget_never_exceeds_its_capacity(budget_clock):
    budget = RetryBudget(RetryBudgetConfig(ratio=1, min_per_second=1))
    for _ in range(1000):
        budget.on_request()
    budget_clock.advance(3600)
    assert drain(budget) == 10


# --- weighted picking ---------------------------------------------------------------------


def deployment(name: str, weight: int, clock: Clock, **circuit: Any) -> Deployment:
    return Deployment(
        name=name,
        adapter=None,  # type: ignore[arg-type]
        model=name,
        prices=UnitPrices(),
        priced=True,
        weight=weight,
        timeouts=Timeouts(),
        breaker=CircuitBreaker(name, CircuitConfig(**circuit), lambda n, s: None, clock),
    )


def route(*deployments: Deployment) -> Route:
    return Route("m", None, list(deployments))  # type: ignore[arg-type]


def test_weights_split_sequential_traffic():
    clock = Clock()
    r = route(deployment("a", 3, clock), deployment("b", 1, clock))
    picks = Counter()
    for _ in range(40):
        chosen = r.pick(set())
        assert chosen is not None
        picks[chosen.name] += 1
    assert picks == {"a": 30, "b": 10}


def test_equal_weights_alternate():
    clock = Clock()
    r = route(deployment("a", 1, clock), deployment("b", 1, clock))
    names = [r.pick(set()).name for _ in range(6)]  # type: ignore[union-attr]
    assert sorted(Counter(names).values()) == [3, 3]
    assert all(x != y for x, y in itertools.pairwise(names))


def test_least_in_flight_per_weight_wins():
    clock = Clock()
    a, b = deployment("a", 3, clock), deployment("b", 1, clock)
    r = route(a, b)
    a.in_flight, b.in_flight = 6, 1  # a: 2 per unit of weight, b: 1
    assert all(r.pick(set()) is b for _ in range(5))
    a.in_flight, b.in_flight = 2, 1  # a: 0.67, b: 1
    assert all(r.pick(set()) is a for _ in range(5))


def test_weight_zero_and_open_circuits_are_skipped_and_untried_preferred():
    clock = Clock()
    a = deployment("a", 1, clock, failure_threshold=1, open_seconds=10)
    b = deployment("b", 1, clock)
    off = deployment("off", 0, clock)
    r = route(a, b, off)
    a.breaker.record("upstream_error")
    assert all(r.pick(set()) is b for _ in range(10))
    assert r.pick({"b"}) is b  # nothing untried left: the tried one again
    b.breaker.record("connection_error")
    for _ in range(4):
        b.breaker.record("connection_error")
    assert r.pick(set()) is None  # every circuit open, the rest weighted out
    clock.advance(10)
    assert r.pick(set()) is a  # a's open_seconds passed, b's (default 30) not
    assert a.breaker.state == HALF_OPEN


async def test_a_caller_gone_before_its_next_attempt_gives_back_the_probe_slot():
    """The caller left during a failed attempt; the fallback's half-open circuit was
    picked for the next one, which is not made. The probe slot `pick` took must be
    given back: two such callers would otherwise hold both slots for good, and the
    healthy fallback would never be probed again (every request a 503)."""
    clock = Clock()
    failing = deployment("a", 1, clock)
    fallback = deployment("b", 1, clock, failure_threshold=1, open_seconds=5, half_open_probes=2)
    fallback.breaker.record("upstream_error")
    clock.advance(5)
    config: Any = SimpleNamespace(retry=RetryConfig(max_retries=0))
    main = Route("m", config, [failing], fallbacks=[Route("f", config, [fallback])])
    dispatcher = Dispatcher(Metrics(CollectorRegistry()), RetryBudget(RetryBudgetConfig()))

    async def attempt(chosen: Deployment) -> None:
        assert chosen is failing, "no attempt is made for a caller that left"
        log.gone = True  # the caller leaves while its first attempt is on its way
        raise UpstreamServerError("upstream error 500")

    for _ in range(3):
        log = RequestLog("r", 0.0)
        with pytest.raises(ClientGone):
            await dispatcher._run(main, log, attempt, keep_open=False)
    assert fallback.breaker.state == HALF_OPEN and fallback.breaker.available()
    assert main.fallbacks[0].pick(set()) is fallback  # still probed
    assert main.fallbacks[0].pick(set()) is fallback  # by two at a time, then
    log = RequestLog("r", 0.0)
    with pytest.raises(UpstreamServerError) as busy:
        await dispatcher._run(main.fallbacks[0], log, attempt, keep_open=False)
    assert busy.value.status == 503 and busy.value.retry_after == 1.0
    assert "circuits half-open with every probe in flight for b; retry in 1s" in str(busy.value)


def test_a_candidate_probing_its_half_open_circuit_is_not_judged_by_what_it_cannot_take():
    """A request meant for the candidate that its open circuit turns away counts against
    it; one turned away while the circuit is half-open and its probes are in flight does
    not (the probes judge it): a healthy but slow candidate, half-open after an earlier
    incident, was failed by the requests queued behind its probe."""
    clock = Clock()
    base = deployment("base", 1, clock)
    cand = deployment("cand", 1, clock, failure_threshold=1, open_seconds=5, half_open_probes=1)
    config = RolloutConfig(model="m", baseline=["base"], candidate=["cand"], stages=[100.0])
    rollout = Rollout("move", config, state="running")
    moving = Route("m", None, [base], rollout=rollout, baseline=[base], candidate=[cand])  # type: ignore[arg-type]
    cand.breaker.record("upstream_error")
    assert moving.pick(set()) is base  # turned away by the open circuit: a failure
    assert rollout.candidate_stats.attempts == rollout.candidate_stats.errors == 1
    clock.advance(5)
    assert moving.pick(set()) is cand  # its one probe
    assert moving.pick(set()) is base  # the probe slot is taken: not the candidate's doing
    assert rollout.candidate_stats.attempts == 1
