"""/metrics with `serve --workers 2`: any worker's scrape shows the sum of all workers.

Prometheus scrapes one worker at a time, at random. If each worker exported only its
own counters, totals would jump up and down between scrapes (and `rate()` would see
resets); with the shared multi-process files every scrape must show the same, exact,
never-decreasing totals. Label values must come from the config, never from a request.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from tests.services import GatewayProcess, create_key_sync

REQUESTS = 400
MESSAGES = [{"role": "user", "content": "count me exactly once"}]
CONFIG = {
    "providers": {"sim": {"type": "simulated", "simulated": {"latency_ms": 0, "output_tokens": 8}}},
    "upstreams": {
        "sim-up": {"provider": "sim", "model": "sim-model", "price": {"input": 1, "output": 2}}
    },
    "models": {"sim": {"upstreams": ["sim-up"]}},
}
# every label value a series may carry: configured names and the fixed placeholders
ALLOWED_LABELS = {
    "model": {"sim", "unknown"},
    "upstream": {"sim-up", "none"},
    "from_upstream": {"sim-up", "none"},
    "to_upstream": {"sim-up", "none"},
    "key": {"workers", "unknown"},
}


@dataclass
class Workers:
    gateway: GatewayProcess
    key: str


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump({"ledger": {"url": ledger_url}, **CONFIG}))
    key = create_key_sync(ledger_url, "workers")
    gateway = GatewayProcess(config_path, tmp_path, workers=2)
    shared: set[Path | None] = set()
    try:
        gateway.wait_ready(timeout=60)
        shared = {metrics_dir_of(pid) for pid in worker_pids(gateway.pid)}
        yield Workers(gateway, key)
    finally:
        gateway.kill_all()
        for directory in shared:  # `serve` leaves its metric files behind: clean up ours
            if directory is not None and directory.name.startswith("metergate-metrics-"):
                shutil.rmtree(directory, ignore_errors=True)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(base_url: str) -> Samples:
    """One scrape on a fresh connection, so successive scrapes spread over the workers."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def reference_samples(directory: Path) -> Samples:
    """prometheus_client's MultiProcessCollector + generate_latest on the workers' files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all((k, v) in sample_labels for k, v in labels.items())
    )


def counter_like(name: str) -> bool:
    """Samples that may only grow: counters, and histogram buckets, counts and sums."""
    return name.endswith(("_total", "_bucket", "_count", "_sum"))


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes (spawned; not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    pids = [int(pid) for pid in children.read_text().split()] if children.exists() else []
    return [pid for pid in pids if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def metrics_dir_of(pid: int) -> Path | None:
    """The PROMETHEUS_MULTIPROC_DIR a worker runs with, read from its environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(os.fsdecode(entry.split(b"=", 1)[1]))
    return None


