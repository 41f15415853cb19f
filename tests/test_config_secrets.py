"""Literal secrets in a config file never reach the config history, and stored versions
still work: a rollback, another process following a reload, and a rotated literal
secret all run with the real secrets, taken from the live config.

The stored text is checked where it lands: the bytes of the SQLite file and its WAL,
and the rows of a real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from aiohttp import web
from pydantic import BaseModel, SecretStr

from metergate.config import ConfigError, parse_config
from metergate.config.model import GatewayConfig
from metergate.config.secrets import MARKER, redact, restore
from metergate.storage import config_versions
from metergate.storage.database import open_database
from tests.harness import BackgroundLoop, UpstreamServer
from tests.services import GatewayProcess, PostgresServer, create_key_sync
from tests.upstreams import openai_server

# The canaries: every one is a literal secret in the config file.
PROVIDER_KEY = openai_server.API_KEY  # the fake upstream accepts only this key
ADMIN_KEY = "admin-canary-7f3a9c0b5d2e4f61"
HEADER_SECRET = "hdr-canary-1b2c3d4e5f60718293"
HOOK_TOKEN = "hook-canary-a1b2c3d4e5f6a7b8c9"
PROXY_PASSWORD = "proxy-canary-0f9e8d7c6b5a4938"
COLLECTOR_TOKEN = "otel-canary-5a6b7c8d9e0f1a2b3c"
CANARIES = (PROVIDER_KEY, ADMIN_KEY, HEADER_SECRET, HOOK_TOKEN, PROXY_PASSWORD, COLLECTOR_TOKEN)
ASK = [{"role": "user", "content": "secrets"}]


def config_text(
    upstream: str, ledger: str, price: int, admin_key: str = ADMIN_KEY, spool: str = ""
) -> str:
    """A config as an operator writes it, literal secrets, comments and all."""
    spool_line = f"\n  spool_directory: {spool}" if spool else ""
    return f"""# gateway config with literal secrets (not ${{VAR}}s)
ledger:
  url: {ledger}{spool_line}
providers:
  up:
    type: openai
    base_url: {upstream}/v1
    api_key: {PROVIDER_KEY}   # pasted from the provider's dashboard
    headers: {{X-Api-Key: "{HEADER_SECRET}", X-Title: metergate-tests}}
  sim:
    type: simulated
    proxy: http://ops:{PROXY_PASSWORD}@127.0.0.1:9
upstreams:
  up-1: {{provider: up, model: gpt-x, price: {{input: 0, output: {price}}}}}
models:
  m: {{upstreams: [up-1]}}
budgets:
  watch:
    limit_usd: 1000000
    hard: false
    webhook_url: https://hooks.example.invalid/services/T0/B0/{HOOK_TOKEN}
admin:
  api_key: {admin_key}
tracing:  # kept for the day it is turned on
  enabled: false
  headers: {{x-honeycomb-team: {COLLECTOR_TOKEN}}}
