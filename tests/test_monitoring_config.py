"""The shipped monitoring stack, checked by the tools that will load it.

promtool checks the Prometheus config and rules and runs the rule unit tests in
deploy/prometheus/tests; amtool checks the Alertmanager config, its routes and its
templates. The rest are the conventions an operator relies on: every alert unit-tested,
with a severity, a runbook and a section in docs/monitoring.md; no secret in a config
file; dashboards bound to the provisioned datasource with stable uids.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from metergate.cli.doctor import EXPECTED_RULE_GROUPS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "metergate.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "metergate.yml"
DOCS = ROOT / "docs" / "monitoring.md"
ROLLOUT_SOURCES = sorted((ROOT / "src" / "metergate" / "rollout").glob("*.py"))
SEVERITIES = {"critical", "warning", "info"}
# Alerts about an event rather than a state: they fire at once, without `for:`.
EVENT_ALERTS = {"MetergateRolloutRolledBack"}
# Each alert's `runbook`: the runbook URL of metergate-settings.yml and the alert's section
# (repo-relative until that rule has been evaluated once).
RUNBOOK = (
    '{{ with query "metergate:runbook_url" }}{{ . | first | label "url" }}'
    "{{ else }}docs/monitoring.md{{ end }}#"
)


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/test installs it)")
    return path


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def rule_groups() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        yield from yaml.safe_load(path.read_text())["groups"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


# --- Prometheus -----------------------------------------------------------------------------


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    done = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(RULE_FILES)} rule files found" in done.stdout + done.stderr
    done = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_mcp_targets_are_named_like_the_gateways_mcp_servers() -> None:
    """Job mcp's targets carry `mcp_server_name` (their name in the gateway's `mcp.servers`),
    so both views of a server line up; a target without one is named by its address."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "mcp"]
    assert job["metrics_path"] == "/metrics"
    (relabel,) = job["relabel_configs"]
    assert relabel["source_labels"] == ["mcp_server_name", "__address__"]
    assert relabel["target_label"] == "mcp_server_name"
    # Prometheus anchors the regex and joins the source labels with ";"
    pattern = re.compile(f"^(?:{relabel['regex']})$")
    assert pattern.match(";10.0.0.7:8000").expand(relabel["replacement"].replace("$", "\\")) == (
        "10.0.0.7:8000"
    )
    assert not pattern.match("search;10.0.0.7:8000")  # a named target keeps its name


def test_prometheus_scrapes_gateway_and_mcp_jobs_from_target_files() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= {"metergate", "mcp"}
    assert jobs["metergate"]["metrics_path"] == "/metrics"  # at the root, not /v1
    assert config["rule_files"] == ["rules/*.yml"]
    files = [
        *(f for job in jobs.values() for sd in job["file_sd_configs"] for f in sd["files"]),
        *(
            f
            for am in config["alerting"]["alertmanagers"]
            for sd in am["file_sd_configs"]
            for f in sd["files"]
        ),
    ]
    for name in files:  # each file_sd file exists and has the file_sd shape
        groups = yaml.safe_load((PROMETHEUS / name).read_text())
        assert isinstance(groups, list), name
        for group in groups:
            assert set(group) <= {"targets", "labels"}, name
            assert all(re.fullmatch(r"[\w.-]+:\d+", t) for t in group["targets"]), name


