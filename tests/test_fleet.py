"""The fleet end to end (issue 9): two `serve --workers 2` replicas behind a real nginx,
sharing one PostgreSQL ledger and one Redis, scraped by a real Prometheus.

Everything runs as separate processes on loopback: the replicas share one config file
(a simulated provider with prices, a global hard budget, per-key RPM limits, the
cache), nginx balances them (least_conn, keep-alive, HTTP/1.1 to the upstreams) and
Prometheus scrapes each replica's /metrics directly every second. Through nginx the
test checks that a per-key RPM limit holds fleet-wide, that an answer cached by one
replica is a hit on the other, and that under concurrent load the hard budget holds
fleet-wide (summed over the ledger). Prometheus must then count exactly the requests the
test sent, from both replicas.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml

from tests.services import (
    GatewayProcess,
    PostgresServer,
    RedisServer,
    ServerProcess,
    create_key_sync,
    run_prometheus,
)

pytestmark = pytest.mark.timeout(180)

LIMIT_USD = 1200  # RPM phase ~$200, cache ~$10, then the load finds ~$1000: ~100 of 300
LOAD, IN_FLIGHT = 300, 32
RPM, BURST = 20, 60
# ~0.01 USD an input token and 1 USD an output token: an answer (10 output tokens)
# costs ~10.1 USD; its worst-case hold (body bytes + max_tokens) is at most ~12 USD
PRICE = {"input": 10_000, "output": 1_000_000}
MAX_HOLD_USD = 12
REPLICA_HEADER = "x-test-replica"  # nginx's $upstream_addr: which replica answered


def binary(name: str) -> str:
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if Path(f"{d}/{name}").exists()), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/test installs it)")
    return found


def start_nginx(workdir: Path, replicas: list[str]) -> ServerProcess:
    """nginx with its own prefix in front of the replicas, as deploy/compose/nginx.conf."""
    workdir.mkdir()
    servers = "\n".join(f"        server {r} max_fails=3 fail_timeout=10s;" for r in replicas)
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )

    def command(port: int) -> list[str]:
        (workdir / "nginx.conf").write_text(
            f"""daemon off;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    server_tokens off;
{temp}
    upstream metergate {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://metergate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 60s;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 2;
            add_header {REPLICA_HEADER} $upstream_addr always;
        }}
        location = /nginx-healthz {{
            return 200 "ok\\n";
        }}
    }}
}}
"""
        )
        return [
            binary("nginx"),
            "-p",
            str(workdir),
            "-c",
            str(workdir / "nginx.conf"),
            "-e",
            str(workdir / "error.log"),
        ]

    return ServerProcess("nginx", workdir, command, "/nginx-healthz").start()


def start_prometheus(workdir: Path, replicas: list[str]) -> ServerProcess:
    workdir.mkdir()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "metergate", "static_configs": [{"targets": replicas}]}],
    }
    return run_prometheus(workdir, config)


def promql(prometheus: ServerProcess, expr: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{prometheus.url}/api/v1/query", data={"query": expr}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body.get('error', body)}"
    return body["data"]["result"]


def targets(prometheus: ServerProcess) -> list[tuple[str, str, str]]:
    """(instance, health, last error) of every target, for a failure message."""
    active = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]
    return [(t["scrapeUrl"], t["health"], t["lastError"]) for t in active["activeTargets"]]


def scalar(prometheus: ServerProcess, expr: str) -> float | None:
    result = promql(prometheus, expr)
    return float(result[0]["value"][1]) if result else None


# --- traffic --------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    code: str | None
    headers: dict[str, str]
    message: str = ""


@dataclass
class Sent:
    """Every chat request the test sends to the gateways, by where it went."""

    answers: list[Answer] = field(default_factory=list)

    async def chat(self, session: aiohttp.ClientSession, url: str, key: str, prompt: str) -> Answer:
        body = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "max_tokens": 10}
        async with session.post(
            f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json=body
        ) as response:
            payload = await response.json(content_type=None)
            error = payload.get("error") or {}
            answer = Answer(
                response.status,
                error.get("code"),
                {k.lower(): v for k, v in response.headers.items()},
                error.get("message", ""),
            )
        self.answers.append(answer)
        return answer


def session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=30),
    )


# --- the fleet ------------------------------------------------------------------------------


@dataclass
class Fleet:
    replicas: list[GatewayProcess]
    nginx: ServerProcess
    prometheus: ServerProcess
    keys: dict[str, str]
    ledger: Callable[[str], str]  # SQL -> psql output, on the fleet's ledger


def _logs(fleet: Fleet) -> str:
    """The replicas' logs, for a failure that only they can explain."""
    return "\n".join(f"--- {r.base_url}\n{r.log()[-6000:]}" for r in fleet.replicas)


