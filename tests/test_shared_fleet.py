"""Two gateways sharing one Redis and one PostgreSQL ledger behave as one gateway:
hard budgets, rate limits and the cache hold across both, under concurrent load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import redis
import yaml

from metergate.config import parse_config
from metergate.storage import keys as store
from tests.harness import BackgroundLoop, Gateway, simulated_config, start_gateway
from tests.services import RedisServer

ASK = [{"role": "user", "content": "shared state"}]
Fleet = tuple[Gateway, Gateway, str]


@pytest.fixture
def fleet(
    bg: BackgroundLoop, tmp_path: Path, redis_server: RedisServer, fresh_postgres_url: str
) -> Iterator[Callable[[dict], Fleet]]:
    """Start two gateways on one config (plus the Redis and the ledger) and give them a
    common key `svc`; return both and the key."""
    redis_server.flushall()
    started: list[Gateway] = []

    def make(config: dict) -> Fleet:
        config = {
            **config,
            "redis": {"url": redis_server.url},
            "ledger": {"url": fresh_postgres_url},
        }
        for name in ("a", "b"):
            started.append(start_gateway(bg, config, tmp_path / name, key_name=f"gw-{name}"))
        a, b = started
        secret = a.new_key("svc")
        bg.run(b.runtime.keys.reload())
        return a, b, secret

    yield make
    for gateway in started:
        gateway.stop()


def clients(fleet: Fleet) -> list[openai.AsyncOpenAI]:
    a, b, secret = fleet
    return [openai.AsyncOpenAI(base_url=g.base_url, api_key=secret, max_retries=0) for g in (a, b)]


def settled(*gateways: Gateway) -> None:
    """Wait until every settle sent off the response path has reached Redis."""
    for gateway in gateways:
        gateway.bg.run(gateway.runtime.plan.shared.counters.drain())


def priced_config(**simulated: object) -> dict:
    config = simulated_config(**{"latency_ms": 20, "output_tokens": 10, **simulated})
    # 1 USD per token makes every cost easy to reason about
    config["upstreams"]["sim-up"]["price"] = {"input": 1_000_000, "output": 1_000_000}
    return config


async def test_hard_budget_holds_across_two_gateways(fleet):
    limit, in_flight = 300, 8
    config = priced_config()
    # ~0.01 USD an input token, 1 USD an output token: an answer costs ~10.1 USD and
    # may cost (the reserved worst case: body bytes + max_tokens) up to ~12 USD
    config["upstreams"]["sim-up"]["price"] = {"input": 10_000, "output": 1_000_000}
    config["budgets"] = {"cap": {"limit_usd": limit}}
    a, b, _ = gateways = fleet(config)
    both = clients(gateways)
    slots = asyncio.Semaphore(in_flight)  # waves, so the budget is used up, not just held

    async def one(i: int) -> tuple[int, str]:
        async with slots:
            try:
                await both[i % 2].chat.completions.create(
                    model="sim", messages=[{"role": "user", "content": f"q{i:03d}"}], max_tokens=10
                )
                return i % 2, "ok"
            except openai.RateLimitError as error:
                assert error.code == "budget_exceeded" and "budget 'cap'" in error.message
                return i % 2, "refused"

    results = await asyncio.gather(*(one(i) for i in range(200)))
    settled(a, b)
    b.flush_ledger()
    rows = a.ledger_rows()
    spent = sum(r["cost_nano"] for r in rows)
    # each gateway on its own counters would have spent up to the limit: twice it
    assert spent <= limit * 10**9
    assert spent >= (limit - in_flight * 12) * 10**9  # holds were released, spend counted
    ok = [side for side, outcome in results if outcome == "ok"]
    assert len(ok) == sum(r["outcome"] == "success" for r in rows)
    assert 0 in ok and 1 in ok  # both gateways served
    assert any(outcome == "refused" for _, outcome in results)
    # gauges read the fleet's spend back from Redis; the later settle saw all of it
    gauges = [g.metric("metergate_budget_spent_usd", budget="cap") for g in (a, b)]
    assert max(gauges) == spent / 1e9


async def test_rpm_limit_holds_across_two_gateways(fleet):
    config = priced_config(latency_ms=0)
    config["rate_limits"] = {"keys": {"*": {"rpm": 10}}}
    a, b, _ = gateways = fleet(config)
    both = clients(gateways)
    started = time.monotonic()

    async def one(i: int) -> str:
        try:
            await both[i % 2].chat.completions.create(model="sim", messages=ASK)
            return "ok"
        except openai.RateLimitError as error:
            assert "key 'svc' on requests per min (RPM): Limit 10" in error.message
            return "limited"

    results = await asyncio.gather(*(one(i) for i in range(30)))
    refill = int((time.monotonic() - started) / 6)  # one request every 6 s
    assert 10 <= results.count("ok") <= 10 + refill
    b.flush_ledger()
    assert sum(r["outcome"] == "rate_limited" for r in a.ledger_rows()) == results.count("limited")


def test_headers_count_both_gateways_requests_and_tokens(fleet):
    config = priced_config(latency_ms=0)
    config["rate_limits"] = {"keys": {"*": {"rpm": 10, "tpm": 1000}}}  # 6 s, 60 ms per token
    a, b, secret = fleet(config)
    on_a = openai.OpenAI(base_url=a.base_url, api_key=secret, max_retries=0)
    on_b = openai.OpenAI(base_url=b.base_url, api_key=secret, max_retries=0)
    first = on_a.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    used = first.parse().usage.total_tokens
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    assert first.headers["x-ratelimit-reset-requests"] == "6s"
    assert first.headers["x-ratelimit-remaining-tokens"] == "1000"
    settled(a)
    second = on_b.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert second.headers["x-ratelimit-limit-requests"] == "10"
    assert second.headers["x-ratelimit-remaining-requests"] == "8"  # a's request counted
    assert 11 < float(second.headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 12
    remaining_tokens = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 1000 - used <= remaining_tokens <= 1000 - used + 2  # a's tokens debited
    reset_tokens = second.headers["x-ratelimit-reset-tokens"]
    assert reset_tokens.endswith("s") and not reset_tokens.endswith("ms")
    assert used * 0.06 - 0.2 < float(reset_tokens.removesuffix("s")) <= used * 0.06


def test_tpm_debt_on_one_gateway_blocks_the_other(fleet):
    config = priced_config(latency_ms=0, output_tokens=30)
    config["rate_limits"] = {"models": {"sim": {"tpm": 20}}}  # one answer overdraws it
    a, b, secret = fleet(config)
    on_a = openai.OpenAI(base_url=a.base_url, api_key=secret, max_retries=0)
    on_b = openai.OpenAI(base_url=b.base_url, api_key=secret, max_retries=0)
    used = on_a.chat.completions.create(model="sim", messages=ASK).usage.total_tokens
    settled(a)
    with pytest.raises(openai.RateLimitError) as raised:
        on_b.chat.completions.create(model="sim", messages=ASK)
    error = raised.value
    assert "model 'sim' on tokens per min (TPM): Limit 20" in error.message
    retry_ms = int(error.response.headers["retry-after-ms"])
    assert (used - 20) * 3000 - 1000 < retry_ms <= (used - 20) * 3000 + 5  # 3 s a token
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_an_answer_cached_by_one_gateway_is_a_hit_on_the_other(fleet):
    config = priced_config(latency_ms=0)
    config["cache"] = {"enabled": True, "ttl_seconds": 60}
    a, b, secret = fleet(config)
    on_a = openai.OpenAI(base_url=a.base_url, api_key=secret, max_retries=0)
    on_b = openai.OpenAI(base_url=b.base_url, api_key=secret, max_retries=0)
    miss = on_a.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    hit = on_b.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert "x-metergate-cache" not in miss.headers
    assert hit.headers["x-metergate-cache"] == "hit"
    assert hit.parse().choices[0].message.content == miss.parse().choices[0].message.content
    assert hit.headers["x-metergate-upstream"] == "sim-up"
    assert b.metric("metergate_upstream_attempts_total") == 0
    assert b.metric("metergate_cache_requests_total", result="hit") == 1
    b.flush_ledger()  # each gateway commits its own rows: order them by time
    miss_row, hit_row = sorted(a.ledger_rows("key_name = 'svc'"), key=lambda r: r["ts"])
    assert (miss_row["cache_hit"], hit_row["cache_hit"]) == (0, 1)
    assert hit_row["saved_nano"] == miss_row["cost_nano"] > 0


def test_only_live_processes_holds_count(fleet, redis_server):
    """A crashed process's holds stop counting once its liveness key expires."""
    config = priced_config(latency_ms=0)
    config["budgets"] = {"cap": {"limit_usd": 1000}}  # each request may cost up to ~$100
    a, _, secret = fleet(config)
    client = openai.OpenAI(base_url=a.base_url, api_key=secret, max_retries=0)
    client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)  # seeds the keys
    settled(a)
    budget = a.runtime.plan.budgets.budgets[0]
    held = a.runtime.plan.shared.counters.keys(budget).held
    store = redis.Redis(port=redis_server.port)
    try:
        store.hset(held, "crashed-host:1:abc", 900 * 10**9)  # no live key: ignored, dropped
        client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
        assert not store.hexists(held, "crashed-host:1:abc")
        store.set("mg:live:busy-host:2:def", 1, px=10_000)  # alive: its hold counts
        store.hset(held, "busy-host:2:def", 900 * 10**9)
        with pytest.raises(openai.RateLimitError, match=r"held by requests in flight \$900\.0"):
            client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)
    finally:
        store.close()