"""


def cost(base_url: str, key: str) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=ASK)
    return raw.headers["x-metergate-cost-usd"]


def wait_for_cost(base_url: str, key: str, expected: str, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    seen = None
    while time.monotonic() < deadline:
        seen = cost(base_url, key)
        if seen == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"cost stayed {seen}, expected {expected}")


def metergate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "metergate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def reload(base_url: str, key: str = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{base_url}/admin/reload", headers=headers, timeout=30)


def assert_no_canary(data: bytes, where: str) -> None:
    for canary in CANARIES:
        assert canary.encode() not in data, f"{canary} stored in {where}"


def stored_bytes(ledger_file: Path) -> dict[str, bytes]:
    """The SQLite database file and its WAL (and shared-memory index), as on disk."""
    found = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{ledger_file}{suffix}")
        if path.exists():
            found[path.name] = path.read_bytes()
    assert f"{ledger_file.name}-wal" in found  # WAL mode: rows land in the WAL first
    return found


@pytest.fixture
def upstream(bg: BackgroundLoop):  # type: ignore[no-untyped-def]
    app, _ = openai_server.create_app()
    server = UpstreamServer(bg, app)
    yield server.url
    server.close()


# --- SQLite, with the gateway as a real process ------------------------------------------


def test_sqlite_history_holds_no_literal_secret_and_rollback_restores_them(upstream, tmp_path):
    ledger_file = tmp_path / "ledger.db"
    ledger = f"sqlite:///{ledger_file}"
    path = tmp_path / "gateway.yaml"
    original = config_text(upstream, ledger, 1_000_000)
    path.write_text(original)
    key = create_key_sync(ledger, "ops")
    gateway = GatewayProcess(path, tmp_path)
    try:
        gateway.wait_ready()
        assert cost(gateway.base_url, key) == "7.000000000"  # the upstream took the key
        path.write_text(config_text(upstream, ledger, 2_000_000))
        os.kill(gateway.pid, signal.SIGHUP)
        wait_for_cost(gateway.base_url, key, "14.000000000")

        back = metergate("config", "rollback", "-c", str(path), cwd=tmp_path)
        assert back.returncode == 0, back.stderr
        assert "rolled back to v1" in back.stdout
        assert path.read_text() == original  # written back with its secrets, as written
        wait_for_cost(gateway.base_url, key, "7.000000000")  # applied, secrets and all
        assert "cannot be applied" not in gateway.log()

        for name, data in stored_bytes(ledger_file).items():
            assert_no_canary(data, name)
        history = metergate("config", "history", "-c", str(path), cwd=tmp_path)
        assert "rollback to v1" in history.stdout and "SIGHUP" in history.stdout
    finally:
        gateway.kill_all()
    for name, data in stored_bytes(ledger_file).items():  # and after the last checkpoint
        assert_no_canary(data, name)
    versions = asyncio.run(_history(ledger))
    assert [v.note for v in versions] == ["rollback to v1", "SIGHUP", "started"]
    for version in versions:  # the rest of the text is kept as written
        assert "# pasted from the provider's dashboard" in version.body
        assert f"api_key: {MARKER}" not in version.body  # quoted: a valid YAML scalar
        assert f'api_key: "{MARKER}"' in version.body
        assert "X-Title: metergate-tests" in version.body
        assert f"http://ops:{MARKER}@127.0.0.1:9" in version.body
    assert versions[0].hash == versions[2].hash  # the same version, recorded again


async def _history(ledger: str) -> list[config_versions.ConfigVersion]:
    database = await open_database(ledger)
    try:
        return await config_versions.history(database)
    finally:
        await database.close()


def test_a_process_following_a_reload_restores_its_own_secrets(bg, tmp_path):
    """Two gateways share a ledger, each with its own config file (as replicas on two
    machines would): B refuses a version whose literal secret its config lacks, and
    applies one it can complete, with the secrets of its own file."""
    app, state = openai_server.create_app()
    server = UpstreamServer(bg, app)
    ledger_file = tmp_path / "ledger.db"
    ledger = f"sqlite:///{ledger_file}"
    key = create_key_sync(ledger, "ops")
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "gateway.yaml")
    b_secret = "hdr-canary-b-99887766554433"
    b_text = config_text(server.url, ledger, 1_000_000).replace(HEADER_SECRET, b_secret)
    paths[0].write_text(config_text(server.url, ledger, 1_000_000))
    paths[1].write_text(b_text)
    a, b = (GatewayProcess(p, p.parent) for p in paths)
    try:
        a.wait_ready()
        b.wait_ready()
        extra = "  other:\n    type: anthropic\n    api_key: sk-only-in-a-0123456789\n"
        text = config_text(server.url, ledger, 5_000_000)
        paths[0].write_text(text.replace("upstreams:\n", extra + "upstreams:\n", 1))
        assert reload(a.base_url).status_code == 200
        wait_for_cost(a.base_url, key, "35.000000000")
        deadline = time.monotonic() + 10
        while "providers.other.api_key" not in b.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot be applied here" in b.log(), b.log()
        assert "providers.other.api_key: this version's literal secret is not kept" in b.log()
        assert cost(b.base_url, key) == "7.000000000"  # B keeps serving what it had

        paths[0].write_text(config_text(server.url, ledger, 3_000_000))
        assert reload(a.base_url).json()["applied"] is True
        wait_for_cost(b.base_url, key, "21.000000000")  # B's upstream took B's key
        assert state.headers[-1]["X-Api-Key"] == b_secret  # B's own header secret
        assert paths[1].read_text() == b_text  # B's file is B's
    finally:
        a.kill_all()
        b.kill_all()
        server.close()
    for name, data in stored_bytes(ledger_file).items():
        assert_no_canary(data, name)
        assert b"sk-only-in-a-0123456789" not in data and b_secret.encode() not in data


def test_a_rotated_literal_secret_is_applied_on_reload(gateway_factory, upstream):
    """Only the admin key changes: the stored (redacted) text is the same version, yet
    the reload applies the new key."""
    config = yaml.safe_load(config_text(upstream, "sqlite:///unused", 1))
    del config["ledger"]  # the factory puts it in the test's directory
    gateway = gateway_factory(config)
    path = Path(gateway.runtime.source)
    ledger = f"sqlite:///{path.parent / 'ledger.db'}"
    spool = gateway.runtime.plan.config.ledger.spool_directory  # the factory's, kept
    path.write_text(config_text(upstream, ledger, 1, spool=spool))
    base = gateway.base_url.removesuffix("/v1")
    assert reload(base).status_code == 200
    version = gateway.runtime.plan.version
    rotated = "admin-canary-rotated-0a1b2c3d4e"
    path.write_text(config_text(upstream, ledger, 1, admin_key=rotated, spool=spool))
    answer = reload(base)
    assert answer.status_code == 200
    assert answer.json() == {"applied": True, "version": version, "restart_required": []}
    assert reload(base).status_code == 401  # the old key is refused now
    assert reload(base, rotated).json()["applied"] is False


# --- PostgreSQL --------------------------------------------------------------------------


def test_postgresql_history_holds_no_literal_secret(
    gateway_factory, upstream, postgres_server: PostgresServer, fresh_postgres_url: str
):
    asyncio.run(legacy_row(fresh_postgres_url, config_text(upstream, fresh_postgres_url, 7)))
    gateway = gateway_factory(yaml.safe_load(config_text(upstream, fresh_postgres_url, 1)))
    path = Path(gateway.runtime.source)
    path.write_text(config_text(upstream, fresh_postgres_url, 2))
    assert reload(gateway.base_url.removesuffix("/v1")).status_code == 200
    database = fresh_postgres_url.rsplit("/", 1)[1]
    rows = postgres_server.psql(database, "SELECT hash, source, body, note FROM config_versions")
    assert rows.count(MARKER) == 3 * 6  # the legacy row and two versions, 6 secrets each
    assert_no_canary(rows.encode(), "config_versions")
    assert "output: 2" in rows  # the rest of the text is kept


# --- versions stored before secrets were redacted ----------------------------------------


async def legacy_row(ledger: str, text: str) -> None:
    """A version as gateways stored them before redaction: verbatim."""
    database = await open_database(ledger)
    try:
        await database.execute(
            "INSERT INTO config_versions (hash, source, body, applied_at, note) "
            "VALUES (?, ?, ?, ?, ?)",
            ("0123456789ab", "/etc/metergate/gateway.yaml", text, time.time() - 3600, "started"),
        )
    finally:
        await database.close()


def test_versions_stored_verbatim_before_are_redacted_at_start(upstream, tmp_path):
    ledger_file = tmp_path / "ledger.db"
    ledger = f"sqlite:///{ledger_file}"
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(upstream, ledger, 1))
    old = config_text(upstream, ledger, 7)
    asyncio.run(legacy_row(ledger, old))
    gateway = GatewayProcess(path, tmp_path)
    try:
        gateway.wait_ready()
        versions = asyncio.run(_history(ledger))
    finally:
        gateway.kill_all()
    assert [v.note for v in versions] == ["started", "started"]
    assert versions[1].body == redact(old) and versions[1].hash == config_versions.text_hash(old)
    assert_no_canary("".join(v.body for v in versions).encode(), "config_versions")
    for name, data in stored_bytes(ledger_file).items():
        assert_no_canary(data, name)


# --- redaction itself --------------------------------------------------------------------


def test_a_default_in_either_form_is_a_literal_secret():
    text = (
        "providers:\n"
        "  a: {type: openai, api_key: '${A_KEY-}'}\n"
        "  b: {type: openai, api_key: '${B_KEY-sk-default-secret}'}\n"
    )
    redacted = redact(text)
    assert "${A_KEY-}" in redacted and "sk-default-secret" not in redacted


def test_redaction_takes_out_literal_secrets_only():
    text = """ledger: {url: "postgresql://mg:pg-secret@db:5432/mg?sslmode=require&password=pw-2"}
