"""The monitoring stack, live: a gateway under simulated traffic, a real Prometheus scraping it
with the shipped rules, a real Alertmanager with the shipped routes, and a webhook receiver
owned by the test. The gateway also fronts a real MCP server (scraped as job `mcp`) and an
MCP server that is down, and runs a staged rollout with traffic on both sides.

Prometheus and Alertmanager run as subprocesses on free loopback ports with their data in
temp dirs, and are stopped when the module's tests end. Only the timings are shortened for
the test: scrape and rule evaluation every second, group_wait 1 s, and a 1 s `for:` on the
alert under test. Every expression is the shipped one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
import yaml
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from typer.testing import CliRunner

from metergate.cli import app as cli_app
from metergate.rollout import transitions
from tests.harness import BackgroundLoop, Gateway, UpstreamServer, start_gateway
from tests.mcp_servers.support import SEARCH_SERVER, HttpMcpServer, mcp_url
from tests.services import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
START_TIMEOUT = 30.0
# Values Grafana would put in for its variables when a dashboard opens with defaults.
GRAFANA_VARIABLES = {
    "model": ".*",
    "upstream": ".*",
    "mcp_server": ".*",
    "rollout": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan", "atan2",
}  # fmt: skip
# Series Prometheus makes itself for every target.
SYNTHETIC_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
        )
        if found:
            return found
    pytest.skip(f"{names[0]} is not installed (scripts/test installs it)")


# --- processes ------------------------------------------------------------------------------


def start_alertmanager(workdir: Path, hook_url: str) -> ServerProcess:
    """Alertmanager with the shipped routes and inhibitions; each receiver replaced by the
    test's webhook at /<receiver name>, and the waits shortened."""
    workdir.mkdir(parents=True)
    config = yaml.safe_load(ALERTMANAGER_YML.read_text())
    for receiver in config["receivers"]:
        for key in [k for k in receiver if k.endswith("_configs")]:
            del receiver[key]
        receiver["webhook_configs"] = [
            {"url": f"{hook_url}/{receiver['name']}", "send_resolved": True}
        ]

    def fast(route: dict[str, Any]) -> None:
        route.update(group_wait="1s", group_interval="1s", repeat_interval="1m")
        for child in route.get("routes", []):
            fast(child)

    fast(config["route"])
    shutil.copytree(ALERTMANAGER_YML.parent / "templates", workdir / "templates")
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "data").mkdir()
    command = binary("prometheus-alertmanager", "alertmanager")
    process = ServerProcess(
        "alertmanager",
        workdir,
        lambda port: [
            command,
            f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
    )
    process.start()
    return process


def start_prometheus(
    workdir: Path,
    gateway: str,
    alertmanager: str,
    fast_alerts: dict[str, str],
    mcp_targets: list[dict[str, Any]] | None = None,
    metrics_token: str = "",
    extra_jobs: list[dict[str, Any]] | None = None,
) -> ServerProcess:
    """Prometheus with the shipped config and rules; targets point at the test's servers
    (`mcp_targets`: file_sd groups of job mcp), intervals are 1 s, and the alerts in
    `fast_alerts` get a shorter `for:`. `metrics_token` goes where the shipped scrape job
    reads the gateway's token; `extra_jobs` are added scrape jobs."""
    shutil.copytree(PROMETHEUS_DIR, workdir, ignore=shutil.ignore_patterns("tests"))
    (workdir / "secrets" / "metergate-metrics-token").write_text(metrics_token + "\n")
    config_path = workdir / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["scrape_configs"] += extra_jobs or []
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = workdir / "targets"
    (targets / "metergate.yml").write_text(yaml.safe_dump([{"targets": [gateway]}]))
    (targets / "alertmanager.yml").write_text(yaml.safe_dump([{"targets": [alertmanager]}]))
    (targets / "mcp.yml").write_text(yaml.safe_dump(mcp_targets or []))
    patched = set()
    for rules_path in sorted((workdir / "rules").glob("*.yml")):
        shipped = yaml.safe_load(rules_path.read_text())
        for group in shipped["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in fast_alerts:
                    rule["for"] = fast_alerts[rule["alert"]]
                    patched.add(rule["alert"])
        rules_path.write_text(yaml.safe_dump(shipped, sort_keys=False))
        original = yaml.safe_load((PROMETHEUS_DIR / "rules" / rules_path.name).read_text())
        assert [r["expr"] for g in shipped["groups"] for r in g["rules"]] == [
            r["expr"] for g in original["groups"] for r in g["rules"]
        ]
    assert patched == set(fast_alerts)
    command = binary("prometheus")
    process = ServerProcess(
        "prometheus",
        workdir,
        lambda port: [
            command,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
    )
    process.start()
    return process


def runbook_url() -> str:
    """The base of every alert's runbook link (metergate-settings.yml)."""
    settings = yaml.safe_load((PROMETHEUS_DIR / "rules" / "metergate-settings.yml").read_text())
    (url,) = [
        rule["labels"]["url"]
        for group in settings["groups"]
        for rule in group["rules"]
        if rule.get("record") == "metergate:runbook_url"
    ]
    return str(url)


# --- the receiving end and the traffic ------------------------------------------------------


class Receiver:
    """Collects what Alertmanager posts to /<receiver>."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        app = web.Application()
        app.router.add_post("/{receiver}", self._handle)
        self.server = UpstreamServer(bg, app)
        self.url = self.server.url

    async def _handle(self, request: web.Request) -> web.Response:
        self.posts.append((request.match_info["receiver"], await request.json()))
        return web.Response(text="ok")

    def alerts(self) -> list[tuple[str, dict[str, Any]]]:
        """(receiver, alert) for every alert of every notification so far."""
        return [(name, alert) for name, post in list(self.posts) for alert in post["alerts"]]

    def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], timeout: float
    ) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, alert in self.alerts():
                if predicate(name, alert):
                    return name, alert
            time.sleep(0.2)
        raise AssertionError(f"no matching notification in {timeout} s; got {self.alerts()}")


# `canary-move` moves model `canary` from `base-up` to `cand-up` and holds at 50%: too few
# requests to judge, ever (start_watched_gateway starts it).
HELD_ROLLOUT = {
    "canary-move": {
        "model": "canary",
        "baseline": ["base-up"],
        "candidate": ["cand-up"],
        "stages": [50, 100],
        "interval_seconds": 1,
        "min_requests": 1_000_000,
    }
}


def gateway_config(search_url: str, gone_url: str) -> dict[str, Any]:
    """`sim` fails half its requests and callers see it (no retry, no circuit breaker);
    `flaky` fails as often but retries and falls back to `steady`, which always works and
    is cached; a daily budget and prices make the cost and budget series move.

    `canary` is under a rollout held at 50% (too few requests to judge, ever) from
    `base-up` to `cand-up`, which fails a fifth of its attempts (retried on the baseline).
    The MCP gateway fronts the real `search` server (0.5 s timeout) and `gone`, where
    nothing answers."""
    price = {"input": 1.0, "cached_input": 0.5, "output": 2.0}
    return {
        "providers": {
            "sim": {
                "type": "simulated",
                "simulated": {"error_rate": 0.5, "latency_ms": 5, "output_tokens": 8, "seed": 7},
            },
            "flaky": {
                "type": "simulated",
                "simulated": {"error_rate": 0.5, "latency_ms": 5, "output_tokens": 8, "seed": 3},
            },
            "steady": {"type": "simulated", "simulated": {"latency_ms": 5, "output_tokens": 8}},
            "base": {"type": "simulated", "simulated": {"latency_ms": 5, "output_tokens": 8}},
            "cand": {
                "type": "simulated",
                "simulated": {"error_rate": 0.2, "latency_ms": 20, "output_tokens": 8, "seed": 5},
            },
        },
        "upstreams": {
            "sim-up": {
                "provider": "sim",
                "model": "sim-model",
                "price": price,
                "circuit": {"enabled": False},
            },
            "flaky-up": {
                "provider": "flaky",
                "model": "flaky-model",
                "price": price,
                "circuit": {"enabled": False},
            },
            "steady-up": {"provider": "steady", "model": "steady-model", "price": price},
            "base-up": {"provider": "base", "model": "base-model", "price": price},
            "cand-up": {
                "provider": "cand",
                "model": "cand-model",
                "price": price,
                "circuit": {"enabled": False},
            },
        },
        "models": {
            "sim": {"upstreams": ["sim-up"], "retry": {"max_retries": 0}, "cache": False},
            "flaky": {
                "upstreams": ["flaky-up"],
                "fallbacks": ["steady"],
                "retry": {"max_retries": 1, "backoff_base": 0},
                "cache": False,
            },
            "steady": {"upstreams": ["steady-up"]},
            "canary": {
                "upstreams": ["base-up"],
                "retry": {"max_retries": 1, "backoff_base": 0},
                "cache": False,
            },
        },
        "budgets": {"daily": {"limit_usd": 5, "period": "day", "hard": False}},
        "cache": {"enabled": True},
        "rollouts": HELD_ROLLOUT,
        "mcp": {
            "servers": {
                "search": {"url": search_url, "timeout_seconds": 0.5},
                "gone": {"url": gone_url, "timeout_seconds": 0.5},
            },
            "default_access": {"servers": ["search", "gone"]},
            "health_interval_seconds": 1,
            "reconnect_min_seconds": 0.5,
            "reconnect_max_seconds": 2,
        },
    }


class Traffic:
    """A few callers on the gateway and one MCP client on its /mcp, until stopped (and never
    longer than `limit` seconds)."""

    SCHEDULE = (
        ("sim", False, None),
        ("sim", True, None),
        ("steady", False, "the same question"),  # cache hits after the first
        ("steady", True, None),
        ("flaky", False, None),
        ("canary", False, None),
    )
    MCP_SCHEDULE = (
        ("search.query", {"text": "metergate"}),
        ("search.echo", {"text": "hello"}),
        ("search.fail", {"reason": "no results"}),  # tool_error
        ("search.query", {"text": "prometheus"}),
        ("search.slow", {"seconds": 1}),  # timeout after 0.5 s
        ("gone.query", {"text": "anyone?"}),  # refused at the gateway: -32602
    )

    def __init__(self, bg: BackgroundLoop, gateway: Gateway, limit: float = 150) -> None:
        self.stopping = threading.Event()
        self.counter = itertools.count()
        self.future = bg.submit(self._run(gateway, limit))

    async def _run(self, gateway: Gateway, limit: float) -> None:
        client = gateway.async_client(timeout=10)
        deadline = asyncio.get_running_loop().time() + limit

        async def call(model: str, stream: bool, content: str | None) -> None:
            messages = [{"role": "user", "content": content or f"question {next(self.counter)}"}]
            try:
                if stream:
                    chunks = await client.chat.completions.create(
                        model=model, messages=messages, max_tokens=16, stream=True
                    )
                    async for _ in chunks:
                        pass
                else:
                    await client.chat.completions.create(
                        model=model, messages=messages, max_tokens=16
                    )
            except openai.APIError:
                pass  # the failures are the point

        async def caller(offset: int) -> None:
            for step in itertools.count(offset):
                if self.stopping.is_set() or asyncio.get_running_loop().time() > deadline:
                    return
                await call(*self.SCHEDULE[step % len(self.SCHEDULE)])
                await asyncio.sleep(0.1)

        async def mcp_caller() -> None:
            headers = {"Authorization": f"Bearer {gateway.key}"}
            async with (
                httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(10)) as http,
                Client(streamable_http_client(mcp_url(gateway), http_client=http)) as mcp,
            ):
                for step in itertools.count():
                    if self.stopping.is_set() or asyncio.get_running_loop().time() > deadline:
                        return
                    name, arguments = self.MCP_SCHEDULE[step % len(self.MCP_SCHEDULE)]
                    with contextlib.suppress(MCPError):  # timeouts and refusals are the point
                        await mcp.call_tool(name, arguments)
                    await asyncio.sleep(0.1)

        try:
            await asyncio.gather(*(caller(i) for i in range(3)), mcp_caller())
        finally:
            await client.close()

    def stop(self) -> None:
        self.stopping.set()
        self.future.result(30)


# --- Prometheus queries ---------------------------------------------------------------------


def query(prometheus: ServerProcess, expr: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{prometheus.url}/api/v1/query", data={"query": expr}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", f"{expr}: {body.get('error', body)}"
    result = body["data"]["result"]
    return result if isinstance(result, list) else [result]


def wait_for_data(prometheus: ServerProcess, expr: str, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(prometheus, expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown dashboard variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names in
    matchers and grouping clauses, durations and strings left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0) not in PROMQL_KEYWORDS:
            names.add(match.group(0))
    return names


def dashboard_targets() -> Iterator[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) of every query of every shipped dashboard."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for inner in [panel, *panel.get("panels", [])]:
                for target in inner.get("targets", []):
                    yield dashboard["uid"], inner["title"], target["expr"]


def variable_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard uid, selector, label) of every `label_values([metric, ]label)` variable;
    without a metric, the selector is any series with the label."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            found = re.fullmatch(r"label_values\((?:(\w+),\s*)?(\w+)\)", variable["definition"])
            assert found, variable["definition"]
            metric, label = found.group(1), found.group(2)
            yield dashboard["uid"], metric or f'{{{label}!=""}}', label


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    gateway: Gateway
    prometheus: ServerProcess
    alertmanager: ServerProcess
    receiver: Receiver
    search: HttpMcpServer  # the MCP server behind the gateway, scraped as job mcp

    @property
    def gateway_root(self) -> str:
        return self.gateway.base_url.removesuffix("/v1")


def start_watched_gateway(
    bg: BackgroundLoop,
    cleanup: contextlib.ExitStack,
    config: dict[str, Any],
    root: Path,
    receiver: Receiver,
    fast_alerts: dict[str, str],
    **prometheus_options: Any,
) -> tuple[Gateway, ServerProcess, ServerProcess]:
    """A gateway (its rollout `canary-move` started), an Alertmanager posting to
    `receiver` and a Prometheus scraping the gateway and alerting there, each stopped by
    `cleanup`."""
    gateway = start_gateway(bg, config, root / "gateway")
    cleanup.callback(gateway.stop)
    rollout = gateway.runtime.plan.rollouts.rollouts["canary-move"]
    bg.run(transitions.start(gateway.runtime.database, rollout))
    alertmanager = start_alertmanager(root / "alertmanager", receiver.url)
    cleanup.callback(alertmanager.stop)
    netloc = gateway.base_url.removeprefix("http://").removesuffix("/v1")
    prometheus = start_prometheus(
        root / "prometheus", netloc, alertmanager.netloc, fast_alerts, **prometheus_options
    )
    cleanup.callback(prometheus.stop)
    return gateway, alertmanager, prometheus


def firing(alertname: str, **labels: str) -> Callable[[str, dict[str, Any]], bool]:
    """A `Receiver.wait_for` predicate: `alertname` with these labels, firing."""

    def matches(receiver: str, alert: dict[str, Any]) -> bool:
        found = alert["labels"]
        return (
            found.get("alertname") == alertname
            and all(found.get(k) == v for k, v in labels.items())
            and alert["status"] == "firing"
        )

    return matches


@pytest.fixture(scope="module")
def stack(bg: BackgroundLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary("prometheus")
    binary("prometheus-alertmanager", "alertmanager")
    root = tmp_path_factory.mktemp("monitoring")
    with contextlib.ExitStack() as cleanup:
        receiver = Receiver(bg)
        cleanup.callback(receiver.server.close)
        search = HttpMcpServer(SEARCH_SERVER, free_port(), root / "search.log")
        search.start()
        cleanup.callback(search.stop)
        # `gone`: a port bound by the test but never listening, so connections are refused
        # and nobody else can take it meanwhile
        gone = cleanup.enter_context(socket.socket())
        gone.bind(("127.0.0.1", 0))
        gone_netloc = f"127.0.0.1:{gone.getsockname()[1]}"
        config = gateway_config(search.url, f"http://{gone_netloc}/mcp")
        gateway, alertmanager, prometheus = start_watched_gateway(
            bg,
            cleanup,
            config,
            root,
            receiver,
            fast_alerts={
                "MetergateHighErrorRate": "1s",
                "MetergateMcpServerDown": "1s",
                "MetergateMcpTargetDown": "3s",  # after the server-down alert that inhibits it
            },
            mcp_targets=[
                {
                    "targets": [search.url.removeprefix("http://").removesuffix("/mcp")],
                    "labels": {"mcp_server_name": "search"},
                },
                {"targets": [gone_netloc], "labels": {"mcp_server_name": "gone"}},
            ],
        )
        traffic = Traffic(bg, gateway)
        cleanup.callback(traffic.stop)
        up = wait_for_data(prometheus, 'up{job="metergate"} == 1', START_TIMEOUT)
        assert up, f"Prometheus does not scrape the gateway:\n{prometheus.log()}"
        yield Stack(gateway, prometheus, alertmanager, receiver, search)


def test_error_rate_alert_reaches_its_receiver(stack: Stack) -> None:
    def high_error_rate(receiver: str, alert: dict[str, Any]) -> bool:
        labels = alert["labels"]
        return (
            labels.get("alertname") == "MetergateHighErrorRate"
            and labels.get("model") == "sim"
            and alert["status"] == "firing"
        )

    receiver, alert = stack.receiver.wait_for(high_error_rate, timeout=45)
    assert receiver == "slack-warning"  # severity warning → Slack
    assert alert["labels"]["severity"] == "warning"
    assert "of the requests for model sim failed" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook"] == f"{runbook_url()}#metergatehigherrorrate"
    # the model whose upstream never fails raises nothing
    noisy = [
        a for _, a in stack.receiver.alerts()
        if a["labels"].get("model") == "steady" and a["labels"]["alertname"].endswith("ErrorRate")
    ]  # fmt: skip
    assert not noisy


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    failures = []
    deadline = time.monotonic() + 40
    for uid, title, expr in dashboard_targets():
        promql = substitute(expr)
        result = wait_for_data(stack.prometheus, promql, max(0.0, deadline - time.monotonic()))
        if not result:
            failures.append(f"{uid} / {title}: no data for {promql}")
    for uid, metric, label in variable_queries():
        if not query(stack.prometheus, f"count by ({label}) ({metric})"):
            failures.append(f"{uid}: variable {label} has no values from {metric}")
    assert not failures, "\n".join(failures)
    assert {uid for uid, _, _ in dashboard_targets()} >= {"metergate-mcp", "metergate-rollouts"}


def test_mcp_and_rollout_series_line_up_in_prometheus(stack: Stack) -> None:
    """Both views of the MCP server carry its name, errors show on both sides, and the
    rollout's two targets are each measured."""
    failures = []
    for expr in (
        'mcp_server:mcp_client_tool_calls_errors:ratio_rate5m{mcp_server_name="search"} > 0',
        'mcp_server:mcp_server_tool_calls_errors:ratio_rate5m{mcp_server_name="search"} > 0',
        'mcp_server_error_type:mcp_client_tool_calls:rate5m{error_type="timeout"} > 0',
        # the server sees the gateway give up on the call: cancelled, not failed
        'mcp_server_error_type:mcp_server_tool_calls:rate5m{error_type="cancelled"} > 0',
        'mcp_server_error_type:mcp_client_tool_calls:rate5m{error_type="tool_error"} > 0',
        'metergate_mcp_server_up{mcp_server_name="search"} == 1',
        'metergate_mcp_server_up{mcp_server_name="gone"} == 0',
        'up{job="mcp",mcp_server_name="search"} == 1',
        'up{job="mcp",mcp_server_name="gone"} == 0',
        'rollout_target:metergate_upstream_attempts_errors:ratio_rate5m{target="cand-up"} > 0',
        'rollout_target:metergate_request_duration_seconds:p99_5m{target="base-up"}',
        'metergate_rollout_weight{rollout="canary-move",target="cand-up"} == 0.5',
        'metergate_rollout_transitions_total{rollout="canary-move",event="started"} == 1',
        'metergate_rollout_transitions_total{rollout="canary-move",event="held"} > 0',
    ):
        if not wait_for_data(stack.prometheus, expr, 30):
            failures.append(expr)
    assert not failures, "no data for:\n" + "\n".join(failures)


def test_mcp_server_down_alert_reaches_its_receiver_and_silences_its_target_down(
    stack: Stack,
) -> None:
    def server_down(receiver: str, alert: dict[str, Any]) -> bool:
        labels = alert["labels"]
        return labels.get("alertname") == "MetergateMcpServerDown" and alert["status"] == "firing"

    receiver, alert = stack.receiver.wait_for(server_down, timeout=30)
    assert receiver == "slack-warning"
    assert alert["labels"]["mcp_server_name"] == "gone"
    assert "marked down for 2 minutes" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook"] == f"{runbook_url()}#metergatemcpserverdown"

    # Prometheus cannot scrape `gone` either; that alert is inhibited by the one above
    deadline = time.monotonic() + 30
    target_down: list[dict[str, Any]] = []
    while not target_down and time.monotonic() < deadline:
        target_down = [
            a
            for a in httpx.get(f"{stack.alertmanager.url}/api/v2/alerts", timeout=5).json()
            if a["labels"]["alertname"] == "MetergateMcpTargetDown"
        ]
        time.sleep(0.2)
    assert [a["labels"]["mcp_server_name"] for a in target_down] == ["gone"]
    assert target_down[0]["status"]["state"] == "suppressed"
    assert target_down[0]["status"]["inhibitedBy"]
    time.sleep(1.5)  # a group interval
    names = {(a["labels"]["alertname"], a["labels"].get("mcp_server_name")) for _, a in
             stack.receiver.alerts()}  # fmt: skip
    assert ("MetergateMcpTargetDown", "gone") not in names
    # the server that answers raises nothing
    assert not {name for name in names if name[1] == "search"}


def exported_names(url: str) -> set[str]:
    """The series names a /metrics endpoint exports (histograms with their suffixes)."""
    text = httpx.get(url, timeout=10).text
    exported = set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.MULTILINE))
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.MULTILINE):
        exported.add(name)
        if kind == "histogram":
            exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return exported