def test_the_console_of_one_gateway_reads_what_the_fleets_live_processes_hold(fleet, redis_server):
    """What requests in flight hold on a budget, as the console and the usage tool show
    it, is the fleet's (a dead process's holds not counted), not the answering one's."""
    config = priced_config(latency_ms=0)
    config["budgets"] = {"cap": {"limit_usd": 1000}}
    a, b, secret = fleet(config)
    client = openai.OpenAI(base_url=a.base_url, api_key=secret, max_retries=0)
    client.chat.completions.create(model="sim", messages=ASK, max_tokens=10)  # seeds the keys
    settled(a)
    held = a.runtime.plan.shared.counters.keys(a.runtime.plan.budgets.budgets[0]).held
    store = redis.Redis(port=redis_server.port)
    try:
        store.set("mg:live:busy-host:2:def", 1, px=10_000)
        store.hset(held, "busy-host:2:def", 7 * 10**9)
        store.hset(held, "crashed-host:1:abc", 5 * 10**9)  # no live key: not counted
        gate = b.runtime.plan.gate
        assert b.bg.run(gate.held_nano(b.runtime.plan.budgets.budgets)) == [7 * 10**9]
    finally:
        store.close()


def test_a_reload_carries_the_redis_link_and_dropping_redis_retires_it(
    gateway_factory, redis_server
):
    redis_server.flushall()
    config = priced_config(latency_ms=0)
    config["rate_limits"] = {"keys": {"*": {"rpm": 3}}}
    config["redis"] = {"url": redis_server.url}
    gateway = gateway_factory(config)
    runtime = gateway.runtime
    client = gateway.client()
    for _ in range(2):
        client.chat.completions.create(model="sim", messages=ASK)
    shared = runtime.plan.shared

    def apply(raw: dict) -> None:
        text = yaml.safe_dump({**raw, "ledger": {"url": runtime.plan.config.ledger.url}})
        assert gateway.bg.run(runtime.apply(parse_config(text), text, "test"))

    config["rate_limits"]["keys"]["*"]["tpm"] = 100_000
    apply(config)
    assert runtime.plan.shared is shared and shared.link.up
    raw = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"  # the same shared bucket
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    del config["redis"]
    apply(config)
    assert runtime.plan.shared is None
    deadline = time.monotonic() + 5
    while shared.link.up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not shared.link.up  # the old plan's link was closed once idle
    # now counted in process: a key's first request there leaves 2 of 3. (A new key: one
    # the requests above used may have been counted in process too, had the link been
    # down for a moment on a loaded machine, as degraded mode does.)
    fresh = openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.new_key("fresh"), max_retries=0
    )
    raw = fresh.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"


