"""The deployment files (Dockerfile, deploy/compose, deploy/kubernetes), checked offline by
the tools that will load them, and against the gateway itself.

No container engine or cluster runs here, so: docker-compose (1.29, Debian) parses and
validates the compose file; kubernetes-validate checks every manifest against the
Kubernetes schemas it bundles; `nginx -t` checks the load balancer's config; promtool
checks the Prometheus configs; the example gateway configs go through
`metergate.config.parse_config` and through `metergate serve`'s own start-up checks with
the exact command each deployment runs. Then the cross-references an operator relies on:
the replicas nginx balances are the replicas Prometheus scrapes, the pods the scrape
config discovers are the pods the Deployment makes, every `${VAR}` a config needs is
provided, and no secret is written in a file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from metergate.cli import app as cli_app
from metergate.cli import serve as serve_module
from metergate.config import GatewayConfig, parse_config
from tests.harness import simulated_config, write_config
from tests.services import GatewayProcess, ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_GATEWAY = COMPOSE_DIR / "gateway.yaml"
NGINX_CONF = COMPOSE_DIR / "nginx.conf"
KUBE_DIR = DEPLOY / "kubernetes"
KUBE_SCRAPE = KUBE_DIR / "prometheus" / "scrape-config.yml"
PROMETHEUS = DEPLOY / "prometheus"
GATEWAY_PORT = 4000
# Kubernetes versions the manifests must validate against: an old supported one, the newest.
KUBE_VERSIONS = ("1.29.0", "latest")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ADMIN_KEY|AUTH", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}$")


def tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/bin/{name}", f"/usr/sbin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip(f"{name} is not installed (scripts/test installs it)")


def run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env, check=False
    )


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def variables(text: str) -> dict[str, bool]:
    """`${VAR}` references in the values of YAML `text` (not its comments): name -> whether
    it is required (has no default)."""
    found: dict[str, bool] = {}
    for document in yaml.safe_load_all(text):
        for value in strings(document):
            for name, operator, _ in _VAR.findall(value):
                required = operator not in (":-", "-")
                found[name] = found.get(name, False) or required
    return found


def with_defaults(value: str) -> str:
    """`value` as compose would interpolate it with only the defaults set."""
    return _VAR.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else "dummy", value)


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage (continuations joined, comments dropped); stage 0 holds
    the ARGs before the first FROM."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).partition(" ")
        pending = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return stages


def final_stage() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for instruction, arguments in dockerfile_stages()[-1]:
        found.setdefault(instruction, []).append(arguments)
    return found


def dockerfile_cmd() -> list[str]:
    (cmd,) = final_stage()["CMD"]
    command = json.loads(cmd)  # exec form: signals reach metergate, not a shell
    assert isinstance(command, list)
    return command


def test_dockerfile_builds_from_python_311_slim_and_installs_the_package() -> None:
    stages = dockerfile_stages()
    args = dict(a.split("=", 1) for i, a in stages[0] if i == "ARG" and "=" in a)
    bases = [
        _VAR.sub(lambda m: args.get(m.group(1), "?"), arguments.split()[0])
        for stage in stages[1:]
        for instruction, arguments in stage
        if instruction == "FROM"
    ]
    assert bases and all(base == "python:3.11-slim" for base in bases), bases
    runs = [a for stage in stages[1:] for i, a in stage if i == "RUN"]
    assert any(re.search(r"pip install \S*/src\b|pip install \.", run) for run in runs), runs
    copied = [a for stage in stages[1:] for i, a in stage if i == "COPY"]
    assert any("pyproject.toml" in c for c in copied) and any(c.startswith("src") for c in copied)


def test_dockerfile_runs_as_non_root_with_health_check_port_and_command() -> None:
    stage = final_stage()
    user = stage["USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), f"the image runs as {user!r}"
    assert re.search(rf"--uid {user.split(':')[0]}\b", " ".join(stage["RUN"])), (
        "USER is the uid the Dockerfile creates"
    )
    assert stage["EXPOSE"] == [str(GATEWAY_PORT)]
    (healthcheck,) = stage["HEALTHCHECK"]
    assert " CMD " in f" {healthcheck} " and f"127.0.0.1:{GATEWAY_PORT}/healthz" in healthcheck
    assert dockerfile_cmd() == [
        "metergate", "serve", "--config", "/etc/metergate/gateway.yaml",
        "--host", "0.0.0.0", "--workers", "2",
    ]  # fmt: skip


def test_dockerignore_keeps_what_the_build_needs_and_nothing_else() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded first, then the build inputs let in"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert readme is not None
    assert {"pyproject.toml", readme.group(1), "src"} <= allowed
    assert not any(name in allowed for name in (".venv", ".metergate", "deploy", "tests"))


# --- the example gateway configs -------------------------------------------------------------


def kube_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBE_DIR.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def kube_object(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        d
        for _, d in kube_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found


def kube_gateway_text() -> str:
    return kube_object("ConfigMap", "metergate-config")["data"]["gateway.yaml"]


GATEWAY_CONFIGS = {
    "compose": lambda: COMPOSE_GATEWAY.read_text(),
    "kubernetes": kube_gateway_text,
}


def load_example(text: str, name: str, monkeypatch: pytest.MonkeyPatch) -> GatewayConfig:
    """Parse an example config with every variable it requires set (a URL where one is
    due: the loader checks their form), and those with a default at it."""
    for variable, required in variables(text).items():
        if not required:
            monkeypatch.delenv(variable, raising=False)
            continue
        dummy = f"dummy{variable.lower().replace('_', '')}"
        if variable.endswith("_URL"):
            dummy = f"https://{dummy}.example/hook"
        monkeypatch.setenv(variable, dummy)
    return parse_config(text, name)


@pytest.mark.parametrize("where", sorted(GATEWAY_CONFIGS))
def test_example_gateway_config_loads_and_is_a_fleet_config(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs the fleets mount pass the gateway's own loader: a schema change that
    breaks them fails here, not at an operator's `docker compose up`."""
    config = load_example(GATEWAY_CONFIGS[where](), where, monkeypatch)
    assert config.ledger.url.startswith("postgresql://"), "a fleet shares one PostgreSQL"
    assert config.redis is not None and config.redis.url.startswith("redis"), (
        "a fleet shares budgets, rate limits and the cache through one Redis"
    )
    assert config.admin.api_key is not None, "config reload across the fleet needs the admin API"
    assert (config.server.host, config.server.port) == ("0.0.0.0", GATEWAY_PORT)