redis: {url: "redis://:${REDIS_PASSWORD}@redis:6379/0"}
providers:
  a: {type: openai, api_key: "${OPENAI_API_KEY}", headers: {Authorization: "Bearer ${TOKEN}"}}
  b: {type: openai, api_key: "${B_KEY:-sk-default-secret}", base_url: "https://h/v1?key=k-3"}
  c: {type: anthropic, api_key: &shared sk-shared}
  d: {type: anthropic, api_key: *shared, headers: {anthropic-beta: tools, Cookie: "s=1"}}
  apim:
    type: azure
    headers: {Ocp-Apim-Subscription-Key: apim-1, X-Access-Key: acc-2, AccessKey: acc-3,
              X-Keyspace: tenant-7}
  e: {type: simulated, api_key: null}
admin:
  api_key: |
    block-secret
mcp:
  servers:
    files: {command: files-mcp, env: {GITHUB_PAT: ghp-secret, LOG_LEVEL: debug}}
tracing:
  endpoint: https://otel:trace-pw@collector:4318/v1/traces?token=trace-tok
  headers: {x-honeycomb-team: hc-secret, authorization: "Bearer ${OTEL_TOKEN}"}
"""
    redacted = redact(text)
    for secret in ("pg-secret", "pw-2", "sk-default-secret", "k-3", "sk-shared", "s=1",
                   "block-secret", "ghp-secret", "debug", "trace-pw", "trace-tok",
                   "hc-secret", "apim-1", "acc-2", "acc-3"):  # fmt: skip
        assert secret not in redacted, secret
    kept = (
        "${REDIS_PASSWORD}",
        "${OPENAI_API_KEY}",
        "Bearer ${TOKEN}",
        "files-mcp",
        "anthropic-beta: tools",
        "X-Keyspace: tenant-7",  # not a credential: a change to it is a new version
        "sslmode=require",
        "postgresql://mg:",
        "api_key: null",
        "Bearer ${OTEL_TOKEN}",
        "https://otel:",
    )
    for kept_text in kept:
        assert kept_text in redacted, kept_text
    assert redact(redacted) == redacted
    assert yaml.safe_load(restore(redacted, text)) == yaml.safe_load(text)
    plain = "providers:\n  a: {type: openai, api_key: '${K}'}  # only references\n"
    assert redact(plain) == plain


def _secret_paths(model: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of the config schema whose value is a SecretStr (`x`: any name)."""
    for name, field in model.model_fields.items():
        yield from _secret_paths_of(field.annotation, (*path, field.alias or name))