def test_rule_unit_tests_pass() -> None:
    promtool = tool("promtool")
    # One process per file, in parallel: together they take as long as the slowest.
    processes = {
        path.name: subprocess.Popen(
            [promtool, "test", "rules", path.name],
            cwd=path.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in RULE_TESTS
    }
    failures = []
    for name, process in processes.items():
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            failures.append(f"{name}:\n{output}")
    assert not failures, "\n".join(failures)


def test_every_alert_rule_is_unit_tested_firing_and_silent() -> None:
    """Each alerting rule (name + severity + window) has a test where it fires, and each
    alert name has one where it must stay silent."""
    fired: set[tuple[str, str, str]] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        for test in spec["tests"]:
            for case in test.get("alert_rule_test", []):
                name = case["alertname"]
                if not case.get("exp_alerts"):
                    silent.add(name)
                for alert in case.get("exp_alerts") or []:
                    labels = alert["exp_labels"]
                    fired.add((name, labels["severity"], str(labels.get("window", ""))))
                    assert alert.get("exp_annotations"), f"{path.name}: {name} annotations"
    rules = {
        (r["alert"], r["labels"]["severity"], str(r["labels"].get("window", "")))
        for r in alert_rules()
    }
    assert rules - fired == set(), "alerting rules never shown firing"
    assert {r["alert"] for r in alert_rules()} - silent == set(), "never shown silent"


def test_alert_rules_have_severity_for_and_runbook_annotations() -> None:
    docs = DOCS.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in docs.splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        name = rule["alert"]
        assert name.startswith("Metergate"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert ("for" in rule) != (name in EVENT_ALERTS), f"{name}: choose `for:` on purpose"
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert len(annotations["description"]) > 120, f"{name}: say what to check and do"
        assert annotations["runbook"].startswith(RUNBOOK), f"{name}: {annotations['runbook']}"
        anchor = annotations["runbook"].removeprefix(RUNBOOK)
        assert anchor in anchors, f"{name}: {anchor}"


def runbook_url() -> str:
    """The runbook URL metergate-settings.yml ships."""
    settings = yaml.safe_load((PROMETHEUS / "rules" / "metergate-settings.yml").read_text())
    (rule,) = [
        rule
        for group in settings["groups"]
        for rule in group["rules"]
        if rule.get("record") == "metergate:runbook_url"
    ]
    assert rule["expr"] == "vector(1)"
    return str(rule["labels"]["url"])


def test_runbooks_are_absolute_links_under_one_documented_url() -> None:
    url = runbook_url()
    assert url.startswith("https://") and url.endswith("/docs/monitoring.md"), url
    assert "metergate:runbook_url" in DOCS.read_text()
    # the unit tests see every alert's runbook as that URL and its section: the template
    # above expands to the link
    expanded = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                for alert in case.get("exp_alerts") or []:
                    expanded.add(alert["exp_annotations"]["runbook"].partition("#")[0])
    assert expanded == {url}


def test_recording_rules_follow_conventions_and_aggregate_histograms_correctly() -> None:
    records = [rule for group in rule_groups() for rule in group["rules"] if "record" in rule]
    assert len({(r["record"], json.dumps(r.get("labels"))) for r in records}) == len(records)
    for group in rule_groups():
        for rule in group["rules"]:
            if "record" in rule:  # level:metric:operations; knobs are constants, one colon
                colons = 1 if group["name"] == "metergate.settings" else 2
                assert rule["record"].count(":") >= colons, rule["record"]
    for group in rule_groups():
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            # the source write-up's `histogram_quantile(...) by (le, model)` is invalid
            assert not re.search(r"histogram_quantile\([^)]*\)\s*\)\s*by", expr), expr
            for call in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,\s*", expr):
                argument = expr[call.end() :]
                by = re.match(r"sum by \(([^)]*)\)", argument)
                assert (by and "le" in {label.strip() for label in by.group(1).split(",")}) or (
                    re.match(r"\w+:\w+_bucket:\w+", argument)  # recorded `sum by (le, ...)`
                ), f"{expr}: sum the buckets by (le, ...) before histogram_quantile"
    recorded = {r["record"] for r in records}
    assert {
        "mcp_server:mcp_client_tool_calls:rate5m",
        "mcp_server:mcp_client_tool_calls_errors:ratio_rate5m",
        "mcp_server_tool:mcp_client_tool_calls_errors:ratio_rate5m",
        "mcp_server_tool:mcp_client_tool_call_duration_seconds:p95_5m",
        "mcp_server:mcp_server_tool_calls_errors:ratio_rate5m",
        "mcp_server_tool:mcp_server_tool_call_duration_seconds:p95_5m",
        "rollout_target:metergate_upstream_attempts_errors:ratio_rate5m",
        "rollout_target:metergate_request_duration_seconds:p99_5m",
        "model:metergate_requests_errors:ratio_rate5m",
        "model:metergate_request_duration_seconds:p50_5m",
        "model:metergate_request_duration_seconds:p95_5m",
        "model:metergate_request_duration_seconds:p99_5m",
        "model_type:metergate_tokens:rate5m",
        "key_type:metergate_tokens:increase1h",
        "upstream:metergate_cost_usd:rate5m",
        "key:metergate_cost_usd:increase1h",
        "model:metergate_cost_usd:forecast_24h",
    } <= recorded


def test_doctor_expects_exactly_the_shipped_rule_groups() -> None:
    assert sorted(EXPECTED_RULE_GROUPS) == sorted(g["name"] for g in rule_groups())


def test_rule_unit_tests_evaluate_every_group_in_order() -> None:
    """Each test lists every group of the rule files it loads in group_eval_order, recording
    groups first, so a new group cannot be evaluated out of order unnoticed."""
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        loaded = [
            group["name"]
            for name in spec["rule_files"]
            if (path.parent / name).resolve().parent == PROMETHEUS / "rules"
            for group in yaml.safe_load((path.parent / name).read_text())["groups"]
        ]
        order = [g for g in spec["group_eval_order"] if g in loaded]
        assert sorted(order) == sorted(loaded), path.name
        alerts = [i for i, g in enumerate(order) if ".alerts." in g]
        assert alerts == list(range(len(order) - len(alerts), len(order))), path.name


def rollout_events() -> set[str]:
    """Every event name the rollout code records or counts (string literals)."""
    events = set()
    for path in ROLLOUT_SOURCES:
        text = path.read_text()
        events |= set(re.findall(r'_commit\(\s*database,\s*rollout,\s*"(\w+)"', text))
        events |= set(re.findall(r'save\(\s*database,\s*rollout,\s*"(\w+)"', text))
        events |= set(re.findall(r'rollout_transitions\.labels\([^,]+,\s*"(\w+)"\)', text))
    return events


def test_rollout_rules_and_dashboards_name_events_the_gateway_emits() -> None:
    events = rollout_events()
    assert events >= {"started", "promoted", "completed", "rolled_back", "gate_failed", "held"}
    texts = [path.read_text() for path in RULE_FILES + DASHBOARDS]
    named = {e for text in texts for e in re.findall(r'event\\?="(\w+)', text)}
    assert "rolled_back" in named
    assert named <= events, f"events nobody emits: {named - events}"


# --- Alertmanager ---------------------------------------------------------------------------


def test_alertmanager_config_passes_amtool() -> None:
    done = run(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 inhibit rules" in done.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (
            ["severity=critical", "alertname=MetergateHighSpending", "model=gpt-4.1"],
            "pagerduty-critical",
        ),
        (
            ["severity=warning", "alertname=MetergateHighErrorRate", "model=gpt-4.1"],
            "slack-warning",
        ),
        (["severity=info", "alertname=MetergateUsageSpike", "model=gpt-4.1"], "webhook-info"),
        (
            ["severity=critical", "alertname=MetergateBudgetSpent", "budget=monthly"],
            "pagerduty-critical",
        ),
        (
            ["severity=warning", "alertname=MetergateMcpServerDown", "mcp_server_name=search"],
            "slack-warning",
        ),
        # an alert without a known severity still reaches people
        (["alertname=SomethingElse"], "slack-warning"),
    ],
)
def test_alertmanager_routes_each_severity_to_its_receiver(
    labels: list[str], receiver: str
) -> None:
    done = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == receiver