@pytest.mark.parametrize("where", sorted(GATEWAY_CONFIGS))
def test_example_gateway_config_holds_no_secret(where: str) -> None:
    raw = yaml.safe_load(GATEWAY_CONFIGS[where]())
    for url in (raw["ledger"]["url"], raw["redis"]["url"]):
        password = urlsplit(url).password
        assert password is None or _PLACEHOLDER.match(password), f"{where}: password in {url}"
    for name, provider in raw["providers"].items():
        key = provider.get("api_key")
        assert key is None or _PLACEHOLDER.match(key), f"{where}: providers.{name}.api_key"
    assert _PLACEHOLDER.match(raw["admin"]["api_key"])


def serve_accepts(
    command: list[str], config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Run `metergate serve` with a deployment's exact arguments up to the point where it
    would start uvicorn; return what it would have started uvicorn with."""
    assert command[:2] == ["metergate", "serve"], command
    args = list(command[2:])
    args[args.index("--config") + 1] = str(config_path)
    started: dict[str, Any] = {}

    def no_keys(config: GatewayConfig, make_demo: bool) -> tuple[None, int]:
        return None, 1  # the ledger database is not reachable from here

    def fake_one(loaded: object, options: dict[str, Any], announce: Any) -> None:
        started.update(options, workers=1)

    def fake_workers(loaded: object, workers: int, options: dict[str, Any], announce: Any) -> None:
        started.update(options, workers=workers)

    monkeypatch.setattr(serve_module, "_check_ledger", no_keys)
    monkeypatch.setattr(serve_module, "run_one", fake_one)
    monkeypatch.setattr(serve_module, "run_workers", fake_workers)
    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert result.exit_code == 0, result.output
    assert started, "serve did not get as far as starting the server"
    return started


def compose_metergate_command() -> list[str]:
    service = compose_metergate_services()[0][1]
    return [with_defaults(str(part)) for part in service["command"]]


def kube_metergate_command() -> list[str]:
    (container,) = kube_pod_spec()["containers"]
    return list(container["command"])


@pytest.mark.parametrize("where", ["compose", "kubernetes", "image"])
def test_serve_starts_the_example_config_with_the_deployments_command(
    where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`serve` checks some things only at start (the config with its options), and its
    options may change: each deployment's command with its config gets past them."""
    text = kube_gateway_text() if where == "kubernetes" else COMPOSE_GATEWAY.read_text()
    load_example(text, where, monkeypatch)  # sets the variables
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    command = {
        "compose": compose_metergate_command,
        "kubernetes": kube_metergate_command,
        "image": dockerfile_cmd,
    }[where]()
    options = serve_accepts(command, path, monkeypatch)
    assert options.get("workers") == int(command[command.index("--workers") + 1])
    assert (options["host"], options["port"]) == ("0.0.0.0", GATEWAY_PORT)


# --- Docker Compose --------------------------------------------------------------------------


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # merge keys (<<) resolved


def compose_metergate_services() -> list[tuple[str, dict[str, Any]]]:
    services = compose_raw()["services"]
    return sorted((n, s) for n, s in services.items() if n.startswith("metergate-"))


def compose_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """A clean environment: nothing of this machine's (DOCKER_HOST, COMPOSE_*) leaks in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **values}


def required_compose_variables() -> set[str]:
    return {name for name, required in variables(COMPOSE_FILE.read_text()).items() if required}


def test_compose_file_passes_docker_compose_config(tmp_path: Path) -> None:
    compose = tool("docker-compose")
    required = required_compose_variables()
    assert {"OPENAI_API_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"} <= required
    env = compose_env(tmp_path, **{name: f"dummy-{name.lower()}" for name in required})
    done = run([compose, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=COMPOSE_DIR, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    done = run([compose, "-f", str(COMPOSE_FILE), "config"], cwd=COMPOSE_DIR, env=env)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    gateway_env = resolved["services"]["metergate-1"]["environment"]
    assert gateway_env["OPENAI_API_KEY"] == "dummy-openai_api_key"


def test_compose_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    compose = tool("docker-compose")
    done = run(
        [compose, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=COMPOSE_DIR,
        env=compose_env(tmp_path),
    )
    assert done.returncode != 0
    assert any(name in done.stderr for name in required_compose_variables()), done.stderr


def test_compose_env_example_lists_every_variable() -> None:
    example = (COMPOSE_DIR / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    assert set(variables(COMPOSE_FILE.read_text())) <= listed
    assert not re.search(r"^[A-Z_]+=\S*[ \t]+#", example, re.M), (
        "compose 1.29 keeps inline comments"
    )
    for name in required_compose_variables():
        assert re.search(rf"^{name}=$", example, re.M), f"{name} must be left empty to fill in"


def stop_within(text: str, monkeypatch: pytest.MonkeyPatch) -> float:
    """How long a replica of this config may take to stop: the grace for requests in
    flight, then the ledger's last commit; a worker still running is killed then
    (`serve`'s supervisor)."""
    config = load_example(text, "example", monkeypatch)
    return config.server.shutdown_grace_seconds + 2 * config.ledger.timeout_seconds + 5


def test_compose_fleet_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical gateway replicas with 2 workers each, ready on /readyz, started after
    PostgreSQL and Redis are healthy, behind nginx which waits for them."""
    raw = compose_raw()
    services = raw["services"]
    replicas = compose_metergate_services()
    assert len(replicas) >= 2
    first = replicas[0][1]
    assert all(service == first for _, service in replicas), "replicas differ"
    command = compose_metergate_command()
    assert command[command.index("--workers") + 1] == "2"
    assert "/readyz" in " ".join(first["healthcheck"]["test"])
    assert first["read_only"] is True and "/tmp" in first["tmpfs"]
    spool = yaml.safe_load(COMPOSE_GATEWAY.read_text())["ledger"]["spool_directory"]
    assert any(  # the read-only root leaves only volumes to keep refused ledger rows on
        volume.split(":")[1] == spool and volume.split(":")[0] in raw["volumes"]
        for volume in first["volumes"]
    ), "the ledger spool is a named volume, outliving the container"
    grace = int(first["stop_grace_period"].rstrip("s"))
    assert grace > stop_within(COMPOSE_GATEWAY.read_text(), monkeypatch), "killed mid-commit"
    assert first["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert services["nginx"]["depends_on"] == {
        name: {"condition": "service_healthy"} for name, _ in replicas
    }
    for name in ("nginx", "postgres", "redis", "prometheus", "alertmanager", "grafana"):
        assert name in services, name
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        for dependency in service.get("depends_on", {}).values():
            assert dependency["condition"] in ("service_healthy", "service_completed_successfully")


def test_compose_holds_no_secret_literal() -> None:
    for name, service in compose_raw()["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form"
        for variable, value in environment.items():
            if _SECRET_NAME.search(variable):
                assert _PLACEHOLDER.match(str(value)), f"{name}.{variable} is a literal"
    gateway_needs = {
        n for n, required in variables(COMPOSE_GATEWAY.read_text()).items() if required
    }
    for name, service in compose_metergate_services():
        missing = gateway_needs - set(service["environment"])
        assert not missing, f"{name} lacks variables gateway.yaml needs: {missing}"


def test_compose_mounts_exist() -> None:
    """Every file a service mounts is in the repository (the secrets/ files are the
    operator's); a renamed rules directory or dashboard folder breaks this, not the fleet."""
    raw = compose_raw()
    named = set(raw.get("volumes", {}))
    for name, service in raw["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name}: undeclared volume {source}"
        for secret in service.get("secrets", []):
            assert secret["source"] in raw["secrets"]
    for secret in raw["secrets"].values():
        assert (COMPOSE_DIR / secret["file"]).parent == COMPOSE_DIR / "secrets"
    assert (COMPOSE_DIR / "secrets" / "README.md").exists()
    ignored = (COMPOSE_DIR / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/*" in ignored


def test_alertmanager_secrets_mounted_where_its_config_reads_them() -> None:
    config = (DEPLOY / "alertmanager" / "alertmanager.yml").read_text()
    wanted = set(re.findall(r"_file:\s*(/etc/alertmanager/secrets/\S+)", config))
    mounted = {s["target"] for s in compose_raw()["services"]["alertmanager"]["secrets"]}
    assert wanted and wanted <= mounted, wanted - mounted


def test_compose_alertmanager_resolves_its_webhooks_hosts() -> None:
    """Each webhook host alertmanager.yml names is a compose service or is mapped in the
    Alertmanager container (`extra_hosts`), never its own loopback."""
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    hosts = {
        urlsplit(item["url"]).hostname
        for receiver in config["receivers"]
        for item in receiver.get("webhook_configs", [])
    }
    assert hosts
    service = compose_raw()["services"]["alertmanager"]
    mapped = {entry.split(":")[0] for entry in service.get("extra_hosts", [])}
    for host in hosts:
        assert host not in {"127.0.0.1", "localhost", "::1"}, f"{host} is Alertmanager itself"
        assert host in mapped or host in compose_raw()["services"], host


def test_compose_grafana_datasource_is_the_shipped_one_pointed_at_compose() -> None:
    shipped = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "metergate.yml").read_text()
    )
    compose = yaml.safe_load(
        (COMPOSE_DIR / "grafana" / "datasources" / "metergate.yml").read_text()
    )
    (source,) = compose["datasources"]
    assert source.pop("url") == "http://prometheus:9090"
    for datasource in shipped["datasources"]:
        datasource.pop("url")
    assert compose["datasources"] == shipped["datasources"]


def nginx_upstreams() -> list[str]:
    text = NGINX_CONF.read_text()
    block = re.search(r"upstream metergate \{(.*?)\}", text, re.S)
    assert block is not None
    return re.findall(r"^\s*server\s+(\S+?)[\s;]", block.group(1), re.M)


def compose_scrape_targets() -> list[str]:
    groups = yaml.safe_load((COMPOSE_DIR / "prometheus" / "targets" / "metergate.yml").read_text())
    return [target for group in groups for target in group["targets"]]


def test_load_balancer_and_prometheus_see_every_replica() -> None:
    replicas = {f"{name}:{GATEWAY_PORT}" for name, _ in compose_metergate_services()}
    assert set(nginx_upstreams()) == replicas
    assert sorted(compose_scrape_targets()) == sorted(replicas), "scrape each replica once"


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx")
    text = NGINX_CONF.read_text()
    for upstream in nginx_upstreams():  # compose names do not resolve here
        text = text.replace(f"server {upstream}", f"server 127.0.0.1:{GATEWAY_PORT}")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    (tmp_path / "nginx.conf").write_text(text)
    done = run(
        [nginx, "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    for directive in ("proxy_buffering off", "proxy_http_version 1.1", "proxy_read_timeout"):
        assert directive in text, f"streams need {directive}"


def shipped_nginx(workdir: Path, replica: str) -> ServerProcess:
    """deploy/compose/nginx.conf as shipped but for its addresses (a loopback port, one
    replica) and the paths it writes to, in front of `replica`."""
    workdir.mkdir()
    text = NGINX_CONF.read_text()
    text = re.sub(r"(\n\s*server [^;\n]+:4000 [^;]*;)+", f"\n        server {replica};", text)
    text = text.replace("pid /tmp/nginx.pid;", f"pid {workdir}/nginx.pid;")
    temp = "".join(
        f"\n    {kind}_temp_path {workdir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {", "http {" + temp, 1)

    def command(port: int) -> list[str]:
        (workdir / "nginx.conf").write_text(
            text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        )
        conf = str(workdir / "nginx.conf")
        return [tool("nginx"), "-p", f"{workdir}/", "-c", conf, "-e", "stderr", "-g", "daemon off;"]

    return ServerProcess("nginx", workdir, command, "/nginx-healthz").start()


def test_the_shipped_nginx_hides_metrics_and_names_each_client(tmp_path: Path) -> None:
    """Through deploy/compose/nginx.conf in front of a real gateway: its metrics (key
    names, spend) are not served at either path the gateway has them at, and with nginx
    trusted (`server.trusted_proxies`, as the compose config sets it) the admin sign-in
    limit counts each client, so one guessing locks out nobody else, however it forges
    its X-Forwarded-For."""
    admin_key = "deploy-admin-key-0123456789abcdef"
    config = simulated_config()
    config["server"] = {"trusted_proxies": ["127.0.0.1"]}
    config["admin"] = {"api_key": admin_key}
    gateway = GatewayProcess(write_config(config, tmp_path / "gw"), tmp_path / "gw")
    nginx: ServerProcess | None = None

    def sign_in(client: str, key: str, forged: str | None = None) -> int:
        headers = {"authorization": f"Bearer {key}"}
        if forged is not None:
            headers["x-forwarded-for"] = forged
        transport = httpx.HTTPTransport(local_address=client)
        with httpx.Client(transport=transport, timeout=10) as http:
            assert nginx is not None
            return http.get(f"{nginx.url}/admin/api/keys", headers=headers).status_code

    try:
        gateway.wait_ready()
        nginx = shipped_nginx(tmp_path / "nginx", gateway.base_url.removeprefix("http://"))
        for path in ("/metrics", "/v1/metrics", "/v1/metrics/", "/v1//metrics", "/%6Detrics"):
            hidden = httpx.get(f"{nginx.url}{path}", timeout=10)
            assert hidden.status_code == 404, (path, hidden.text)
            assert hidden.json()["error"]["code"] == "unknown_endpoint"
        for path in ("/metrics", "/v1/metrics"):  # what it hides is there
            assert httpx.get(f"{gateway.base_url}{path}", timeout=10).status_code == 200
        assert [sign_in("127.0.0.2", "wrong-key") for _ in range(6)][-1] == 429
        assert sign_in("127.0.0.2", admin_key, forged="127.0.0.9") == 429
        assert sign_in("127.0.0.3", admin_key) == 200
    finally:
        if nginx is not None:
            nginx.stop()
        gateway.kill_all()


def test_compose_gateways_trust_nginx_alone() -> None:
    """nginx has a fixed address in the compose network, and the gateways' config lists
    that address, from the same variable, as its one trusted proxy."""
    raw = compose_raw()
    placed = raw["services"]["nginx"]["networks"]["default"]["ipv4_address"]
    subnet = with_defaults(raw["networks"]["default"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(with_defaults(placed)) in ipaddress.ip_network(subnet)
    (trusted,) = yaml.safe_load(COMPOSE_GATEWAY.read_text())["server"]["trusted_proxies"]
    assert trusted == placed
    for _, service in compose_metergate_services():
        assert service["environment"]["METERGATE_LB_ADDRESS"].split()[0] == placed


def prometheus_dir(tmp_path: Path, targets: Path) -> Path:
    """deploy/prometheus as Prometheus sees it in a deployment: its config and rules, with
    the deployment's targets directory."""
    root = tmp_path / "prometheus"
    root.mkdir()
    shutil.copy(PROMETHEUS / "prometheus.yml", root / "prometheus.yml")
    shutil.copytree(PROMETHEUS / "rules", root / "rules")
    shutil.copytree(PROMETHEUS / "secrets", root / "secrets")  # mounted there in deployments
    shutil.copytree(targets, root / "targets")
    return root


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    root = prometheus_dir(tmp_path, COMPOSE_DIR / "prometheus" / "targets")
    config = yaml.safe_load((root / "prometheus.yml").read_text())
    file_sd = {
        name
        for job in config["scrape_configs"]
        for sd in job.get("file_sd_configs", [])
        for name in sd["files"]
    } | {
        name
        for manager in config["alerting"]["alertmanagers"]
        for sd in manager.get("file_sd_configs", [])
        for name in sd["files"]
    }
    for name in file_sd:
        assert (root / name).exists(), f"the compose targets lack {name}"
    done = run([promtool, "check", "config", "prometheus.yml"], cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


# --- Kubernetes ------------------------------------------------------------------------------


def kube_pod_spec() -> dict[str, Any]:
    return kube_object("Deployment", "metergate")["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_kubernetes_manifest_passes_schema_validation(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    documents = list(kube_documents())
    kinds = {document["kind"] for _, document in documents}
    assert {
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service",
        "PodDisruptionBudget", "HorizontalPodAutoscaler",
    } <= kinds  # fmt: skip
    for path, document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.relative_to(ROOT)}: {document['kind']}: {error.message}")


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((KUBE_DIR / "kustomization.yaml").read_text())
    manifests = {p.name for p in KUBE_DIR.glob("*.yaml") if p.name not in ("kustomization.yaml",)}
    assert set(kustomization["resources"]) == manifests - {"secret.template.yaml"}
    namespace = kube_object("Namespace")["metadata"]["name"]
    for path, document in kube_documents():
        if document["kind"] not in ("Namespace",) and path.parent == KUBE_DIR:
            assert document["metadata"]["namespace"] == namespace, path.name


def test_kubernetes_deployment_runs_the_image_safely(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = kube_object("Deployment", "metergate")
    assert deployment["spec"]["replicas"] == 2
    pod = kube_pod_spec()
    (container,) = pod["containers"]
    assert container["command"] == dockerfile_cmd()
    uid = final_stage()["USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp is writable on a read-only root"
    spool = yaml.safe_load(kube_gateway_text())["ledger"]["spool_directory"]
    spool_volume = volumes[mounts[spool]["name"]]
    assert "emptyDir" in spool_volume and "medium" not in spool_volume["emptyDir"], "on disk"
    config_mount = mounts["/etc/metergate"]
    assert "subPath" not in config_mount, "a subPath mount never sees ConfigMap updates"
    configmap = volumes[config_mount["name"]]["configMap"]["name"]
    assert "gateway.yaml" in kube_object("ConfigMap", configmap)["data"]
    http = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert http == GATEWAY_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    workers = int(container["command"][container["command"].index("--workers") + 1])
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert int(resources["limits"]["cpu"]) == workers, "one worker per CPU"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    needed = 5 + stop_within(kube_gateway_text(), monkeypatch)  # the grace counts preStop's
    assert pod["terminationGracePeriodSeconds"] > needed, "killed mid-commit"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(GATEWAY_PORT)


def test_kubernetes_secret_provides_what_the_config_needs() -> None:
    secret = kube_object("Secret")
    (container,) = kube_pod_spec()["containers"]
    (source,) = container["envFrom"]
    assert source["secretRef"]["name"] == secret["metadata"]["name"]
    for key, value in secret["stringData"].items():
        assert value == f"${{{key}}}", f"the Secret template holds a value for {key}"
    provided = set(secret["stringData"]) | {e["name"] for e in container.get("env", [])}
    needed = {name for name, required in variables(kube_gateway_text()).items() if required}
    assert needed <= provided, needed - provided


def test_kubernetes_service_pdb_and_hpa_select_the_deployment() -> None:
    deployment = kube_object("Deployment", "metergate")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = kube_object("Service", "metergate")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    pdb = kube_object("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = kube_object("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2


# Prometheus' Kubernetes discovery: the fields it accepts (prometheus.io docs,
# <kubernetes_sd_config>), checked here because Debian's promtool is built without it.
_KUBE_SD_KEYS = {
    "role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata",
    "basic_auth", "authorization", "oauth2", "proxy_url", "tls_config", "follow_redirects",
    "enable_http2", "no_proxy", "proxy_from_environment", "proxy_connect_header",
}  # fmt: skip
_KUBE_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


def kube_scrape_job() -> dict[str, Any]:
    (job,) = yaml.safe_load(KUBE_SCRAPE.read_text())["scrape_configs"]
    return job


def promtool_knows_kubernetes_sd(promtool: str, tmp_path: Path) -> bool:
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs: []\n")
    done = run([promtool, "check", "config", str(probe)])
    return "kubernetes_sd_configs not found" not in done.stdout + done.stderr


def test_kubernetes_scrape_config_passes_promtool(tmp_path: Path) -> None:
    """The scrape job, with deploy/prometheus's rules and alerting, through promtool. A
    promtool built without Kubernetes discovery (Debian's) checks the job with its
    discovery swapped for a static target: relabeling, paths and everything else are still
    checked, and the discovery block is checked field by field below."""
    promtool = tool("promtool")
    job = kube_scrape_job()
    assert job["job_name"] == "metergate", "the rules select job=metergate"
    if not promtool_knows_kubernetes_sd(promtool, tmp_path):
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": [f"10.0.0.1:{GATEWAY_PORT}"]}]
    root = prometheus_dir(tmp_path, COMPOSE_DIR / "prometheus" / "targets")
    config = yaml.safe_load((root / "prometheus.yml").read_text())
    config["scrape_configs"] = [job]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    done = run([promtool, "check", "config", "prometheus.yml"], cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_scrape_config_discovery_fields() -> None:
    namespace = kube_object("Namespace")["metadata"]["name"]
    labels = kube_object("Deployment", "metergate")["spec"]["template"]["metadata"]["labels"]
    (sd,) = kube_scrape_job()["kubernetes_sd_configs"]
    assert set(sd) <= _KUBE_SD_KEYS, set(sd) - _KUBE_SD_KEYS
    assert sd["role"] in _KUBE_SD_ROLES
    assert set(sd["namespaces"]) <= {"names", "own_namespace"}
    assert sd["namespaces"]["names"] == [namespace]
    for selector in sd.get("selectors", []):
        assert selector["role"] == sd["role"] and set(selector) <= {"role", "label", "field"}
        for term in selector.get("label", "").split(","):
            key, _, value = term.partition("=")
            assert labels.get(key) == value, f"selector {term} does not match the pods"


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabeling (the actions the scrape job uses): None when dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(
            labels.get(n, "") for n in rule.get("source_labels", [])
        )
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
        assert action in ("keep", "drop", "replace"), f"simulate {action} too"
    return labels


def discovered_targets(phase: str = "Running", annotated: bool = True) -> list[dict[str, str]]:
    """What the pod role would discover for one pod of the Deployment (one candidate
    target per container port), after the scrape job's relabeling."""
    deployment = kube_object("Deployment", "metergate")
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"] if annotated else {}

    def sanitize(name: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    meta = {
        "__meta_kubernetes_namespace": deployment["metadata"]["namespace"],
        "__meta_kubernetes_pod_name": "metergate-abc12",
        "__meta_kubernetes_pod_ip": "10.1.2.3",
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_node_name": "node-1",
        **{
            f"__meta_kubernetes_pod_label_{sanitize(k)}": v
            for k, v in template["metadata"]["labels"].items()
        },
        **{f"__meta_kubernetes_pod_annotation_{sanitize(k)}": v for k, v in annotations.items()},
        "__metrics_path__": kube_scrape_job().get("metrics_path", "/metrics"),
    }
    targets = []
    for container in template["spec"]["containers"]:
        for port in container["ports"]:
            candidate = {
                **meta,
                "__address__": f"10.1.2.3:{port['containerPort']}",
                "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
            }
            kept = relabel(candidate, kube_scrape_job()["relabel_configs"])
            if kept is not None:
                targets.append(kept)
    return targets


def test_kubernetes_scrape_config_discovers_each_gateway_pod_once() -> None:
    (target,) = discovered_targets()
    assert target["__address__"] == f"10.1.2.3:{GATEWAY_PORT}"
    assert target["__metrics_path__"] == "/metrics"
    assert target["pod"] == "metergate-abc12" and target["namespace"] == "metergate"
    assert discovered_targets(phase="Pending") == []
    assert discovered_targets(annotated=False) == []
