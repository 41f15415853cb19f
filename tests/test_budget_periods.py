"""A budget's period ends while requests run (midnight, for a daily budget).

A request is spend of the period its ledger row is dated in, the time it was settled, so
the live budget must agree with what the ledger (and so a restart) says of the new day,
including the requests that were held before midnight and ended after it. The clock is
real: the budgets use a fixed-offset time zone written for the test, whose midnight
falls a few seconds ahead.
"""

from __future__ import annotations

import struct
import time
import zoneinfo
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from metergate.budgets.book import BudgetBook, Reservation
from metergate.budgets.budget import Budget
from metergate.budgets.period import period_bounds
from metergate.config.model import BudgetConfig
from metergate.metering.metrics import Metrics
from tests.harness import Gateway, eventually, write_config

ASK = [{"role": "user", "content": "what does today cost"}]


@pytest.fixture
def zones(tmp_path: Path) -> Iterator[Path]:
    """A directory searched for time zones before the system's."""
    directory = tmp_path / "zones"
    directory.mkdir()
    zoneinfo.reset_tzpath(to=[str(directory), *zoneinfo.TZPATH])
    try:
        yield directory
    finally:
        zoneinfo.reset_tzpath()


def midnight_zone(directory: Path, midnight: int) -> str:
    """A time zone (a one-offset TZif file in `directory`) whose day ends at the epoch
    second `midnight`."""
    offset = -midnight % 86_400
    if offset > 43_200:
        offset -= 86_400
    name = f"Test/Midnight{midnight}"
    designation = b"TST\0"
    header = b"TZif" + bytes(16) + struct.pack(">6l", 0, 0, 0, 0, 1, len(designation))
    path = directory / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(header + struct.pack(">lbB", offset, 0, 0) + designation)
    return name


def day_config(timezone: str, **extra: object) -> dict:
    """`sim` answers at once, `late` after 6 s, `later` after 9 s; a token costs $1."""
    providers, upstreams, models = {}, {}, {}
    for name, latency_ms in (("sim", 0), ("late", 6000), ("later", 9000)):
        providers[name] = {
            "type": "simulated",
            "simulated": {"latency_ms": latency_ms, "output_tokens": 10},
        }
        upstreams[name] = {
            "provider": name,
            "model": name,
            "price": {"input": 1_000_000, "output": 1_000_000},
        }
        models[name] = {"upstreams": [name]}
    budgets = {"daily": {"limit_usd": 1_000_000, "period": "day", "timezone": timezone}}
    return {
        "providers": providers,
        "upstreams": upstreams,
        "models": models,
        "budgets": budgets,
        **extra,
    }


def end_day_soon(gateway: Gateway, zones: Path, seconds: int, **extra: object) -> float:
    """Reload the gateway with its daily budget in a zone whose day ends in `seconds`."""
    midnight = int(time.time()) + seconds
    runtime = gateway.runtime
    write_config(day_config(midnight_zone(zones, midnight), **extra), Path(runtime.source).parent)
    assert gateway.bg.run(runtime.reload_from_source("test"))
    return float(midnight)


def spent_gauge(gateway: Gateway) -> float:
    return gateway.metric("metergate_budget_spent_usd", budget="daily")


def ledger_usd(gateway: Gateway, where: str) -> float:
    return sum(row["cost_nano"] for row in gateway.ledger_rows(where)) / 1e9


@pytest.mark.parametrize("counters", ["process", "redis"])
def test_requests_running_at_midnight_are_spend_of_the_new_day(
    gateway_factory, zones, counters, request
):
    extra: dict[str, object] = {}
    if counters == "redis":
        redis_server = request.getfixturevalue("redis_server")
        redis_server.flushall()
        extra["redis"] = {"url": redis_server.url}
    gateway = gateway_factory(day_config("UTC", **extra))
    midnight = end_day_soon(gateway, zones, 5, **extra)
    client = gateway.client(timeout=30)

    client.chat.completions.create(model="sim", messages=ASK)  # spend of the old day
    with ThreadPoolExecutor(2) as pool:
        late = pool.submit(client.chat.completions.create, model="late", messages=ASK)
        later = pool.submit(client.chat.completions.create, model="later", messages=ASK)
        assert time.time() < midnight - 0.5, "the machine is too slow for this test's timing"
        # `late` ends when no request has come since midnight; then one request of the
        # new day (with Redis: the new day's counter starts) while `later` still runs
        late.result()
        client.chat.completions.create(model="sim", messages=ASK)
        assert not later.done(), "the machine is too slow for this test's timing"
        later.result()

    assert len(gateway.ledger_rows(f"ts < {midnight}")) == 1
    new_day = ledger_usd(gateway, f"ts >= {midnight}")
    assert new_day > 0 and len(gateway.ledger_rows(f"ts >= {midnight}")) == 3
    agreed = gateway.bg.run(eventually(lambda: spent_gauge(gateway) == pytest.approx(new_day)))
    assert agreed, f"the live budget says ${spent_gauge(gateway)}, the ledger ${new_day}"

    # and the next request is checked against that spend, as after a restart
    budget = gateway.runtime.plan.budgets.budgets[0]
    assert budget.spent_nano == round(new_day * 1e9)


