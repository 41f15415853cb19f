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
import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric

from benchlib import probe, profile
from benchlib.gateway import (
    BUDGET,
    PRICE,
    THIS_TREE,
    Gateway,
    Install,
    multiproc_dir,
    start_gateway,
    wait_workers,
)
from benchlib.procs import BenchError, Processes, http
from metergate.metering.multiprocess_exposition import MultiProcessExposition
from metergate.storage.database import open_database
from metergate.storage.keys import create_key

MODELS = 50
KEYS = 200


@dataclass(frozen=True)
class RenderBreakdown:
    """A multi-process render timed in the suite's process on the gateway's own metric
    files (best of a few rounds): prometheus_client's collector in its two halves (what
    the gateway used before), and metergate's merged view, from scratch and again."""

    files: int
    file_bytes: int
    collect_ms: float  # MultiProcessCollector: read and merge every worker's mmap files
    format_ms: float  # generate_latest's text formatting of the merged samples
    merged_first_ms: float | None = None  # MultiProcessExposition: the first render
    merged_ms: float | None = None  # and every later one (files unchanged)


@dataclass(frozen=True)
class ScrapeResult:
    requests: int
    non_200: int
    seconds_to_fill: float
    scrape_ms: list[float]
    body_bytes: int
    series: int  # sample lines in the exposition
    workers: int = 1
    render: RenderBreakdown | None = None

    @property
    def median_ms(self) -> float:
        return probe.median(self.scrape_ms)


def multiprocess_render(directory: Path, rounds: int = 3) -> RenderBreakdown:
    collector = multiprocess.MultiProcessCollector(None, path=str(directory))
    collect = render = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        families = list(collector.collect())
        collect = min(collect, time.perf_counter() - began)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected(families))
        began = time.perf_counter()
        generate_latest(registry)
        render = min(render, time.perf_counter() - began)
    first = again = float("inf")
    for _ in range(rounds):
        merged = MultiProcessExposition(str(directory))
        began = time.perf_counter()
        merged.render()
        first = min(first, time.perf_counter() - began)
        for _ in range(3):
            began = time.perf_counter()
            merged.render()
            again = min(again, time.perf_counter() - began)
    files = list(directory.glob("*.db"))
    return RenderBreakdown(
        len(files),
        sum(f.stat().st_size for f in files),
        collect * 1000,
        render * 1000,
        first * 1000,
        again * 1000,
    )


class _Collected:
    """Already collected metric families, so that formatting is timed alone."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

    def describe(self) -> list[Metric]:
        return []


def write_config(workdir: Path, hard_budget: bool = True) -> Path:
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
        "budgets": {"bench-total": {**BUDGET, "hard": hard_budget}},
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


@dataclass
class Filled:
    """A gateway whose 50 x 200 series exist, ready to be scraped."""

    gateway: Gateway
    workers: int
    pids: list[int]
    requests: int
    seconds: float


def fill(
    processes: Processes,
    workdir: Path,
    cpus: str | None,
    workers: int = 1,
    install: Install = THIS_TREE,
) -> Filled:
    """Start a gateway (`install`'s tree) with 50 models and 200 keys, and send one
    request per (model, key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir, hard_budget=workers == 1)
    ledger_url = f"sqlite:///{workdir / 'scrape-ledger.db'}"
    keys = asyncio.run(_create_keys(ledger_url, KEYS))
    gateway = start_gateway(processes, config, cpus, workers=workers, install=install)
    pids = wait_workers(gateway, workers, workdir / "scrape-ledger.db")
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
    return Filled(gateway, workers, pids, len(requests), filled)


class HealthWatch:
    """GET /healthz over and over on a few kept-alive connections, in turn, while
    something else runs: the longest wait says how long an event loop was held. The
    connections are opened first, so with several workers they are spread over them (a
    worker whose loop is held accepts no new connection: new ones would go elsewhere)."""

    def __init__(self, base: str, connections: int = 8) -> None:
        parts = urlsplit(base)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.connections = connections
        self.longest_ms = 0.0
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._open: list[HTTPConnection] = []

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for conn in self._open:
                    began = time.perf_counter()
                    conn.request("GET", "/healthz")
                    answer = conn.getresponse()
                    answer.read()
                    if answer.status != 200:
                        self.error = f"GET /healthz answered {answer.status}"
                        return
                    waited = (time.perf_counter() - began) * 1000
                    self.longest_ms = max(self.longest_ms, waited)
        except (OSError, HTTPException) as exc:
            self.error = f"GET /healthz failed: {exc}"

    def __enter__(self) -> HealthWatch:
        for _ in range(self.connections):
            conn = HTTPConnection(*self.address, timeout=60)
            conn.connect()
            self._open.append(conn)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(70)
        for conn in self._open:
            conn.close()
        if self.error:
            raise BenchError(self.error)


def time_scrapes(
    gateway: Gateway, scrapes: int, watch: bool = False
) -> tuple[list[float], bytes, float | None]:
    """`scrapes` GET /metrics one after the other, each on a new connection (so that
    with several workers they spread over the workers); times in ms, the last body, and
    with `watch` the longest a /healthz request waited meanwhile (ms; the probes load
    the gateway too, so the suite's timings are taken without them)."""
    timings = []
    body = b""
    watcher = HealthWatch(gateway.base) if watch else None
    with watcher or contextlib.nullcontext():
        for _ in range(scrapes):
            began = time.perf_counter()
            answer = http(f"{gateway.base}/metrics", timeout=60)
            timings.append((time.perf_counter() - began) * 1000)
            if answer.status != 200:
                raise BenchError(f"GET /metrics answered {answer.status}")
            body = answer.body
    return timings, body, None if watcher is None else watcher.longest_ms


def samples_in(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


def run(
    processes: Processes,
    workdir: Path,
    cpus: str | None,
    scrapes: int = 10,
    profile_to: Path | None = None,
    profiler_cpus: str | None = None,
    workers: int = 1,
) -> tuple[ScrapeResult, Gateway]:
    """Fill the label set, then time the scrapes (sampled by py-spy into `profile_to`).

    With `workers` > 1 the gateway runs `serve --workers N` (multi-process metrics; the
    budget soft: older trees refused hard ones with several workers), the label set
    spreads over every worker's metric files, and the render is also timed in the suite's process
    (`RenderBreakdown`).
    """
    filled = fill(
        processes, workdir / f"scrape-{workers}" if workers > 1 else workdir, cpus, workers
    )
    gateway = filled.gateway
    recorder = None
    if profile_to is not None:
        py_spy = profile.py_spy(sys.executable)
        recorder = profile.start(py_spy, gateway.process.popen.pid, None, profile_to, profiler_cpus)
        time.sleep(0.5)  # py-spy attaches
    timings, body, _ = time_scrapes(gateway, scrapes)
    if recorder is not None and profile_to is not None:
        profile.finish(recorder, profile_to, interrupt=True)
    directory = multiproc_dir(filled.pids[0]) if workers > 1 else None
    render = multiprocess_render(directory) if directory is not None else None
    result = ScrapeResult(
        filled.requests, 0, filled.seconds, timings, len(body), samples_in(body), workers, render
    )
    return result, gateway