def _secret_paths_of(annotation: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    if annotation is SecretStr:
        yield path
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from _secret_paths(annotation, path)
    elif typing.get_origin(annotation) is dict:
        yield from _secret_paths_of(typing.get_args(annotation)[1], (*path, "x"))
    else:  # X | None, list[X], Literal[...]: look inside
        for inner in typing.get_args(annotation):
            yield from _secret_paths_of(inner, path)


def test_every_secret_field_of_the_schema_is_redacted():
    """A secret the schema declares (SecretStr) but the redaction list misses would be
    kept verbatim in every config version: Azure client secrets and AWS secret keys
    were. Each such field, written literally, is taken out."""
    paths = sorted(set(_secret_paths(GatewayConfig)))
    assert ("providers", "x", "bedrock", "secret_access_key") in paths
    config: dict[str, Any] = {}
    for number, path in enumerate(paths):
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = f"canary-{number:03d}-literal"
    text = yaml.safe_dump(config)
    redacted = redact(text)
    kept = [path for number, path in enumerate(paths) if f"canary-{number:03d}" in redacted]
    assert kept == []
    assert yaml.safe_load(restore(redacted, text)) == config  # and a rollback gets them back


def test_a_redacted_version_never_runs_with_its_placeholders():
    redacted = redact("providers:\n  a: {type: openai, api_key: sk-live-0123}\n")
    with pytest.raises(ConfigError, match="METERGATE_REDACTED is not set"):
        parse_config(redacted)
    with pytest.raises(ConfigError) as raised:
        restore(redacted, "providers:\n  b: {type: openai, api_key: sk-other}\n", name="v3")
    assert "v3:2: providers.a.api_key: this version's literal secret is not kept" in str(
        raised.value
    )
    # a secret now taken from the environment restores as that reference
    restored = restore(redacted, "providers:\n  a: {type: openai, api_key: '${A_KEY}'}\n")
    assert yaml.safe_load(restored)["providers"]["a"]["api_key"] == "${A_KEY}"


def test_a_config_file_broken_since_gives_no_secrets_and_the_running_config_does(
    tmp_path: Path,
) -> None:
    """A process following a recorded version while its file holds a half-saved edit:
    the secrets come from the config it runs, instead of a YAML error at every try."""
    running = "providers:\n  a: {type: openai, api_key: sk-live-0123}\n"
    version = config_versions.ConfigVersion(
        id=2, hash="", source="gateway.yaml", body=redact(running), applied_at=0, note=""
    )
    live = tmp_path / "gateway.yaml"
    live.write_text("providers: {a: {type: openai, api_key: sk-live")
    restored = config_versions.with_secrets(version, str(live), running)
    assert yaml.safe_load(restored)["providers"]["a"]["api_key"] == "sk-live-0123"


def test_secret_urls_stay_out_of_the_log(bg: BackgroundLoop, tmp_path: Path) -> None:
    """A webhook URL is a secret (Slack's carry their token in the path): the gateway's
    log, where the HTTP client would write every request's URL, does not show it."""
    hooks: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(request.path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/services/{token:.*}", hook)
    receiver = UpstreamServer(bg, app)
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"""
ledger: {{url: "{ledger}"}}
providers: {{sim: {{type: simulated}}}}
upstreams: {{sim-up: {{provider: sim, model: s, price: {{input: 1000000, output: 1000000}}}}}}
models: {{m: {{upstreams: [sim-up]}}}}
budgets:
  watch:
    limit_usd: 1000
    hard: false
    alert_at_percent: [1]
    webhook_url: {receiver.url}/services/T0/B0/{HOOK_TOKEN}
"""
    )
    key = create_key_sync(ledger, "ops")
    gateway = GatewayProcess(path, tmp_path)
    try:
        gateway.wait_ready()
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0)
        client.chat.completions.create(model="m", messages=ASK)  # ~$30 of $1000: over 1 %
        deadline = time.monotonic() + 10
        while not hooks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hooks == [f"/services/T0/B0/{HOOK_TOKEN}"]
    finally:
        gateway.kill_all()
        receiver.close()
    assert HOOK_TOKEN not in gateway.log()
    assert "budget" in gateway.log()  # the log is there, and speaks of the alert
