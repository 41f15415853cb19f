"""The fast /metrics renderer says exactly what prometheus_client would, and a scrape
does not hold the gateway's other requests while it renders."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metergate.metering.metrics import Metrics
from tests.harness import simulated_config


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def families(text: str) -> dict[str, tuple[str, str]]:
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def test_fast_exposition_matches_prometheus_client() -> None:
    metrics = Metrics()
    for model in ("m1", 'odd"model\\with\nbreaks'):
        series = metrics.series(model, "up", "key")
        metrics.count_request(series, (model, "up", "key"), "success")
        series.duration.observe(0.3)
        series.duration.observe(42)
        series.tokens[2].inc(7)
        series.cost.inc(0.000123)
    metrics.overhead.observe(0.0002)
    metrics.ledger_pending.set(3)
    metrics.circuit_state.labels("up").set(2)
    extra = Counter("custom_things", "Registered by someone else.", registry=metrics.registry)
    extra.inc(5)

    fast = metrics.exposition().decode()
    reference = generate_latest(metrics.registry).decode()
    assert samples(fast) == samples(reference)
    assert families(fast) == families(reference)
    assert len(samples(fast)) > 40
    # values change, cached prefixes do not go stale
    metrics.count_request(metrics.series("m1", "up", "key"), ("m1", "up", "key"), "success")
    again = samples(metrics.exposition().decode())
    key = (
        "metergate_requests_total",
        (
            ("api", "chat"),
            ("key", "key"),
            ("model", "m1"),
            ("outcome", "success"),
            ("upstream", "up"),
        ),
    )
    assert again[key] == 2
    # lines and families reused when unchanged, redone when not, new series added
    for _ in range(3):
        series = metrics.series("m1", "up", "key")
        series.duration.observe(0.007)
        metrics.series("m3", "up2", "key").cost.inc(1.5)
        metrics.ledger_pending.set(0)
        assert samples(metrics.exposition().decode()) == samples(
            generate_latest(metrics.registry).decode()
        )


def test_a_removed_series_disappears() -> None:
    metrics = Metrics()
    metrics.build_info.labels("1", "old").set(1)
    metrics.exposition()
    metrics.build_info.remove("1", "old")
    metrics.build_info.labels("1", "new").set(1)
    shown = samples(metrics.exposition().decode())
    names = {labels for name, labels in shown if name == "metergate_build_info"}
    assert names == {(("config_version", "new"), ("version", "1"))}


def test_a_long_render_does_not_hold_other_requests(
    gateway_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first scrape renders every series (~0.3 s at 50 models x 200 keys, ~0.9 s
    merging two workers' files): requests arriving meanwhile are answered at once."""
    gateway = gateway_factory(simulated_config())
    metrics = gateway.runtime.metrics
    render = metrics.exposition
    rendering, finish = threading.Event(), threading.Event()

    def long_render() -> bytes:
        rendering.set()
        finish.wait(20)
        return render()

    monkeypatch.setattr(metrics, "exposition", long_render)
    root = gateway.base_url.removesuffix("/v1")
    with ThreadPoolExecutor(1) as pool:
        scrape = pool.submit(httpx.get, f"{root}/metrics", timeout=60)
        assert rendering.wait(20)
        try:
            answer = gateway.client(timeout=10).chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content
            assert not scrape.done()  # still rendering while the chat was answered
        finally:
            finish.set()
        scraped = scrape.result(60)
    assert scraped.status_code == 200
    assert 'metergate_requests_total{model="sim"' in scraped.text