def test_dashboards_and_rules_use_only_exported_metrics(stack: Stack) -> None:
    # the gateway (job metergate) and the MCP server behind it (job mcp)
    gateway = exported_names(f"{stack.gateway_root}/metrics")
    server = exported_names(stack.search.metrics_url)
    assert "mcp_server_operation_duration_seconds_bucket" in server
    exported = gateway | server
    rules = [
        rule
        for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    known = exported | recorded | SYNTHETIC_SERIES
    unknown = []
    used = set()
    for uid, title, expr in dashboard_targets():
        names = metric_names(substitute(expr))
        used |= names
        unknown += [f"{uid} / {title}: {name}" for name in names - known]
    for rule in rules:
        name = rule.get("record") or rule.get("alert")
        names = metric_names(rule["expr"])
        used |= names
        unknown += [f"rule {name}: {metric}" for metric in names - known]
    assert not unknown, "metrics the gateway does not export:\n" + "\n".join(unknown)
    # the MCP and rollout metrics are among those checked
    assert used >= {
        "metergate_mcp_server_up",
        "mcp_client_operation_duration_seconds_count",
        "mcp_client_operation_duration_seconds_bucket",
        "mcp_server_operation_duration_seconds_count",
        "mcp_server_operation_duration_seconds_bucket",
        "metergate_rollout_weight",
        "metergate_rollout_transitions_total",
        "metergate_upstream_attempts_total",
    }
    # and the parser does find names, so the check above is not vacuous
    assert metric_names('sum by (model) (rate(metergate_requests_total{a="b"}[5m])) > 0') == {
        "metergate_requests_total"
    }


def test_doctor_passes_against_the_live_stack(stack: Stack) -> None:
    # rules report their health after their first evaluation
    wait_for_data(stack.prometheus, "model:metergate_requests_errors:ratio_rate5m", 20)
    result = CliRunner().invoke(
        cli_app,
        [
            "doctor",
            "--gateway", stack.gateway_root,
            "--prometheus", stack.prometheus.url,
            "--alertmanager", stack.alertmanager.url,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
    assert f"job metergate: {stack.gateway_root.removeprefix('http://')} is up" in result.output
    assert "14 metergate groups" in result.output
    assert "all 6 checks passed" in result.output


def test_doctor_explains_a_down_prometheus(stack: Stack) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        cli_app, ["doctor", "--gateway", stack.gateway_root, "--prometheus", down]
    )
    assert result.exit_code == 1, result.output
    output = result.output
    assert re.search(rf"^FAIL prometheus +cannot reach Prometheus at {down}: ", output, re.M)
    assert "fix: start Prometheus with deploy/prometheus/prometheus.yml" in output
    assert re.search(r"^skip prometheus rules +skipped: Prometheus is not reachable", output, re.M)
    assert re.search(r"^ok +gateway metrics ", output, re.M)
    assert "1 of 5 checks failed" in output


def test_doctor_explains_a_gateway_that_does_not_answer(stack: Stack) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        cli_app, ["doctor", "--gateway", nobody, "--prometheus", stack.prometheus.url]
    )
    assert result.exit_code == 1, result.output
    assert "connection refused" in result.output
    assert "fix: start the gateway (`metergate serve`)" in result.output


# --- inhibition, on a real Alertmanager -----------------------------------------------------


@pytest.fixture
def alertmanager_alone(
    bg: BackgroundLoop, tmp_path: Path
) -> Iterator[tuple[ServerProcess, Receiver]]:
    with contextlib.ExitStack() as cleanup:
        receiver = Receiver(bg)
        cleanup.callback(receiver.server.close)
        alertmanager = start_alertmanager(tmp_path / "alertmanager", receiver.url)
        cleanup.callback(alertmanager.stop)
        yield alertmanager, receiver


def test_alertmanager_inhibits_warnings_under_a_critical_of_the_same_alert(
    alertmanager_alone: tuple[ServerProcess, Receiver],
) -> None:
    alertmanager, receiver = alertmanager_alone

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {
            "labels": {"alertname": name, "severity": severity, **labels},
            "annotations": {"summary": f"{name} {severity} {labels}"},
        }

    burn, spent = "MetergateErrorBudgetBurn", "MetergateBudgetSpent"
    sent = {
        "page": alert(burn, "critical", model="gpt-4.1", window="1h"),
        "ticket, same model": alert(burn, "warning", model="gpt-4.1", window="1d"),
        "ticket, other model": alert(burn, "warning", model="claude", window="1d"),
        "error rate under the page": alert("MetergateHighErrorRate", "warning", model="gpt-4.1"),
        "error rate, other model": alert("MetergateHighErrorRate", "warning", model="claude"),
        "budget exhausted": alert(spent, "critical", budget="monthly"),
        "same budget at 80%": alert(spent, "warning", budget="monthly"),
        "other budget at 80%": alert(spent, "warning", budget="search-daily"),
        "all replicas down": alert("MetergateDown", "critical", job="metergate"),
        "one replica down": alert(
            "MetergateTargetDown", "warning", job="metergate", instance="gw-1:4000"
        ),
        "usage spike": alert("MetergateUsageSpike", "info", model="claude"),
        "mcp server down": alert(
            "MetergateMcpServerDown", "warning", mcp_server_name="search", instance="gw-1:4000"
        ),
        "its tool errors": alert(
            "MetergateMcpHighToolErrorRate", "warning", mcp_server_name="search"
        ),
        "its slow tool": alert(
            "MetergateMcpSlowTool", "warning", mcp_server_name="search", gen_ai_tool_name="query"
        ),
        "other server's tool errors": alert(
            "MetergateMcpHighToolErrorRate", "warning", mcp_server_name="files"
        ),
    }
    inhibited = {"ticket, same model", "error rate under the page", "same budget at 80%",
                 "one replica down", "its tool errors", "its slow tool"}  # fmt: skip
    response = httpx.post(f"{alertmanager.url}/api/v2/alerts", json=list(sent.values()), timeout=5)
    assert response.status_code == 200, response.text

    state = {}
    for item in httpx.get(f"{alertmanager.url}/api/v2/alerts", timeout=5).json():
        (key,) = [k for k, a in sent.items() if a["labels"] == item["labels"]]
        state[key] = item
    assert set(state) == set(sent)
    for key, item in state.items():
        if key in inhibited:
            assert item["status"]["state"] == "suppressed", key
            assert item["status"]["inhibitedBy"], key
        else:
            assert item["status"]["state"] == "active", key
            assert not item["status"]["inhibitedBy"], key
    expected_receiver = {"critical": "pagerduty-critical", "warning": "slack-warning",
                         "info": "webhook-info"}  # fmt: skip
    for key, item in state.items():
        assert [r["name"] for r in item["receivers"]] == [
            expected_receiver[sent[key]["labels"]["severity"]]
        ], key

    # every active alert is delivered to its receiver, and no inhibited one ever is
    for key in set(sent) - inhibited:
        labels = sent[key]["labels"]
        name, _ = receiver.wait_for(lambda _, a, labels=labels: a["labels"] == labels, timeout=20)
        assert name == expected_receiver[labels["severity"]], key
    time.sleep(2.5)  # two more group intervals
    delivered = [a["labels"] for _, a in receiver.alerts()]
    for key in inhibited:
        assert sent[key]["labels"] not in delivered, f"{key} was notified"
