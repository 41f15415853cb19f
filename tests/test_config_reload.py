"""Live config reload, config history and rollback."""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from metergate.cli import app as cli_app
from metergate.storage import config_versions
from metergate.storage.database import open_database
from tests.harness import simulated_config, write_config
from tests.services import GatewayProcess, create_key_sync, fill, small_filesystem

ADMIN_KEY = "admin-secret-0123456789abcdef"
ASK = [{"role": "user", "content": "reload"}]
WRK_SCRIPT = Path(__file__).parents[1] / "bench" / "wrk" / "post.lua"


def config_with_price(output_price: float) -> dict:
    config = simulated_config(output_tokens=10)
    config["upstreams"]["sim-up"]["price"] = {"input": 0, "output": output_price}
    config["models"]["bench"] = {"upstreams": ["sim-up"]}
    config["admin"] = {"api_key": ADMIN_KEY}
    return config


def cost(gateway_url: str, key: str) -> str:
    client = openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="sim", messages=ASK)
    return raw.headers["x-metergate-cost-usd"]


def reload(base: str, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(
        f"{base}/admin/reload", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def test_reload_under_load_drops_nothing(gateway_factory, tmp_path):
    wrk = shutil.which("wrk")
    assert wrk, "wrk is installed by scripts/test"
    gateway = gateway_factory(config_with_price(1_000_000))
    base = gateway.base_url.removesuffix("/v1")
    path = Path(gateway.runtime.source)
    assert cost(gateway.base_url, gateway.key) == "10.000000000"
    load = subprocess.Popen(
        [
            wrk,
            "-t1",
            "-c16",
            "-d4s",
            "--timeout",
            "5s",
            "-s",
            str(WRK_SCRIPT),
            f"{gateway.base_url}/chat/completions",
            "--",
            gateway.key,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        for price in (2_000_000, 3_000_000, 4_000_000):
            path.write_text(
                yaml.safe_dump(
                    config_with_price(price)
                    | {"ledger": gateway.runtime.plan.config.ledger.model_dump()}
                )
            )
            answer = reload(base)
            assert answer.status_code == 200 and answer.json()["applied"] is True
            time.sleep(0.6)
    finally:
        output = load.communicate(timeout=30)[0]
    assert "Non-2xx" not in output and "Socket errors" not in output, output
    served = int(output.split(" requests in ")[0].split()[-1])
    assert served > 100
    assert cost(gateway.base_url, gateway.key) == "40.000000000"
    rows = gateway.ledger_rows("model = 'bench'")
    assert len(rows) >= served and all(row["outcome"] == "success" for row in rows)
    assert gateway.metric("metergate_build_info") == 1  # one version label at a time


def test_invalid_reload_is_refused_and_reported(gateway_factory):
    gateway = gateway_factory(config_with_price(1_000_000))
    base = gateway.base_url.removesuffix("/v1")
    version = gateway.runtime.plan.version
    Path(gateway.runtime.source).write_text("models:\n  sim:\n    upstreams: [nowhere]\n")
    answer = reload(base)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert f"still serving version {version}" in error["message"]
    assert any("unknown upstream 'nowhere'" in problem for problem in error["problems"])
    assert gateway.runtime.plan.version == version
    assert cost(gateway.base_url, gateway.key) == "10.000000000"


def test_config_reload_command_reports_the_gateway_and_a_proxy_in_its_place(
    gateway_factory, monkeypatch
):
    """`metergate config reload` says what the gateway did, and an answer that is not the
    gateway's (a proxy's HTML 502 page) in one line naming the status, not a traceback."""
    monkeypatch.setenv("METERGATE_ADMIN_KEY", ADMIN_KEY)
    gateway = gateway_factory(config_with_price(1_000_000))
    base = gateway.base_url.removesuffix("/v1")
    done = CliRunner().invoke(cli_app, ["config", "reload", "--gateway", base])
    assert done.exit_code == 0, done.output
    assert f"config unchanged: version {gateway.runtime.plan.version}" in done.output

    class BadGateway(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(502)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BadGateway)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{proxy.server_address[1]}"
        done = CliRunner().invoke(cli_app, ["config", "reload", "--gateway", address])
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert done.exit_code == 1, done.output
    assert isinstance(done.exception, SystemExit), done.exception  # an exit, not a crash
    said = " ".join(done.output.split())
    assert f"{address}/admin/reload answered HTTP 502, and not with the gateway's JSON" in said
    assert "Traceback" not in done.output


def test_budgets_and_rate_limits_for_nobody_are_said_at_start_and_reload(gateway_factory, caplog):
    """Keys and teams live in the ledger, so `check` cannot tell a typo in a budget's or
    rate limit's target; the gateway, which reads the ledger, says which name nobody
    has (such a limit applies to nobody), and no longer once a key of that name exists."""
    caplog.set_level(logging.WARNING, logger="metergate")
    config = config_with_price(1_000_000)
    config["budgets"] = {
        "for-a-key": {"limit_usd": 1, "scope": "key", "target": "ghost-key"},
        "for-a-team": {"limit_usd": 1, "scope": "team", "target": "ghost-team"},
        "for-each": {"limit_usd": 1, "scope": "key", "target": "*"},
    }
    config["rate_limits"] = {"keys": {"*": {"rpm": 100}, "ghost-2": {"rpm": 5}}}
    gateway = gateway_factory(config)
    said = [r.message for r in caplog.records if r.message.startswith("config ")]
    assert said == [
        "config budgets.for-a-key.target: no key is named 'ghost-key': the budget limits "
        "nobody; check the name (`metergate keys list`)",
        "config budgets.for-a-team.target: no team is named 'ghost-team': the budget limits "
        "nobody; check the name (`metergate teams list`)",
        "config rate_limits.keys.ghost-2: no key is named 'ghost-2': the rate limit applies to "
        "nobody; check the name (`metergate keys list`)",
    ]
    caplog.clear()
    gateway.new_key("ghost-key")
    gateway.bg.run(gateway.runtime.keys.reload())
    config["budgets"]["for-a-key"]["limit_usd"] = 2
    Path(gateway.runtime.source).write_text(yaml.safe_dump(config))
    assert reload(gateway.base_url.removesuffix("/v1")).json()["applied"] is True
    said = " ".join(r.message for r in caplog.records if r.message.startswith("config "))
    assert "ghost-team" in said and "'ghost-key'" not in said


def test_a_reload_says_which_settings_wait_for_a_restart(gateway_factory, caplog):
    """A new port, ledger or header limit cannot be taken by a running process: the rest
    of the config is applied, and the answer (and the log) name what waits for a
    restart, until the file goes back to what the process started with."""
    gateway = gateway_factory(config_with_price(1_000_000))
    base = gateway.base_url.removesuffix("/v1")
    path = Path(gateway.runtime.source)
    started = yaml.safe_load(path.read_text())
    changed = config_with_price(2_000_000) | {
        "ledger": {"url": f"sqlite:///{path.parent / 'elsewhere.db'}"},
        "server": {"port": 4999, "max_header_bytes": 16384},
    }
    path.write_text(yaml.safe_dump(changed))
    answer = reload(base)
    assert answer.status_code == 200 and answer.json()["applied"] is True
    assert answer.json()["restart_required"] == ["server.port", "server.max_header_bytes", "ledger"]
    assert "take effect only after a restart: server.port" in caplog.text
    assert cost(gateway.base_url, gateway.key) == "20.000000000"  # the rest is applied
    path.write_text(yaml.safe_dump(started | {"admin": {"api_key": ADMIN_KEY}}))
    back = reload(base)
    assert back.status_code == 200 and back.json()["restart_required"] == []


def test_a_reload_of_a_file_that_is_not_utf8_is_refused(gateway_factory):
    gateway = gateway_factory(config_with_price(1_000_000))
    base = gateway.base_url.removesuffix("/v1")
    version = gateway.runtime.plan.version
    path = Path(gateway.runtime.source)
    path.write_bytes(path.read_text().replace("sim-up", "sim-café").encode("latin-1"))
    answer = reload(base)
    assert answer.status_code == 422
    assert "not valid UTF-8: byte 0xe9" in answer.json()["error"]["problems"][0]
    assert gateway.runtime.plan.version == version
    assert cost(gateway.base_url, gateway.key) == "10.000000000"


def test_admin_api_takes_only_the_admin_key(gateway_factory):
    gateway = gateway_factory(config_with_price(1))
    base = gateway.base_url.removesuffix("/v1")
    assert reload(base, gateway.key).status_code == 403
    assert reload(base, "not-the-admin-key").status_code == 401
    assert httpx.post(f"{base}/admin/reload").status_code == 401
    unguarded = gateway_factory(simulated_config())
    answer = reload(unguarded.base_url.removesuffix("/v1"))
    assert answer.status_code == 404 and "admin API is off" in answer.json()["error"]["message"]


def metergate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "metergate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def process_gateway(tmp_path):
    path = write_config(config_with_price(1_000_000), tmp_path)
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    key = create_key_sync(ledger, "ops")
    gateway = GatewayProcess(path, tmp_path)
    try:
        gateway.wait_ready()
        yield gateway, path, key
    finally:
        gateway.kill_all()


def wait_for_cost(gateway: GatewayProcess, key: str, expected: str, limit: float = 8) -> None:
    deadline = time.monotonic() + limit
    seen = None
    while time.monotonic() < deadline:
        seen = cost(f"{gateway.base_url}/v1", key)
        if seen == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"cost stayed {seen}, expected {expected}")


def test_a_rollback_that_cannot_rewrite_the_file_leaves_it_whole(tmp_path):
    """The config file on a full filesystem: the rollback is recorded (gateways follow
    the history), the file it could not rewrite is left as it was, not cut short (a cut
    file may be a valid config of other values, which a restart would run), and the
    command says so and exits 1."""
    with small_filesystem(tmp_path / "small") as small:
        path = small / "gateway.yaml"
        ledger = {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
        padding = "#" + "x" * 80 + "\n"
        older = padding * 80 + yaml.safe_dump(config_with_price(1_000_000) | {"ledger": ledger})
        newer = yaml.safe_dump(config_with_price(5_000_000) | {"ledger": ledger})

        async def record_both() -> None:
            database = await open_database(ledger["url"])
            try:
                for text in (older, newer):
                    await config_versions.record(database, text, str(path), "test")
            finally:
                await database.close()

        asyncio.run(record_both())
        path.write_text(newer)
        fill(small)
        done = metergate("config", "rollback", "-c", str(path), cwd=tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr
        said = " ".join(done.stderr.split())
        assert "could not be rewritten (No space left on device; it is as it was)" in said
        assert "rolled back to v1" in done.stdout  # recorded: the gateways follow it
        assert path.read_text() == newer
        assert sorted(p.name for p in small.iterdir()) == ["filler", "gateway.yaml"]


def test_sighup_reloads_and_config_rollback_restores(process_gateway, tmp_path):
    gateway, path, key = process_gateway
    ledger = {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    original = path.read_text()
    path.write_text(yaml.safe_dump(config_with_price(5_000_000) | {"ledger": ledger}))
    os.kill(gateway.pid, signal.SIGHUP)
    wait_for_cost(gateway, key, "50.000000000")

    history = metergate("config", "history", "-c", str(path), cwd=tmp_path)
    assert history.returncode == 0
    assert "v2 (current)" in history.stdout and "SIGHUP" in history.stdout
    assert "started" in history.stdout

    back = metergate("config", "rollback", "-c", str(path), cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert "rolled back to v1" in back.stdout
    wait_for_cost(gateway, key, "10.000000000")
    assert path.read_text() == original  # a restart keeps the rolled-back config
    after = metergate("config", "history", "-c", str(path), cwd=tmp_path)
    assert "rollback to v1" in after.stdout
    again = metergate("config", "rollback", "v2", "-c", str(path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # a version as `config history` writes it
    assert "rolled back to v2" in again.stdout
    wait_for_cost(gateway, key, "50.000000000")
    # by its hash, as `config reload` and /readyz name a version
    first = next(line for line in history.stdout.splitlines() if re.search(r"\bv1\b", line))
    (digest,) = re.findall(r"\b[0-9a-f]{12}\b", first)
    by_hash = metergate("config", "rollback", digest.upper(), "-c", str(path), cwd=tmp_path)
    assert by_hash.returncode == 0, by_hash.stderr  # (v3, the rollback to v1, is newest)
    assert "rolled back to v3" in by_hash.stdout
    wait_for_cost(gateway, key, "10.000000000")
    bad = metergate("config", "rollback", "latest", "-c", str(path), cwd=tmp_path)
    assert bad.returncode == 2 and "hash (12 hexadecimal characters)" in bad.stderr

    path.write_text("providers: {broken")
    os.kill(gateway.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert cost(f"{gateway.base_url}/v1", key) == "10.000000000"
    assert "config reload (SIGHUP) refused" in gateway.log()

    path.write_bytes(original.replace("sim-up", "sim-café").encode("latin-1"))
    os.kill(gateway.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not valid UTF-8: byte 0xe9" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "not valid UTF-8: byte 0xe9" in gateway.log()
    assert cost(f"{gateway.base_url}/v1", key) == "10.000000000"


def _series(gateway: GatewayProcess) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample's (name, labels) in the gateway's /metrics (all workers merged)."""
    text = httpx.get(f"{gateway.base_url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_what_a_reload_removes_leaves_metrics(tmp_path: Path, workers: int) -> None:
    """A budget, an upstream and a rollout removed by a reload leave /metrics (their
    gauges would otherwise keep their last value, and alerts on them keep firing, until
    a restart), with one worker or several; the build info names the new version only."""
    config = config_with_price(1_000_000)
    config["upstreams"]["spare-up"] = {"provider": "sim", "model": "s2", "price": {"input": 3}}
    config["models"]["sim"]["upstreams"] = ["sim-up", "spare-up"]
    config["budgets"] = {"monthly": {"limit_usd": 100, "hard": False}}
    config["rollouts"] = {
        "move": {"model": "bench", "baseline": ["sim-up"], "candidate": ["spare-up"]}
    }
    path = write_config(config, tmp_path)
    ledger = {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    spare = ("upstream", "spare-up")
    gateway = GatewayProcess(path, tmp_path, workers=workers)
    try:
        gateway.wait_ready()
        before = _series(gateway)
        removed = {
            ("metergate_budget_limit_usd", (("budget", "monthly"),)),
            ("metergate_budget_spent_usd", (("budget", "monthly"),)),
            (
                "metergate_model_price_usd_per_million_tokens",
                (("type", "input"), ("upstream", "spare-up")),
            ),
            ("metergate_circuit_state", (spare,)),
            ("metergate_rollout_weight", (("rollout", "move"), ("target", "spare-up"))),
        }
        assert removed <= before
        path.write_text(yaml.safe_dump(config_with_price(1_000_000) | {"ledger": ledger}))
        answer = reload(gateway.base_url)
        assert answer.status_code == 200 and answer.json()["applied"] is True
        deadline = time.monotonic() + 15  # every worker follows within its 2 s poll
        while time.monotonic() < deadline:
            after = _series(gateway)
            builds = [labels for name, labels in after if name == "metergate_build_info"]
            if not removed & after and len(builds) == 1:
                break
            time.sleep(0.2)
        if removed & after or len(builds) != 1:  # pytest.fail prints the log whole
            pytest.fail(f"still shown: {removed & after}, builds {builds}\n{gateway.log()}")
        assert ("metergate_circuit_state", (("upstream", "sim-up"),)) in after  # kept ones stay
    finally:
        gateway.kill_all()