def test_alertmanager_groups_by_alertname_and_what_the_alert_is_about() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    assert config["route"]["group_by"] == [
        "alertname", "model", "upstream", "budget", "mcp_server_name", "rollout"
    ]  # fmt: skip
    # every label an alert is per (its `by` clause) is one it is grouped by
    grouped = set(config["route"]["group_by"])
    for rule in alert_rules():
        for clause in re.findall(r"\b(?:max|sum|count) by \(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in clause.split(",")} - {"job", "le"}
            assert labels <= grouped, f"{rule['alert']}: {labels - grouped}"
    generic = config["inhibit_rules"][0]
    assert generic["source_matchers"] == ['severity="critical"']
    assert 'severity="warning"' in generic["target_matchers"]
    assert generic["equal"] == ["alertname", "model"]


def test_alertmanager_takes_every_secret_from_a_file() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    literal_secrets = {
        "api_url",
        "routing_key",
        "service_key",
        "slack_api_url",
        "pagerduty_url",
        "password",
        "credentials",
        "bot_token",
        "api_key",
        "token",
        "auth_password",
    }

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                assert key not in literal_secrets, f"{path}.{key} is a literal secret"
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(config, "alertmanager")
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["pagerduty-critical"]["pagerduty_configs"][0]["routing_key_file"]
    assert receivers["slack-warning"]["slack_configs"][0]["api_url_file"]
    webhook = receivers["webhook-info"]["webhook_configs"][0]
    assert webhook["http_config"]["authorization"]["credentials_file"]
    assert "@" not in webhook["url"] and "token" not in webhook["url"].lower()


def test_every_receiver_hears_when_its_alerts_resolve_and_none_calls_itself() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in config["receivers"]:
        for key in [k for k in receiver if k.endswith("_configs")]:
            for item in receiver[key]:
                assert item.get("send_resolved") is True, receiver["name"]
                url = item.get("url")
                if url:  # in a container, loopback is Alertmanager itself
                    host = urlsplit(url).hostname or ""
                    assert host not in {"127.0.0.1", "localhost", "::1"}, url


def test_alertmanager_templates_render() -> None:
    data = {
        "receiver": "slack-warning",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "MetergateHighErrorRate",
                    "model": "gpt-4.1",
                    "severity": "warning",
                },
                "annotations": {
                    "summary": "Model gpt-4.1: 12% of requests fail",
                    "description": "What to check.",
                    "runbook": "docs/monitoring.md#metergatehigherrorrate",
                },
                "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus/graph",
                "fingerprint": "1",
            }
        ],
        "groupLabels": {"alertname": "MetergateHighErrorRate", "model": "gpt-4.1"},
        "commonLabels": {
            "alertname": "MetergateHighErrorRate",
            "model": "gpt-4.1",
            "severity": "warning",
        },
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
    }
    lines = render_template(
        data, '{{ template "metergate.title" . }}\n{{ template "metergate.text" . }}'
    ).splitlines()
    assert lines[0] == "[FIRING:1] MetergateHighErrorRate · model gpt-4.1"
    assert "*WARNING* Model gpt-4.1: 12% of requests fail" in lines
    assert "Runbook: docs/monitoring.md#metergatehigherrorrate" in lines

    mcp = {"alertname": "MetergateMcpServerDown", "mcp_server_name": "search"}
    data["alerts"][0]["labels"] = data["commonLabels"] = {**mcp, "severity": "warning"}
    data["groupLabels"] = mcp
    title = render_template(data, '{{ template "metergate.title" . }}')
    assert title.strip() == "[FIRING:1] MetergateMcpServerDown · MCP server search"