def test_the_spend_gauge_starts_the_new_day_at_zero_with_no_request(gateway_factory, zones):
    gateway = gateway_factory(day_config("UTC"))
    midnight = end_day_soon(gateway, zones, 4)
    gateway.client().chat.completions.create(model="sim", messages=ASK)
    assert time.time() < midnight, "the machine is too slow for this test's timing"
    assert spent_gauge(gateway) > 0
    assert gateway.bg.run(eventually(lambda: spent_gauge(gateway) == 0, within=15))
    assert time.time() >= midnight


def test_settling_counts_the_cost_in_the_period_its_row_is_dated_in():
    book = BudgetBook({"daily": BudgetConfig(limit_usd=100, period="day")}, Metrics())
    budget: Budget = book.budgets[0]
    now = time.time()
    budget.start, budget.end = now - 10, now + 10  # a day of 20 s, for the test
    budget.spent_nano = 5_000
    held = Reservation((budget,), 1_000)
    budget.reserved_nano = 1_000

    book.settle(held, 700, at=now + 11)  # dated after that day ended: the next one's
    assert (budget.start, budget.end) == period_bounds(now + 11, "day", "UTC")
    assert (budget.spent_nano, budget.reserved_nano) == (700, 0)

    budget.reserved_nano = 1_000
    book.settle(held, 300, at=budget.start - 1)  # dated in a day already over: not today's
    assert (budget.spent_nano, budget.reserved_nano) == (700, 0)


def test_a_budget_for_each_key_starts_the_new_period_for_every_key():
    """The spend loaded for each key is of one period: a key first seen after it ended
    starts the new one at 0 (not at what it spent before), and a key seen before rolls
    over on its next request."""
    cfg = BudgetConfig(scope="key", target="*", limit_usd=1, period="day")
    book = BudgetBook({"per-user": cfg}, Metrics())
    (each,) = book.each
    now = time.time()
    each.start, each.end = now - 20, now + 10  # the loaded day, 30 s long for the test
    each.loaded = {"alice": 400, "carol": 900}
    (alice,) = book.applicable("alice", "m")
    assert (alice.spent_nano, alice.start, alice.end) == (400, each.start, each.end)
    each.end = alice.end = now - 1  # that day is over
    (carol,) = book.applicable("carol", "m")
    assert carol.spent_nano == 0 and carol.target == "carol"
    assert (carol.start, carol.end) == period_bounds(time.time(), "day", "UTC")
    assert each.loaded == {}  # the old day's spend is let go
    book.roll([alice])
    assert alice.spent_nano == 0 and alice.start == carol.start


def test_members_of_a_past_period_are_let_go_once_it_ends():
    """A key per end user: members of keys that made no request since their period
    ended (and hold nothing) are dropped, so they do not pile up for as long as the
    process runs; one still in flight stays, and a key seen again starts at 0."""
    cfg = BudgetConfig(scope="key", target="*", limit_usd=1, period="day")
    book = BudgetBook({"per-user": cfg}, Metrics())
    (each,) = book.each
    now = time.time()
    for name in ("gone", "busy", "back"):
        (member,) = book.applicable(name, "m")
        member.spent_nano = 700
    book.sweep(now)
    assert set(each.members) == {"gone", "busy", "back"}  # their day is not over
    midnight = each.swept_until  # the next sweep is due when the day ends
    assert midnight == each.members["gone"].end
    each.members["busy"].reserved_nano = 100  # a request still in flight
    book.sweep(midnight)
    assert set(each.members) == {"busy"}
    (back,) = book.applicable("back", "m")  # its cached member was let go: a new one
    assert back is not each.members["busy"] and back.spent_nano == 0
    book.sweep(midnight)  # once a period: nothing more to do
    assert set(each.members) == {"busy", "back"}


def test_a_keys_limit_changed_back_is_its_limit_again():
    """A key's own limit of a budget for each key set, lifted and set again: the book
    answers the member at the limit of the key's present limits each time (an entry
    cached under earlier limits names the same member, so it must not be reused as is)."""
    cfg = BudgetConfig(scope="key", target="*", limit_usd=1, period="day")
    book = BudgetBook({"per-user": cfg}, Metrics())
    plan = (("per-user", 5 * 10**9),)
    for limits, expected in ((plan, 5 * 10**9), ((), 10**9), (plan, 5 * 10**9), ((), 10**9)):
        (member,) = book.applicable("alice", "m", None, limits)
        assert member.limit_nano == expected