@pytest.fixture
def fleet(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: PostgresServer,
    fresh_postgres_url: str,
    redis_server: RedisServer,
) -> Iterator[Fleet]:
    redis_server.flushall()
    config = {
        "ledger": {"url": fresh_postgres_url},
        "redis": {"url": redis_server.url},
        "providers": {
            "sim": {"type": "simulated", "simulated": {"latency_ms": 20, "output_tokens": 10}}
        },
        "upstreams": {"sim-up": {"provider": "sim", "model": "sim-model", "price": PRICE}},
        "models": {"sim": {"upstreams": ["sim-up"]}},
        "budgets": {"fleet-cap": {"limit_usd": LIMIT_USD, "hard": True}},
        "rate_limits": {"keys": {"*": {"rpm": 100_000}, "burst": {"rpm": RPM}}},
        "cache": {"enabled": True, "ttl_seconds": 120},
    }
    config_path = tmp_path / "metergate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    keys = {name: create_key_sync(fresh_postgres_url, name) for name in ("load", "burst", "cache")}
    # `serve --workers` makes its metrics dir with mkdtemp: keep it under tmp_path
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    database = fresh_postgres_url.rsplit("/", 1)[1]
    replicas: list[GatewayProcess] = []
    servers: list[ServerProcess] = []
    try:
        for name in ("r1", "r2"):
            workdir = tmp_path / name
            workdir.mkdir()
            replicas.append(GatewayProcess(config_path, workdir, workers=2))
        netlocs = [r.base_url.removeprefix("http://") for r in replicas]
        servers.append(start_prometheus(tmp_path / "prometheus", netlocs))  # while they start
        for replica in replicas:
            replica.wait_ready(timeout=60)
        servers.append(start_nginx(tmp_path / "nginx", netlocs))
        prometheus, nginx = servers
        # Prometheus syncs new targets every 5 s: scraping both before any traffic
        wait_for(
            lambda: scalar(prometheus, 'count(up{job="metergate"} == 1)') == 2,
            20,
            "Prometheus to scrape both replicas",
        )
        yield Fleet(
            replicas, nginx, prometheus, keys, lambda sql: postgres_server.psql(database, sql)
        )
    finally:
        for server in servers:
            server.stop()
        for replica in replicas:
            replica.kill_all()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def test_fleet_behind_nginx_holds_limits_shares_cache_and_is_counted(fleet: Fleet) -> None:
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]  # prompts of this run only: the cache answers none by chance
    sent = Sent()
    lb = fleet.nginx.url
    by_addr = {r.base_url.removeprefix("http://"): r for r in fleet.replicas}

    # 1. RPM: a burst on key `burst` through nginx; the budget is far from binding yet
    async def burst() -> tuple[list[Answer], float]:
        async with session(BURST) as s:
            began = time.monotonic()
            answers = await asyncio.gather(
                *(sent.chat(s, lb, fleet.keys["burst"], f"burst {run} {i}") for i in range(BURST))
            )
            return answers, time.monotonic() - began

    answers, elapsed = asyncio.run(burst())
    statuses = Counter(x.status for x in answers)
    assert set(statuses) <= {200, 429}, (statuses, _logs(fleet))
    refill = math.floor(elapsed * RPM / 60)  # a request back every 3 s: none in a fast burst
    assert RPM <= statuses[200] <= RPM + refill, (statuses, elapsed)
    assert {x.headers[REPLICA_HEADER] for x in answers} == set(by_addr)  # both replicas
    for limited in (x for x in answers if x.status == 429):
        assert limited.code == "rate_limit_exceeded", limited
        assert f"key 'burst' on requests per min (RPM): Limit {RPM}" in limited.message
        assert int(limited.headers["retry-after"]) >= 1
        assert 0 < int(limited.headers["retry-after-ms"]) <= 3000
        assert limited.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.headers["x-ratelimit-reset-requests"].endswith("s")

    # 2. cache: answered through nginx by one replica, then asked of the other directly
    async def cached() -> tuple[Answer, Answer]:
        async with session(2) as s:
            first = await sent.chat(s, lb, fleet.keys["cache"], f"cache {run}")
            other = next(r for addr, r in by_addr.items() if addr != first.headers[REPLICA_HEADER])
            return first, await sent.chat(s, other.base_url, fleet.keys["cache"], f"cache {run}")

    miss, hit = asyncio.run(cached())
    assert miss.status == 200 and "x-metergate-cache" not in miss.headers
    assert hit.status == 200 and hit.headers["x-metergate-cache"] == "hit"

    # 3. the hard budget under concurrent load through nginx, distinct prompts
    async def load() -> list[Answer]:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(s: aiohttp.ClientSession, i: int) -> Answer:
            async with gate:
                return await sent.chat(s, lb, fleet.keys["load"], f"load {run} {i:03d}")

        async with session(IN_FLIGHT) as s:
            return await asyncio.gather(*(one(s, i) for i in range(LOAD)))

    answers = asyncio.run(load())
    load_done = time.time()
    outcomes = Counter((x.status, x.code) for x in answers)
    assert set(outcomes) <= {(200, None), (429, "budget_exceeded")}, outcomes
    ok, refused = outcomes[(200, None)], outcomes[(429, "budget_exceeded")]
    assert ok > 0 and refused > 0, outcomes
    assert all("budget 'fleet-cap'" in x.message for x in answers if x.status == 429)
    served = Counter(x.headers[REPLICA_HEADER] for x in answers if x.status == 200)
    assert set(served) == set(by_addr), served  # both replicas answered successes

    # the ledger: every request is in it, and the fleet spent no more than the limit
    total = len(sent.answers)
    assert total == BURST + 2 + LOAD

    def ledger_count() -> int:
        return int(fleet.ledger("SELECT count(*) FROM requests"))

    wait_for(lambda: ledger_count() == total, 15, f"{total} ledger rows")
    rows = Counter(
        tuple(line.split("|"))
        for line in fleet.ledger("SELECT key_name, outcome FROM requests").split()
    )
    assert rows[("burst", "success")] == statuses[200]
    assert rows[("burst", "rate_limited")] == statuses[429]
    assert rows[("load", "success")] == ok
    assert rows[("load", "budget_exceeded")] == refused
    assert rows[("cache", "success")] == 2  # the hit is a success too
    spent = int(fleet.ledger("SELECT coalesce(sum(cost_nano), 0) FROM requests"))
    assert spent <= LIMIT_USD * 10**9, spent
    # the holds were released and the spend counted: the budget was used up, not just held
    assert spent >= (LIMIT_USD - IN_FLIGHT * MAX_HOLD_USD) * 10**9, spent
    # the spend by hour both replicas added to (what budgets and the console sum) is the rows'
    for table in ("usage_hours", "key_spend_hours"):
        summed = fleet.ledger(f"SELECT sum(requests) || '|' || sum(cost_nano) FROM {table}")
        assert summed.strip() == f"{total}|{spent}", (table, summed)

    # 4. Prometheus, scraping both replicas directly, counts every request exactly once
    prometheus = fleet.prometheus
    after = load_done + 1  # a scrape started after this one is the second after the load
    wait_for(
        lambda: scalar(prometheus, f'count(timestamp(up{{job="metergate"}}) > {after})') == 2,
        15,
        "two scrapes of both replicas after the load",
    )
    assert scalar(prometheus, 'count(up{job="metergate"} == 1)') == 2, targets(prometheus)
    assert scalar(prometheus, "sum(metergate_requests_total)") == total
    per_replica = {
        r["metric"]["instance"]: float(r["value"][1])
        for r in promql(prometheus, "sum by (instance) (metergate_requests_total)")
    }
    assert set(per_replica) == set(by_addr) and all(v > 0 for v in per_replica.values())
    expected = Counter(x.headers[REPLICA_HEADER] for x in sent.answers if x is not hit)
    expected[next(addr for addr in by_addr if addr != miss.headers[REPLICA_HEADER])] += 1
    assert per_replica == expected
    assert time.monotonic() - started < 60