async def test_every_scrape_of_every_worker_sums_all_workers(workers: Workers) -> None:
    base = workers.gateway.base_url
    headers = {"authorization": f"Bearer {workers.key}"}
    usages: list[dict[str, int]] = []
    scrapes: list[Samples] = []
    done = asyncio.Event()

    async def call(session: aiohttp.ClientSession, gate: asyncio.Semaphore) -> None:
        async with (
            gate,
            session.post(
                f"{base}/v1/chat/completions",
                headers=headers,
                json={"model": "sim", "messages": MESSAGES},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            usages.append((await response.json())["usage"])

    async def scrape_during_load() -> None:
        while not done.is_set():
            scrapes.append(await scrape(base))
            await asyncio.sleep(0.01)

    scraper = asyncio.create_task(scrape_during_load())
    gate = asyncio.Semaphore(64)
    async with aiohttp.ClientSession(  # a connection per request: both workers accept some
        connector=aiohttp.TCPConnector(limit=64, force_close=True),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:
        await asyncio.gather(*(call(session, gate) for _ in range(REQUESTS)))
    done.set()
    await scraper
    assert len(scrapes) >= 2

    # counters never go backwards, whichever worker answered each scrape
    for before, after in itertools.pairwise(scrapes):
        for series, value in before.items():
            if counter_like(series[0]):
                assert after.get(series, 0.0) >= value, (series, value, after.get(series))

    assert len(usages) == REQUESTS
    assert all(usage == usages[0] for usage in usages)  # same prompt: same usage
    prompt, output = usages[0]["prompt_tokens"], usages[0]["completion_tokens"]
    assert prompt > 0 and output == 8

    # once the load is over, every scrape shows the exact totals of both workers together
    for _ in range(8):
        samples = await scrape(base)
        assert total(samples, "metergate_requests_total") == REQUESTS
        assert total(samples, "metergate_requests_total", outcome="success") == REQUESTS
        assert total(samples, "metergate_request_duration_seconds_count") == REQUESTS
        assert total(samples, "metergate_tokens_total", type="input") == REQUESTS * prompt
        assert total(samples, "metergate_tokens_total", type="output") == REQUESTS * output
        assert total(samples, "metergate_tokens_total", type="cached_input") == 0
        cost = REQUESTS * (prompt * 1 + output * 2) / 1e6
        assert total(samples, "metergate_cost_usd_total") == pytest.approx(cost, rel=1e-9)
        assert total(samples, "metergate_active_requests") == 0

    # both workers served part of the load: each has its own counter file in the shared dir
    pids = worker_pids(workers.gateway.pid)
    assert len(pids) == 2, pids
    shared = {metrics_dir_of(pid) for pid in pids}
    assert len(shared) == 1 and None not in shared, shared
    directory = shared.pop()
    assert directory is not None
    served_by = [pid for pid in pids if (directory / f"counter_{pid}.db").exists()]
    assert sorted(served_by) == sorted(pids), sorted(p.name for p in directory.iterdir())

    # what the workers serve is what prometheus_client's own collector reads from their
    # files (both workers alive: no `live*` gauge to leave out), sample for sample
    for _ in range(5):  # a background task may move a gauge between the two reads
        served = await scrape(base)
        expected = reference_samples(directory)
        if served.keys() == expected.keys() and all(
            math.isclose(value, expected[key], rel_tol=1e-12) for key, value in served.items()
        ):
            break
    assert served == pytest.approx(expected, rel=1e-12)
    assert len(served) > 50


async def test_no_label_value_comes_from_a_request(workers: Workers) -> None:
    base = workers.gateway.base_url
    free_text = ["free-text-123", "free-text-key-456", "free-text-rid-789", "free-text-user"]
    async with aiohttp.ClientSession() as session:
        for headers, body in (
            (  # unknown model, valid key
                {"authorization": f"Bearer {workers.key}", "x-request-id": free_text[2]},
                {"model": free_text[0], "messages": MESSAGES, "user": free_text[3]},
            ),
            (  # bad key, known model
                {"authorization": f"Bearer {free_text[1]}", "x-request-id": free_text[2]},
                {"model": "sim", "messages": MESSAGES},
            ),
            (  # well-formed but unknown key, unknown model
                {"authorization": "Bearer mgk_" + "f" * 43},
                {"model": free_text[0], "messages": MESSAGES},
            ),
            (  # a success whose free-form fields must not become labels either
                {"authorization": f"Bearer {workers.key}", "x-request-id": free_text[2]},
                {"model": "sim", "messages": MESSAGES, "user": free_text[3]},
            ),
        ):
            async with session.post(
                f"{base}/v1/chat/completions", headers=headers, json=body
            ) as response:
                await response.read()
                assert response.status in (200, 401, 404)

        for _ in range(6):  # any worker's view
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh,
                fresh.get(f"{base}/metrics") as response,
            ):
                text = await response.text()
            for value in free_text:
                assert value not in text
            assert "mgk_" not in text
            by_label: dict[str, set[str]] = defaultdict(set)
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    for label, value in sample.labels.items():
                        by_label[label].add(value)
            for label, allowed in ALLOWED_LABELS.items():
                assert by_label.get(label, set()) <= allowed, (label, by_label[label])
            samples = await scrape(base)
            assert total(samples, "metergate_requests_total") == 4
            assert total(samples, "metergate_requests_total", model="unknown") == 3
            assert total(samples, "metergate_requests_total", key="unknown") == 2