def render_template(data: dict[str, Any], text: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(data, file)
        file.flush()
        done = run(
            tool("amtool"),
            "template",
            "render",
            f"--template.glob={ALERTMANAGER.parent / 'templates' / '*.tmpl'}",
            f"--template.data={file.name}",
            f"--template.text={text}",
        )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_alertmanager_templates_tell_resolved_alerts_from_firing_ones() -> None:
    """A group holding a resolved alert and a firing one (the 1h burn over, the 6h one
    still on) says which is which: the page is about the firing one."""

    def alert(status: str, window: str, summary: str) -> dict[str, Any]:
        return {
            "status": status,
            "labels": {
                "alertname": "MetergateErrorBudgetBurn",
                "model": "gpt-4.1",
                "severity": "critical",
                "window": window,
            },
            "annotations": {
                "summary": summary,
                "description": f"{summary}: what to check.",
                "runbook": "docs/monitoring.md#metergateerrorbudgetburn",
            },
            "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "2026-01-01T00:30:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus/graph",
            "fingerprint": window,
        }

    common = {"alertname": "MetergateErrorBudgetBurn", "model": "gpt-4.1", "severity": "critical"}
    data = {
        "receiver": "pagerduty-critical",
        "status": "firing",
        "alerts": [
            alert("resolved", "1h", "Model gpt-4.1 burns its error budget 14.4x too fast"),
            alert("firing", "6h", "Model gpt-4.1 burns its error budget 6x too fast"),
        ],
        "groupLabels": {"alertname": "MetergateErrorBudgetBurn", "model": "gpt-4.1"},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
    }
    title = render_template(data, '{{ template "metergate.title" . }}').strip()
    assert title == "[FIRING:1] MetergateErrorBudgetBurn · model gpt-4.1 (+1 resolved)"
    lines = render_template(data, '{{ template "metergate.text" . }}').splitlines()
    # the firing alert first, in full; the resolved one after, marked, without its advice
    assert lines[0] == "*CRITICAL* Model gpt-4.1 burns its error budget 6x too fast"
    assert "Model gpt-4.1 burns its error budget 6x too fast: what to check." in lines
    resolved = lines.index("*Resolved* (no longer firing):")
    assert lines[resolved + 1] == (
        "- RESOLVED (critical) Model gpt-4.1 burns its error budget 14.4x too fast"
    )
    assert not any("14.4x" in line for line in lines[:resolved])
    assert not any("what to check" in line for line in lines[resolved:])

    # all resolved: the title says so, and nothing reads as firing
    for item in data["alerts"]:
        item["status"] = "resolved"
    data["status"] = "resolved"
    title = render_template(data, '{{ template "metergate.title" . }}').strip()
    assert title == "[RESOLVED] MetergateErrorBudgetBurn · model gpt-4.1"
    text = render_template(data, '{{ template "metergate.text" . }}')
    assert "*CRITICAL*" not in text and text.count("- RESOLVED (critical) ") == 2


# --- Grafana --------------------------------------------------------------------------------


def datasource_uid() -> str:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    return str(source["uid"])


def datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    """Every `datasource` object anywhere in a dashboard: panels, targets, variables."""
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def test_dashboards_use_the_provisioned_datasource_and_stable_uids() -> None:
    uid = datasource_uid()
    uids = set()
    for path in DASHBOARDS:
        text = path.read_text()
        assert "${DS_" not in text and "__inputs" not in text, f"{path.name}: import placeholder"
        dashboard = json.loads(text)
        assert dashboard["uid"] == path.stem and "id" not in dashboard, path.name
        uids.add(dashboard["uid"])
        for source in datasource_refs(dashboard):
            if source.get("type") != "grafana":  # Grafana's built-in annotations
                assert source == {"type": "prometheus", "uid": uid}, path.name
    assert uids == {
        "metergate-overview",
        "metergate-upstreams",
        "metergate-mcp",
        "metergate-rollouts",
    }
    for path in DASHBOARDS:
        for link in json.loads(path.read_text()).get("links", []):
            assert link["url"].removeprefix("/d/") in uids


def test_dashboard_panels_are_laid_out_and_each_has_queries() -> None:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), path.name
        cells: set[tuple[int, int]] = set()
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            area = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not area & cells, f"{path.name}: {panel['title']} overlaps"
            cells |= area
            if panel["type"] == "row":
                continue
            assert panel.get("description"), panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
            assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def dashboard_exprs(uid: str) -> dict[str, list[str]]:
    """Panel title -> its query expressions, for the dashboard `uid`."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / f"{uid}.json").read_text())
    assert dashboard["uid"] == uid
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in panels(dashboard)
    }


def test_mcp_dashboard_shows_both_views_of_every_server() -> None:
    exprs = dashboard_exprs("metergate-mcp")
    text = "\n".join(e for found in exprs.values() for e in found)
    # up/down: the gateway's health tracking and Prometheus' scrapes of job mcp
    assert "metergate_mcp_server_up" in text and 'up{job="mcp"' in text
    # calls, errors and p95 from the gateway (mcp_client_*) and the servers (mcp_server_*)
    for gateway_side, server_side in (
        ("mcp_server:mcp_client_tool_calls:rate5m", "mcp_server:mcp_server_tool_calls:rate5m"),
        (
            "mcp_server_error_type:mcp_client_tool_calls:rate5m",
            "mcp_server_error_type:mcp_server_tool_calls:rate5m",
        ),
        (
            "mcp_server_tool:mcp_client_tool_call_duration_seconds:p95_5m",
            "mcp_server_tool:mcp_server_tool_call_duration_seconds:p95_5m",
        ),
    ):
        titles = [t for t, found in exprs.items() if any(gateway_side in e for e in found)]
        assert titles, gateway_side
        for title in titles:  # each panel with the gateway's view has the servers' too
            assert any(server_side in e for e in exprs[title]), title
    # every query of a server filters by the dashboard's variable
    for title, found in exprs.items():
        if title.startswith("Gateway /mcp endpoint"):
            continue  # the gateway's own endpoint, not an upstream server
        assert all('mcp_server_name=~"$mcp_server"' in e for e in found), title


def test_rollouts_dashboard_compares_targets_of_each_rollout() -> None:
    exprs = dashboard_exprs("metergate-rollouts")
    text = "\n".join(e for found in exprs.values() for e in found)
    for needle in (
        "metergate_rollout_weight",
        "metergate_rollout_transitions_total",
        "rollout_target:metergate_upstream_attempts_errors:ratio_rate5m",
        "rollout_target:metergate_request_duration_seconds:p99_5m",
    ):
        assert needle in text, needle
    assert all('rollout=~"$rollout"' in e for found in exprs.values() for e in found)


def test_rollout_transitions_panel_counts_each_event_once(tmp_path: Path) -> None:
    """The panel's query, run by promtool: a counter's first event (a new series, which
    `increase` cannot see) counts, later events count by `increase`, and a Prometheus that
    starts after the events reports none of them."""
    (expr,) = dashboard_exprs("metergate-rollouts")["Transitions by event"]
    expr = expr.replace("$__interval", "1m").replace("$rollout", ".*")
    name = "metergate_rollout_transitions_total"
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="metergate",instance="gw-1:4000"}', "values": "1x30"},
                    # started at 10m: the counter is born at 1
                    {
                        "series": f'{name}{{job="metergate",instance="gw-1:4000",'
                        'rollout="move",event="started"}',
                        "values": "_x10 1x20",
                    },
                    # promoted at 15m
                    {
                        "series": f'{name}{{job="metergate",instance="gw-1:4000",'
                        'rollout="move",event="promoted"}',
                        "values": "_x10 0x4 1x15",
                    },
                    # on a replica Prometheus only just scrapes: old events, not new ones
                    {"series": 'up{job="metergate",instance="gw-2:4000"}', "values": "_x10 1x20"},
                    {
                        "series": f'{name}{{job="metergate",instance="gw-2:4000",'
                        'rollout="move",event="rolled_back"}',
                        "values": "_x10 3x20",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": '{rollout="move",event="started"}', "value": 1},
                            {"labels": '{rollout="move",event="promoted"}', "value": 0},
                        ],
                    },
                    {
                        "expr": expr,
                        "eval_time": "15m",
                        "exp_samples": [
                            {"labels": '{rollout="move",event="started"}', "value": 0},
                            {"labels": '{rollout="move",event="promoted"}', "value": 1},
                            {"labels": '{rollout="move",event="rolled_back"}', "value": 0},
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "transitions_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = run(tool("promtool"), "test", "rules", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("interval", ["5s", "15s", "1m", "2m"])
def test_rollout_transitions_panel_loses_no_event_when_zoomed_in(
    tmp_path: Path, interval: str
) -> None:
    """Scraped every 15 s, one rollback at 10m15s shows as exactly 1, in exactly one bar,
    whatever the panel's interval: below the scrape interval (Grafana's `$__interval`
    when zoomed in), at it, and at or past the panel's 1m minimum, where `increase()`
    over one interval would miss an event that falls between two bars' windows."""
    panel = next(p for p in panels(json.loads(
        (DEPLOY / "grafana" / "dashboards" / "metergate-rollouts.json").read_text()
    )) if p["title"] == "Transitions by event")  # fmt: skip
    assert panel["interval"] == "1m"  # Grafana's minimum $__interval for this panel
    (expr,) = [target["expr"] for target in panel["targets"]]
    expr = expr.replace("$__interval", interval).replace("$rollout", ".*")
    step = {"5s": 5, "15s": 15, "1m": 60, "2m": 120}[interval]
    # the bars (evaluation times) from 8m to 14m, one interval apart and, as in Grafana,
    # not aligned with the scrapes: 7 s after them
    times = list(range(8 * 60 + 7, 14 * 60 + 1, step))
    name = "metergate_rollout_transitions_total"
    spec = {
        "rule_files": [],
        "evaluation_interval": "5s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    {"series": 'up{job="metergate",instance="gw-1:4000"}', "values": "1x80"},
                    {
                        "series": f'{name}{{job="metergate",instance="gw-1:4000",'
                        'rollout="move",event="rolled_back"}',
                        "values": "0x40 1x40",  # 0 until 10m, 1 from 10m15s
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": f"{at}s",
                        "exp_samples": [
                            {
                                "labels": '{rollout="move",event="rolled_back"}',
                                # the one bar whose interval holds 10m15s
                                "value": 1 if at - step < 615 <= at else 0,
                            }
                        ],
                    }
                    for at in times
                ],
            }
        ],
    }
    path = tmp_path / "zoomed_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = run(tool("promtool"), "test", "rules", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_retries_panel_does_not_count_fallbacks(tmp_path: Path) -> None:
    """Upstream health's Retries/s, run by promtool. `fb` has no retries and a dead
    upstream with a fallback: each request is two attempts (the failed one, then the
    fallback's) and one fallback, and no retry. `rt` retries once per request on its own
    upstream: one retry a request. Cache hits make no attempt."""
    (expr,) = dashboard_exprs("metergate-upstreams")["Retries/s (all upstreams)"]
    expr = expr.replace("$__rate_interval", "5m")

    def series(name: str, labels: str, per_minute: int) -> dict[str, str]:
        return {
            "series": f'{name}{{job="metergate",instance="gw-1:4000",{labels}}}',
            "values": f"0+{per_minute}x20",
        }

    requests, attempts = "metergate_requests_total", "metergate_upstream_attempts_total"
    inputs = [
        # fb: 60 requests a minute, served by the fallback's upstream
        series(requests, 'model="fb",upstream="backup",key="k",outcome="success"', 60),
        series(attempts, 'upstream="dead",outcome="connection_error"', 60),
        series(attempts, 'upstream="backup",outcome="success"', 60),
        series(
            "metergate_fallbacks_total", 'model="fb",from_upstream="dead",to_upstream="backup"', 60
        ),
        # rt: 30 requests a minute, each retried once on its upstream
        series(requests, 'model="rt",upstream="flaky",key="k",outcome="success"', 30),
        series(attempts, 'upstream="flaky",outcome="upstream_error"', 30),
        series(attempts, 'upstream="flaky",outcome="success"', 30),
        # cached: 120 requests a minute answered from the cache, no attempt
        series(requests, 'model="cached",upstream="steady",key="k",outcome="success"', 120),
        series("metergate_cache_requests_total", 'model="cached",result="hit"', 120),
    ]
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "promql_expr_test": [
                    # rt's 30 retries a minute, none of fb's fallbacks
                    {"expr": expr, "eval_time": "10m", "exp_samples": [{"value": 0.5}]},
                ],
            }
        ],
    }
    path = tmp_path / "retries_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = run(tool("promtool"), "test", "rules", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_provider_is_file_based_and_locked() -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    assert provider["options"]["path"]


# --- docs -----------------------------------------------------------------------------------


def test_monitoring_docs_cover_every_alert_and_the_knobs() -> None:
    docs = DOCS.read_text()
    for name in {rule["alert"] for rule in alert_rules()}:
        assert f"### {name}" in docs, name
    for needle in (
        "99.5%",
        "/d/metergate-mcp",
        "/d/metergate-rollouts",
        "mcp_server_name",
        "metergate-settings.yml",
        "routing_key_file",
        "api_url_file",
        "metergate doctor",
        "promtool test rules",
    ):
        assert needle in docs, needle
