"""`/metrics` (and `/v1/metrics`) behind an optional bearer token, `server.metrics_token`,
scraped by a real Prometheus with the shipped scrape job and the token in its file."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from metergate.cli import app as cli_app
from metergate.config import ConfigError, parse_config
from tests.harness import simulated_config
from tests.services import ServerProcess
from tests.test_monitoring_stack import binary, query, start_prometheus, wait_for_data

TOKEN = "metrics-token-6c1f0e9d8b7a5432"
PATHS = ("/metrics", "/v1/metrics")


def root(gateway) -> str:  # type: ignore[no-untyped-def]
    return gateway.base_url.removesuffix("/v1")


def with_token(token: str | None) -> dict[str, Any]:
    config = simulated_config()
    if token is not None:
        config["server"] = {"metrics_token": token}
    return config


def test_metrics_are_open_by_default_at_both_paths(gateway_factory):
    gateway = gateway_factory(with_token(None))
    gateway.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}]
    )
    for path in PATHS:
        answer = httpx.get(root(gateway) + path, timeout=10)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert 'metergate_requests_total{model="sim"' in answer.text, path


def test_a_metrics_token_guards_both_paths(gateway_factory):
    gateway = gateway_factory(with_token(TOKEN))
    for path in PATHS:
        url = root(gateway) + path
        missing = httpx.get(url, timeout=10)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == 'Bearer realm="metergate metrics"'
        error = missing.json()["error"]
        assert error["code"] == "missing_metrics_token"
        assert "server.metrics_token" in error["message"]
        for wrong in ({"Authorization": "Bearer not-the-token"}, {"Authorization": TOKEN}):
            refused = httpx.get(url, headers=wrong, timeout=10)
            assert refused.status_code == 401, (path, wrong)
            assert refused.json()["error"]["type"] == "authentication_error"
        shown = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert shown.status_code == 200 and "metergate_build_info" in shown.text
        assert TOKEN not in shown.text
    assert httpx.get(root(gateway) + "/healthz", timeout=10).status_code == 200  # unguarded


def test_metrics_token_from_the_environment_and_its_length(monkeypatch):
    base = yaml.safe_dump(simulated_config())

    def token_of(value: str):  # type: ignore[no-untyped-def]
        return parse_config(f"{base}server:\n  metrics_token: {value}\n").server.metrics_token

    monkeypatch.setenv("METERGATE_TEST_METRICS_TOKEN", TOKEN)
    token = token_of("${METERGATE_TEST_METRICS_TOKEN}")
    assert token is not None and token.get_secret_value() == TOKEN
    assert TOKEN not in repr(token)
    assert token_of("${METERGATE_UNSET_VAR_X:-}") is None  # empty: /metrics stays open
    with pytest.raises(ConfigError, match="at least 16 characters"):
        token_of("short")


# --- a real Prometheus, scraping with the token ------------------------------------------


@pytest.fixture
def prometheus_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    binary("prometheus")
    started: list[ServerProcess] = []

    def start(gateway, token: str, name: str) -> ServerProcess:  # type: ignore[no-untyped-def]
        netloc = root(gateway).removeprefix("http://")
        v1_job = {
            "job_name": "metergate-v1",
            "metrics_path": "/v1/metrics",
            "authorization": {
                "type": "Bearer",
                "credentials_file": "secrets/metergate-metrics-token",
            },
            "static_configs": [{"targets": [netloc]}],
        }
        process = start_prometheus(
            tmp_path / name, netloc, "127.0.0.1:9", {}, metrics_token=token, extra_jobs=[v1_job]
        )
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(Exception):
            process.stop()


def target_health(prometheus: ServerProcess, job: str, timeout: float) -> dict[str, Any]:
    """The job's target once it has been scraped (health up or down)."""
    deadline = time.monotonic() + timeout
    while True:
        targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=5).json()
        found = [t for t in targets["data"]["activeTargets"] if t["labels"]["job"] == job]
        if (found and found[0]["health"] != "unknown") or time.monotonic() > deadline:
            assert found, targets
            return found[0]
        time.sleep(0.2)


def test_prometheus_scrapes_with_the_token_from_its_file(gateway_factory, prometheus_for):
    gateway = gateway_factory(with_token(TOKEN))
    prometheus = prometheus_for(gateway, TOKEN, "right")
    for job in ("metergate", "metergate-v1"):
        assert target_health(prometheus, job, 30)["health"] == "up", job
        assert wait_for_data(prometheus, f'metergate_build_info{{job="{job}"}}', 30), job

    wrong = prometheus_for(gateway, "not-the-metrics-token-000", "wrong")
    target = target_health(wrong, "metergate", 30)
    assert target["health"] == "down" and "401" in target["lastError"]
    assert not query(wrong, 'metergate_build_info{job="metergate"}')

    # doctor: the token from the environment, and what to fix without it
    env = {"METERGATE_METRICS_TOKEN": TOKEN}
    args = ["doctor", "--gateway", root(gateway), "--prometheus", prometheus.url]
    result = CliRunner().invoke(cli_app, args, env=env)
    assert result.exit_code == 0, result.output
    bare = root(gateway).removeprefix("http://")  # HOST:PORT, as one often types it
    result = CliRunner().invoke(cli_app, ["doctor", "--gateway", bare], env=env)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli_app, ["doctor", "--gateway", root(gateway)])
    assert result.exit_code == 1
    assert "needs the metrics token" in result.output
    assert "set METERGATE_METRICS_TOKEN" in result.output
    result = CliRunner().invoke(
        cli_app, ["doctor", "--gateway", root(gateway), "--prometheus", wrong.url], env=env
    )
    assert result.exit_code == 1 and "server.metrics_token" in result.output
