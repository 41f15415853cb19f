"""Rate limits shared by the workers of one host: `serve --workers N` without Redis
admits each limit once, not N times (`metergate.limits.host`)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import time
from pathlib import Path

import httpx
import pytest
import yaml

from metergate.config.model import RateLimitsConfig
from metergate.errors import RateLimited
from metergate.limits.host import HostTats, create_table
from metergate.limits.rate import RateLimiter
from tests.harness import counts_at_once, simulated_config, write_config
from tests.services import GatewayProcess, create_key_sync

NOW = 1_000_000_000_000.0  # one instant for every process: the count is then exact
LIMITS = {"keys": {"*": {"rpm": 100, "tpm": 1_000_000}}}


def admit_many(
    table: str,
    attempts: int,
    start: multiprocessing.synchronize.Barrier,
    counts: multiprocessing.queues.Queue[int],
) -> None:
    """In a process of its own, as a worker: how many of `attempts` its limiter admits."""
    limiter = RateLimiter(RateLimitsConfig.model_validate(LIMITS), host=HostTats(Path(table)))
    buckets = limiter.applicable("alice", "sim")
    start.wait()
    admitted = 0
    for _ in range(attempts):
        with limiter.lock:
            try:
                verdicts = limiter.check(buckets, NOW)
            except RateLimited:
                continue
            limiter.take(buckets, verdicts)
            admitted += 1
    counts.put(admitted)


def test_two_processes_admit_a_limit_once_between_them(tmp_path: Path) -> None:
    """Each asks for the whole limit (100 at one instant), at the same time: together
    they get 100, where limiters of their own each got 100."""
    table = tmp_path / "rate-limits"
    create_table(table)
    got = counts_at_once(admit_many, [(str(table), 100), (str(table), 100)])
    assert sum(got) == 100, got


def test_token_debts_are_shared_and_a_full_table_keeps_the_rest_apart(tmp_path: Path) -> None:
    table = tmp_path / "rate-limits"
    create_table(table, capacity=2)
    config = RateLimitsConfig.model_validate({"keys": {"*": {"tpm": 600}}})
    tables = [HostTats(table), HostTats(table)]  # as two workers map it
    first, second = (RateLimiter(config, host=mapped) for mapped in tables)
    alice = first.applicable("alice", "sim")
    with first.lock:
        first.debit(alice, 600, NOW)  # the whole minute's tokens
    with second.lock, pytest.raises(RateLimited):  # the other worker sees the debt
        second.check(second.applicable("alice", "sim"), NOW)
    # two slots, three buckets: the third is kept by each process on its own
    bob, carol = first.applicable("bob", "sim"), first.applicable("carol", "sim")
    with first.lock:
        first.debit(bob, 600, NOW)
        first.debit(carol, 600, NOW)
        with pytest.raises(RateLimited):
            first.check(carol, NOW)
    with second.lock:
        second.check(second.applicable("carol", "sim"), NOW)  # not seen: admitted
    for mapped in tables:
        mapped.close()


def test_serve_with_two_workers_admits_each_limit_once(tmp_path: Path) -> None:
    """Each request on a connection of its own, so either worker may take it: a limit of
    10 a minute admits 10 (plus one for each 6 s the test took), not 10 per worker."""
    config = simulated_config()
    config["rate_limits"] = {"keys": {"*": {"rpm": 10}}}
    config["budgets"] = {"watch": {"limit_usd": 100, "hard": False}}
    path = write_config(config, tmp_path)
    secret = create_key_sync(yaml.safe_load(path.read_text())["ledger"]["url"], "alice")
    gateway = GatewayProcess(path, tmp_path, workers=2)
    try:
        gateway.wait_ready()
        began = time.monotonic()
        statuses = []
        with httpx.Client(timeout=30) as http:
            for _ in range(30):
                reply = http.post(
                    f"{gateway.base_url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                    json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
                )
                statuses.append(reply.status_code)
        refilled = int((time.monotonic() - began) // 6)
    finally:
        gateway.kill_all()
    assert set(statuses) == {200, 429}, statuses
    assert 10 <= statuses.count(200) <= 10 + refilled, (statuses, refilled)
    assert "on its own" not in gateway.log()  # no warning about per-worker counts
