"""Losing Redis mid-load: `open` keeps serving on in-process counters, `closed` refuses
with a clear 503; either way the outage is logged, exported, and recovered from, and
the spend made meanwhile reaches the shared counters exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from metergate.shared.counters import _dated_from, _keep_dated, _next_slot
from tests import services
from tests.harness import BackgroundLoop, Gateway, simulated_config, start_gateway, two_gateways
from tests.services import RedisServer

pytestmark = pytest.mark.timeout(60)


def shared_config(redis_url: str, on_failure: str) -> dict:
    config = simulated_config(latency_ms=5, output_tokens=8)
    config["budgets"] = {"month": {"limit_usd": 1000}}
    config["rate_limits"] = {"keys": {"*": {"rpm": 100_000, "tpm": 10_000_000}}}
    config["cache"] = {"enabled": True}
    config["redis"] = {"url": redis_url, "on_failure": on_failure}
    return config


@pytest.fixture
def gateway(
    bg: BackgroundLoop, tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    redis_server.flushall()
    started = start_gateway(bg, shared_config(redis_server.url, request.param), tmp_path)
    yield started
    started.stop()


@pytest.fixture
def workers(
    bg: BackgroundLoop, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways sharing the Redis and one SQLite ledger, as `serve --workers 2` runs."""
    redis_server.flushall()
    config = shared_config(redis_server.url, "open")
    config["ledger"] = {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    started: list[Gateway] = []
    try:
        yield two_gateways(bg, config, tmp_path, started)
    finally:
        for gateway in started:
            gateway.stop()


@pytest.fixture
def outage(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """Stop/start the session's redis-server; it is running again (same port) after."""
    yield redis_server
    if not redis_server.ping():
        restart(redis_server, monkeypatch)


def restart(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the stopped server again on the same port (empty: it keeps nothing)."""
    port = server.port
    monkeypatch.setattr(services, "free_port", lambda: port)
    server.start()
    assert server.port == port


def counter_and_ledger(server: RedisServer, *gateways: Gateway) -> tuple[int, int]:
    """The month budget's shared counter and the ledger's spend, once every gateway's
    settles have reached Redis and its rows the ledger."""
    for gateway in gateways:
        gateway.bg.run(gateway.runtime.plan.shared.counters.drain())
        gateway.flush_ledger()
    first = gateways[0]
    budget = first.runtime.plan.budgets.budgets[0]
    store = redis.Redis(port=server.port)
    try:
        counter = int(store.get(first.runtime.plan.shared.counters.keys(budget).spent))
    finally:
        store.close()
    return counter, sum(r["cost_nano"] for r in first.ledger_rows())


def budgets_in_redis(
    bg: BackgroundLoop,
    tmp_path: Path,
    server: RedisServer,
    latency_ms: float,
    budgets: dict[str, Any],
) -> tuple[Gateway, int]:
    """A gateway keeping `budgets` in an emptied `server` (open on failure), and the pid
    of the Redis process, for a test to stop and resume it."""
    server.flushall()
    config = simulated_config(latency_ms=latency_ms, output_tokens=8)
    config["budgets"] = budgets
    config["redis"] = {"url": server.url, "on_failure": "open"}
    gateway = start_gateway(bg, config, tmp_path)
    assert server.process is not None
    return gateway, server.process.pid


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("gateway", ["open"], indirect=True)
async def test_open_keeps_serving_through_an_outage(gateway, outage, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="metergate.redis")
    client = gateway.async_client()
    answered: list[str] = []  # request ids of the 200s
    stop = asyncio.Event()

    async def caller(worker: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            raw = await client.chat.completions.with_raw_response.create(
                model="sim", messages=[{"role": "user", "content": f"w{worker} q{i}"}]
            )
            assert raw.status_code == 200
            answered.append(raw.headers["x-request-id"])

    callers = [asyncio.create_task(caller(w)) for w in range(4)]
    try:
        await until(lambda: len(answered) >= 40, 10, "load running")
        assert gateway.metric("metergate_redis_up") == 1
        await asyncio.to_thread(outage.stop_process)
        await until(lambda: gateway.metric("metergate_redis_up") == 0, 5, "redis_up 0")
        during = len(answered)
        await until(lambda: len(answered) >= during + 40, 10, "serving while redis is down")
        await asyncio.to_thread(restart, outage, monkeypatch)
        await until(lambda: gateway.metric("metergate_redis_up") == 1, 10, "redis_up 1")
        after = len(answered)
        await until(lambda: len(answered) >= after + 40, 10, "serving after recovery")
    finally:
        stop.set()
        await asyncio.gather(*callers)  # a failed request fails the test here
    messages = [r.getMessage() for r in caplog.records if r.name == "metergate.redis"]
    assert any("unreachable" in m and "on_failure=open" in m for m in messages)
    assert any("reachable again" in m for m in messages)
    rows = gateway.ledger_rows()
    assert {r["request_id"] for r in rows} >= set(answered)  # no answer lost its row
    assert all(r["outcome"] == "success" for r in rows)
    # Redis came back empty: the budget was re-seeded from the ledger, and every answer
    # settled since (or during the outage) was added exactly once
    counter, spent = counter_and_ledger(outage, gateway)
    assert counter == spent == sum(r["cost_nano"] for r in rows)


@pytest.mark.parametrize("gateway", ["closed"], indirect=True)
async def test_closed_refuses_while_redis_is_down(gateway, outage, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="metergate.redis")
    client = gateway.async_client()
    await client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "1"}])
    await asyncio.to_thread(outage.stop_process)
    for i in range(3):
        with pytest.raises(openai.InternalServerError) as raised:
            await client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"down {i}"}]
            )
        error = raised.value
        assert error.status_code == 503 and error.code == "shared_state_unavailable"
        assert f"Redis at {outage.url} is unreachable" in error.message
        assert "redis.on_failure: closed" in error.message
    assert gateway.metric("metergate_redis_up") == 0
    await asyncio.to_thread(restart, outage, monkeypatch)
    await until(lambda: gateway.metric("metergate_redis_up") == 1, 10, "redis_up 1")
    reply = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "back"}]
    )
    assert reply.usage.total_tokens > 0
    messages = [r.getMessage() for r in caplog.records if r.name == "metergate.redis"]
    assert any("unreachable" in m and "refused (503)" in m for m in messages)
    assert any("reachable again" in m for m in messages)
    outcomes = [r["outcome"] for r in gateway.ledger_rows()]
    # Redis is the gateway's own dependency: an error, never held against an upstream
    assert outcomes == ["success", "gateway_error", "gateway_error", "gateway_error", "success"]


@pytest.mark.parametrize("on_failure", ["open", "closed"])
def test_redis_down_at_start_degrades_instead_of_failing(gateway_factory, on_failure, caplog):
    caplog.set_level(logging.INFO, logger="metergate.redis")
    nobody = f"redis://127.0.0.1:{services.free_port()}/0"  # nothing listens there
    gateway = gateway_factory(shared_config(nobody, on_failure))
    assert gateway.metric("metergate_redis_up") == 0
    client = gateway.client()
    ask = [{"role": "user", "content": "no redis"}]
    if on_failure == "open":
        raw = client.chat.completions.with_raw_response.create(model="sim", messages=ask)
        assert raw.headers["x-ratelimit-remaining-requests"] == "99999"  # counted here
    else:
        with pytest.raises(openai.InternalServerError, match="is unreachable"):
            client.chat.completions.create(model="sim", messages=ask)
    assert any("unreachable" in r.getMessage() for r in caplog.records)


async def test_two_workers_count_an_outage_once(workers, outage, monkeypatch):
    """Both workers spend while Redis is down and keep serving while it comes back
    empty: whichever seeds the counter reads rows of both from the ledger, and neither
    may add them again (nor lose any)."""
    clients = [gateway.async_client() for gateway in workers]
    answered = [0, 0]
    stop = asyncio.Event()

    async def caller(worker: int, name: str) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            await clients[worker].chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"{name} q{i}"}]
            )
            answered[worker] += 1

    def each_answered(more: int) -> Callable[[], bool]:
        start = list(answered)
        return lambda: all(n >= s + more for n, s in zip(answered, start, strict=True))

    def redis_up(value: int) -> Callable[[], bool]:
        return lambda: all(g.metric("metergate_redis_up") == value for g in workers)

    callers = [asyncio.create_task(caller(w, f"w{w}c{c}")) for w in (0, 1) for c in (0, 1)]
    try:
        await until(each_answered(20), 10, "load on both workers")
        await asyncio.to_thread(outage.stop_process)
        await until(redis_up(0), 5, "both see redis down")
        await until(each_answered(40), 10, "both serving while redis is down")
        await asyncio.to_thread(restart, outage, monkeypatch)
        await until(redis_up(1), 10, "both resynced")
        await until(each_answered(40), 10, "both serving after recovery")
    finally:
        stop.set()
        await asyncio.gather(*callers)  # a failed request fails the test here
    counter, spent = counter_and_ledger(outage, *workers)
    assert counter == spent, f"counter ${counter / 1e9:.9f} != ledger ${spent / 1e9:.9f}"


def test_outage_spend_is_kept_per_tenth_of_a_second_not_per_request():
    """A long outage under load keeps a bounded record: 10,000 settles over one second
    are ten entries, and a cut (on a tenth of a second) splits them exactly by date."""
    kept: list[tuple[int, int]] = []
    dates = [1_000.0 + n / 10_000 for n in range(10_000)]
    for at in dates:
        _keep_dated(kept, at, 7)
    assert len(kept) == 10 and sum(nano for _, nano in kept) == 70_000
    cut = _next_slot(1_000.43)
    assert cut == 1_000.5
    assert _dated_from(cut, kept) == 7 * sum(at >= cut for at in dates)


async def test_a_settle_redis_runs_after_it_stalled_counts_once(
    bg: BackgroundLoop, tmp_path: Path, redis_server: RedisServer
):
    """Redis stalls (its process stopped, its connections open) while a settle is on its
    way: the gateway times the call out and counts the spend to add after the outage,
    but Redis, resumed, still runs the settle it had received. The recovery fences this
    process's late calls off and learns which of the unanswered ones Redis ran: the
    counter equals the ledger, the request's spend counted once."""
    gateway, pid = budgets_in_redis(bg, tmp_path, redis_server, 150, {"all": {"limit_usd": 1000}})
    try:
        client = gateway.async_client()

        async def ask(i: int) -> None:
            await client.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8
            )

        await ask(0)
        counters = gateway.runtime.plan.shared.counters
        await counters.drain()
        in_flight = asyncio.create_task(ask(1))  # admitted now; settled after the stop
        await until(lambda: any(counters.holding.values()), 5, "the request admitted")
        os.kill(pid, signal.SIGSTOP)
        try:
            await in_flight  # its settle reaches the stopped Redis and times out
            await until(lambda: gateway.metric("metergate_redis_up") == 0, 5, "redis_up 0")
            await ask(2)  # counted in process meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        await until(lambda: gateway.metric("metergate_redis_up") == 1, 10, "redis_up 1")
        counter, spent = counter_and_ledger(redis_server, gateway)
        assert len(gateway.ledger_rows()) == 3
        assert counter == spent > 0
    finally:
        gateway.stop()


async def test_a_budget_for_each_key_catches_up_when_redis_answers_again(
    bg: BackgroundLoop, tmp_path: Path, redis_server: RedisServer
):
    """Redis stops answering but keeps its data (a pause, a partition): what a key
    spent meanwhile reaches its counter in the recovery, before the link is up again,
    not only at that key's next request."""
    budgets = {"per-user": {"scope": "key", "target": "*", "limit_usd": 1000}}
    gateway, pid = budgets_in_redis(bg, tmp_path, redis_server, 5, budgets)
    try:
        client = gateway.async_client()

        async def ask(n: int) -> None:
            for i in range(n):
                await client.chat.completions.create(
                    model="sim", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8
                )

        await ask(3)
        counters = gateway.runtime.plan.shared.counters
        await counters.drain()
        os.kill(pid, signal.SIGSTOP)
        try:
            await ask(1)  # finds Redis silent (the socket timeout), served in process
            await until(lambda: gateway.metric("metergate_redis_up") == 0, 5, "redis_up 0")
            await ask(3)
        finally:
            os.kill(pid, signal.SIGCONT)
        await until(lambda: gateway.metric("metergate_redis_up") == 1, 10, "redis_up 1")
        member = gateway.runtime.plan.budgets.each[0].members["test"]
        keys = counters.keys(member)
        store = redis.Redis(port=redis_server.port)
        try:
            counter = int(store.get(keys.spent))
            held = {k.decode(): int(v) for k, v in store.hgetall(keys.held).items()}
        finally:
            store.close()
        spent = sum(r["cost_nano"] for r in gateway.ledger_rows("key_name = 'test'"))
        assert counter == spent > 0
        assert not any(held.values()), held  # nothing in flight holds anything
    finally:
        gateway.stop()