async def test_a_budget_for_each_key_holds_across_two_gateways(fleet):
    """Each key's share of a budget for each key is one counter for the fleet: the key
    spends its limit once across both gateways, and another key keeps its own."""
    limit = 120
    config = priced_config()
    config["upstreams"]["sim-up"]["price"] = {"input": 10_000, "output": 1_000_000}
    config["budgets"] = {"per-user": {"scope": "key", "target": "*", "limit_usd": limit}}
    a, b, _ = gateways = fleet(config)
    both = clients(gateways)

    async def one(i: int) -> str:
        try:
            await both[i % 2].chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"q{i:03d}"}], max_tokens=10
            )
            return "ok"
        except openai.RateLimitError as error:
            assert "budget 'per-user' (key svc, per month)" in error.message
            return "refused"

    results = [await one(i) for i in range(30)]  # ~10 USD each: 12 fit, on both gateways
    settled(a, b)
    b.flush_ledger()
    rows = a.ledger_rows("key_name = 'svc'")
    spent = sum(r["cost_nano"] for r in rows)
    assert (limit - 12) * 10**9 <= spent <= limit * 10**9  # not twice the limit
    assert results.count("ok") == sum(r["outcome"] == "success" for r in rows)
    assert "refused" in results
    member = a.runtime.plan.budgets.each[0].members["svc"]
    store = redis.Redis.from_url(a.runtime.plan.config.redis.url)
    try:
        assert int(store.get(a.runtime.plan.shared.counters.keys(member).spent)) == spent
    finally:
        store.close()
    # the gateways' own keys have their own shares
    for gateway in (a, b):
        assert gateway.client().chat.completions.create(model="sim", messages=ASK, max_tokens=10)


async def test_a_keys_own_limit_holds_across_two_gateways(fleet):
    """A key's own limit of a budget for each key is what both gateways enforce on the
    one shared counter."""
    config = priced_config()
    config["upstreams"]["sim-up"]["price"] = {"input": 10_000, "output": 1_000_000}
    config["budgets"] = {"per-user": {"scope": "key", "target": "*", "limit_usd": 30}}
    a, b, _ = gateways = fleet(config)
    (svc,) = [k for k in a.bg.run(store.list_keys(a.runtime.database)) if k.name == "svc"]
    a.bg.run(store.change_key(a.runtime.database, svc.id, {"budget_limits": {"per-user": 70}}))
    for gateway in (a, b):
        gateway.bg.run(gateway.runtime.keys.reload())
    both = clients(gateways)
    results = []
    for i in range(20):
        try:
            await both[i % 2].chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"q{i:03d}"}], max_tokens=10
            )
            results.append("ok")
        except openai.RateLimitError as error:
            assert "limit $70.000000" in error.message
            results.append("refused")
    settled(a, b)
    b.flush_ledger()
    spent = sum(r["cost_nano"] for r in a.ledger_rows("key_name = 'svc'"))
    assert (70 - 12) * 10**9 <= spent <= 70 * 10**9  # over $30, and not twice $70
    assert "refused" in results
