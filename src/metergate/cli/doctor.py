"""`metergate doctor`: check the monitoring chain end to end and say what to fix.

gateway /metrics -> Prometheus (target up, rules loaded, alerts sent) -> Alertmanager.
Each check prints one line, `ok` or `FAIL`, and every failure a `fix:` line; the exit
status is 1 when any check fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from metergate.cli.common import console

# The rule groups of deploy/prometheus/rules/*.yml (a test keeps this list in step).
EXPECTED_RULE_GROUPS = (
    "metergate.settings",
    "metergate.requests",
    "metergate.slo",
    "metergate.latency",
    "metergate.upstreams",
    "metergate.usage",
    "metergate.budgets",
    "metergate.mcp",
    "metergate.rollouts",
    "metergate.alerts.availability",
    "metergate.alerts.latency",
    "metergate.alerts.cost",
    "metergate.alerts.operations",
    "metergate.alerts.mcp",
)
RULES_HINT = (
    "load deploy/prometheus/rules/*.yml through `rule_files` in prometheus.yml, check them "
    "with `promtool check rules`, then reload Prometheus (POST /-/reload or SIGHUP)"
)
_BUILD_INFO = re.compile(r"^metergate_build_info\{([^}]*)\}", re.MULTILINE)

if TYPE_CHECKING:
    import httpx2


@dataclass
class Result:
    name: str
    ok: bool | None  # None: skipped because an earlier check failed
    detail: str
    fix: str = ""


class Unreachable(Exception):
    """The server did not answer with HTTP at all."""


def _base(url: str) -> str:
    """A base URL as given, `http://` assumed when it names no scheme (`127.0.0.1:4000`)."""
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _netloc(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    if host in ("localhost", "::1"):
        host = "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


async def _get(
    session: httpx2.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    import httpx2

    try:
        response = await session.get(url, headers=headers)
        return response.status_code, response.text
    except httpx2.TimeoutException:
        raise Unreachable("no answer within the timeout") from None
    except httpx2.ConnectError as error:
        if _refused(error):
            raise Unreachable("connection refused") from None
        raise Unreachable(str(error) or type(error).__name__) from None
    except httpx2.HTTPError as error:
        raise Unreachable(str(error) or type(error).__name__) from None


def _refused(error: BaseException) -> bool:
    """Was the connection refused? (httpx2 wraps the OSError a few causes deep.)"""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


async def _get_json(session: httpx2.AsyncClient, url: str) -> Any:
    status, text = await _get(session, url)
    if status != 200:
        raise Unreachable(f"HTTP {status} from {url}")
    try:
        return json.loads(text)
    except ValueError:
        raise Unreachable(f"{url} did not answer with JSON") from None


async def check_gateway(session: httpx2.AsyncClient, gateway: str) -> Result:
    url = f"{_base(gateway)}/metrics"
    name = "gateway metrics"
    token = os.environ.get("METERGATE_METRICS_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        status, text = await _get(session, url, headers)
    except Unreachable as error:
        return Result(
            name,
            False,
            f"cannot reach {url}: {error}",
            "start the gateway (`metergate serve`) or pass --gateway with the address of a "
            "running replica (server.host and server.port of its config)",
        )
    if status == 401:
        return Result(
            name,
            False,
            f"{url} answered HTTP 401: it needs the metrics token",
            "set METERGATE_METRICS_TOKEN to the gateway's server.metrics_token",
        )
    if status != 200:
        with_path = urlsplit(_base(gateway)).path not in ("", "/")
        return Result(
            name,
            False,
            f"{url} answered HTTP {status}",
            "metrics are served at /metrics on the root: pass --gateway as "
            "http://HOST:PORT without a path"
            if with_path
            else "--gateway must be a metergate replica's own address (a proxy in front "
            "of it may hide /metrics or fail to reach it)",
        )
    found = _BUILD_INFO.search(text)
    if found is None:
        return Result(
            name,
            False,
            f"{url} answers, but without metergate metrics",
            "--gateway must point at a metergate replica, not at another service",
        )
    labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
    families = len(set(re.findall(r"^# TYPE (metergate_\w+)", text, re.MULTILINE)))
    return Result(
        name,
        True,
        f"{url} answers: version {labels.get('version', '?')}, config "
        f"{labels.get('config_version', '?')}, {families} metric families",
    )


async def check_prometheus(
    session: httpx2.AsyncClient, prometheus: str, gateway: str, job: str
) -> list[Result]:
    base = _base(prometheus)
    try:
        info = await _get_json(session, f"{base}/api/v1/status/buildinfo")
    except Unreachable as error:
        skipped = "skipped: Prometheus is not reachable"
        return [
            Result(
                "prometheus",
                False,
                f"cannot reach Prometheus at {base}: {error}",
                "start Prometheus with deploy/prometheus/prometheus.yml, or pass the right "
                "--prometheus URL (it listens on port 9090 by default)",
            ),
            Result("prometheus target", None, skipped),
            Result("prometheus rules", None, skipped),
            Result("prometheus alerting", None, skipped),
        ]
    version = info.get("data", {}).get("version", "?")
    results = [Result("prometheus", True, f"{base} answers (Prometheus {version})")]
    results.append(await _check_target(session, base, gateway, job))
    results.append(await _check_rules(session, base))
    results.append(await _check_alerting(session, base))
    return results


async def _check_target(session: httpx2.AsyncClient, base: str, gateway: str, job: str) -> Result:
    name = "prometheus target"
    try:
        data = await _get_json(session, f"{base}/api/v1/targets?state=active")
    except Unreachable as error:
        return Result(name, False, f"cannot list targets: {error}", "check Prometheus' logs")
    targets = [
        t for t in data.get("data", {}).get("activeTargets", []) if t["labels"].get("job") == job
    ]
    if not targets:
        return Result(
            name,
            False,
            f"Prometheus has no target in job {job!r}",
            f"add the gateway to the scrape config (job {job}, deploy/prometheus/targets/"
            "metergate.yml), then reload Prometheus (POST /-/reload)",
        )
    wanted = _netloc(gateway)
    mine = [t for t in targets if _netloc(t.get("scrapeUrl", "")) == wanted]
    judged = mine or targets
    down = [t for t in judged if t.get("health") != "up"]
    if not down:
        where = (
            f"{wanted} is up"
            if mine
            else f"{len(targets)} target(s) up, none at {wanted} (Prometheus may reach the "
            "gateway under another address)"
        )
        return Result(name, True, f"job {job}: {where}")
    first = down[0]
    problem = first.get("lastError") or f"health {first.get('health')}"
    return Result(
        name,
        False,
        f"job {job}: {first.get('scrapeUrl')} is {first.get('health')}: {problem}",
        _scrape_fix(problem),
    )


def _scrape_fix(error: str) -> str:
    lowered = error.lower()
    if "401" in lowered:
        return (
            "the gateway wants its metrics token: put server.metrics_token in the file the "
            "scrape job's authorization.credentials_file names "
            "(deploy/prometheus/secrets/metergate-metrics-token)"
        )
    if "404" in lowered:
        return "set metrics_path: /metrics (the gateway serves it there and at /v1/metrics)"
    if "connection refused" in lowered or "no such host" in lowered:
        return (
            "the target address is wrong or the replica is down: fix the address in "
            "deploy/prometheus/targets/metergate.yml or start the replica"
        )
    if "deadline" in lowered or "timeout" in lowered:
        return "the scrape timed out: check the network path, or raise scrape_timeout"
    if "unknown" in lowered:
        return "not scraped yet: wait one scrape interval and run doctor again"
    return "see the target's error on Prometheus' /targets page"


async def _check_rules(session: httpx2.AsyncClient, base: str) -> Result:
    name = "prometheus rules"
    try:
        data = await _get_json(session, f"{base}/api/v1/rules")
    except Unreachable as error:
        return Result(name, False, f"cannot list rules: {error}", RULES_HINT)
    groups = {g["name"]: g for g in data.get("data", {}).get("groups", [])}
    missing = [g for g in EXPECTED_RULE_GROUPS if g not in groups]
    if missing:
        return Result(name, False, f"rule groups not loaded: {', '.join(missing)}", RULES_HINT)
    broken = [
        f"{rule.get('name')}: {rule.get('lastError')}"
        for group in EXPECTED_RULE_GROUPS
        for rule in groups[group].get("rules", [])
        if rule.get("health") == "err"
    ]
    if broken:
        return Result(
            name,
            False,
            f"{len(broken)} rule(s) fail to evaluate, e.g. {broken[0]}",
            "run `promtool check rules` and `promtool test rules deploy/prometheus/tests/"
            "*_test.yml`; a rule file from another version may not match the metric contract",
        )
    count = sum(len(groups[g].get("rules", [])) for g in EXPECTED_RULE_GROUPS)
    return Result(
        name, True, f"{len(EXPECTED_RULE_GROUPS)} metergate groups, {count} rules, healthy"
    )


async def _check_alerting(session: httpx2.AsyncClient, base: str) -> Result:
    name = "prometheus alerting"
    try:
        data = await _get_json(session, f"{base}/api/v1/alertmanagers")
    except Unreachable as error:
        return Result(name, False, f"cannot list Alertmanagers: {error}", "check Prometheus' logs")
    active = [a["url"] for a in data.get("data", {}).get("activeAlertmanagers", [])]
    if not active:
        return Result(
            name,
            False,
            "Prometheus sends alerts to no Alertmanager",
            "configure alerting.alertmanagers in prometheus.yml (deploy/prometheus/targets/"
            "alertmanager.yml), then reload Prometheus",
        )
    return Result(name, True, f"alerts go to {', '.join(active)}")


async def check_alertmanager(session: httpx2.AsyncClient, alertmanager: str) -> Result:
    base = _base(alertmanager)
    name = "alertmanager"
    try:
        status = await _get_json(session, f"{base}/api/v2/status")
    except Unreachable as error:
        return Result(
            name,
            False,
            f"cannot reach Alertmanager at {base}: {error}",
            "start Alertmanager with deploy/alertmanager/alertmanager.yml (check it with "
            "`amtool check-config`), or pass the right --alertmanager URL (port 9093 by default)",
        )
    version = status.get("versionInfo", {}).get("version", "?")
    cluster = status.get("cluster", {}).get("status", "?")
    return Result(name, True, f"{base} answers (Alertmanager {version}, cluster {cluster})")


async def run_checks(
    gateway: str,
    prometheus: str | None,
    alertmanager: str | None,
    job: str,
    timeout_seconds: float,
) -> list[Result]:
    import httpx2  # loaded by this command only, not by every `metergate` process

    async with httpx2.AsyncClient(timeout=timeout_seconds) as session:
        results = [await check_gateway(session, gateway)]
        if prometheus:
            results += await check_prometheus(session, prometheus, gateway, job)
        if alertmanager:
            results.append(await check_alertmanager(session, alertmanager))
    return results


def doctor(
    gateway: Annotated[
        str, typer.Option("--gateway", help="a gateway replica's base URL (serves /metrics)")
    ] = "http://127.0.0.1:4000",
    prometheus: Annotated[
        str | None,
        typer.Option("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090"),
    ] = None,
    alertmanager: Annotated[
        str | None,
        typer.Option("--alertmanager", help="Alertmanager base URL, e.g. http://127.0.0.1:9093"),
    ] = None,
    job: Annotated[str, typer.Option("--job", help="scrape job of the gateway")] = "metergate",
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="seconds to wait for each answer")
    ] = 5.0,
) -> None:
    """Check that metrics are served, scraped, evaluated and alerted on; say what to fix."""
    results = asyncio.run(run_checks(gateway, prometheus, alertmanager, job, timeout))
    width = max(len(r.name) for r in results)
    for result in results:
        mark = {True: "[green]ok  [/green]", False: "[red]FAIL[/red]", None: "[dim]skip[/dim]"}
        console.print(
            f"{mark[result.ok]} {result.name.ljust(width)}  {escape(result.detail)}",
            highlight=False,
        )
        if result.fix:
            console.print(f"     {' ' * width}  fix: {escape(result.fix)}", highlight=False)
    failed = sum(1 for r in results if r.ok is False)
    if failed:
        console.print(f"[red]{failed} of {len(results)} checks failed[/red]")
        raise typer.Exit(1)
    passed = "the check passed" if len(results) == 1 else f"all {len(results)} checks passed"
    console.print(f"[green]{passed}[/green]")
