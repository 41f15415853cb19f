"""`GET /metrics` at a realistic label count: 50 models x 200 keys of live series.

A gateway of its own is started with 50 models, each on its own upstream of the built-in
simulated provider (latency 0, so it answers at once), prices and the same hard budget as
the main run, and 200 keys created straight in its ledger with metergate's own key store
(as `metergate keys create` does, without 200 CLI start-ups). One request per
(model, key) pair creates every series: 10,000 requests, 10,000
`metergate_requests_total` series plus tokens (3 per pair) and cost. Then `/metrics` is
fetched `scrapes` times, one at a time; the median is reported.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchlib import probe, profile
from benchlib.gateway import BUDGET, PRICE, Gateway, start_gateway
from benchlib.procs import BenchError, Processes, http
from metergate.storage.database import open_database
from metergate.storage.keys import create_key

MODELS = 50
KEYS = 200


@dataclass(frozen=True)
class ScrapeResult:
    requests: int
    non_200: int
    seconds_to_fill: float
    scrape_ms: list[float]
    body_bytes: int
    series: int  # sample lines in the exposition

    @property
    def median_ms(self) -> float:
        return probe.median(self.scrape_ms)


def write_config(workdir: Path) -> Path:
    names = [f"model-{i:02d}" for i in range(MODELS)]
    config = {
        "server": {"host": "127.0.0.1", "port": 4000},
        "ledger": {"url": f"sqlite:///{workdir / 'scrape-ledger.db'}"},
        "providers": {
            "sim": {
                "type": "simulated",
                "simulated": {"latency_ms": 0, "tokens_per_second": 0, "output_tokens": 8},
            }
        },
        "upstreams": {
            f"{name}-sim": {"provider": "sim", "model": name, "price": dict(PRICE)}
            for name in names
        },
        "models": {name: {"upstreams": [f"{name}-sim"]} for name in names},
        "budgets": {"bench-total": dict(BUDGET)},
    }
    path = workdir / "scrape.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _create_keys(ledger_url: str, count: int) -> list[str]:
    database = await open_database(ledger_url)
    try:
        return [(await create_key(database, f"svc-{i:03d}"))[0] for i in range(count)]
    finally:
        await database.close()


def run(
    processes: Processes,
    workdir: Path,
    cpus: str | None,
    scrapes: int = 10,
    profile_to: Path | None = None,
    profiler_cpus: str | None = None,
) -> tuple[ScrapeResult, Gateway]:
    """Fill the label set, then time the scrapes (sampled by py-spy into `profile_to`)."""
    config = write_config(workdir)
    ledger_url = f"sqlite:///{workdir / 'scrape-ledger.db'}"
    keys = asyncio.run(_create_keys(ledger_url, KEYS))
    gateway = start_gateway(processes, config, cpus)
    requests = []
    for model in range(MODELS):
        body = (
            b'{"model":"model-%02d","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
            % model
        )
        for key in keys:
            requests.append(
                probe.build_request(f"{gateway.base}/v1/chat/completions", body, key)[2]
            )
    started = time.perf_counter()
    statuses = probe.run(probe.spray("127.0.0.1", gateway.port, requests, connections=16))
    filled = time.perf_counter() - started
    non_200 = sum(1 for status in statuses if status != 200)
    if non_200:
        raise BenchError(f"{non_200} of {len(requests)} label-filling requests failed")
    timings = []
    body = b""
    recorder = None
    if profile_to is not None:
        py_spy = profile.py_spy(sys.executable)
        recorder = profile.start(py_spy, gateway.process.popen.pid, None, profile_to, profiler_cpus)
        time.sleep(0.5)  # py-spy attaches
    for _ in range(scrapes):
        began = time.perf_counter()
        answer = http(f"{gateway.base}/metrics", timeout=60)
        timings.append((time.perf_counter() - began) * 1000)
        if answer.status != 200:
            raise BenchError(f"GET /metrics answered {answer.status}")
        body = answer.body
    if recorder is not None and profile_to is not None:
        profile.finish(recorder, profile_to, interrupt=True)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return ScrapeResult(len(requests), non_200, filled, timings, len(body), series), gateway
