"""Config validation with located problems, and the CLI as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from metergate.cli import app as cli_app
from metergate.config import ConfigError, load_config, parse_config, read_config
from metergate.config.model import AdminConfig
from tests.harness import free_port

METERGATE = [sys.executable, "-m", "metergate"]

BROKEN = """\
providers:
  openai:
    type: openai
    api_key: ${METERGATE_TEST_UNSET_VAR}
  claude:
    type: anthropic
    base_url: api.anthropic.com
upstreams:
  gpt:
    provider: openia
    model: gpt-4.1
    pricee: {input: 1}
models:
  gpt-4.1:
    upstreams: [gpt, missing-one]
"""


def run(
    *args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*METERGATE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_every_problem_is_reported_with_its_location():
    with pytest.raises(ConfigError) as raised:
        parse_config(BROKEN, "gw.yaml")
    rendered = [problem.render() for problem in raised.value.problems]
    text = "\n".join(rendered)
    assert (
        "gw.yaml:4: providers.openai.api_key: environment variable "
        "METERGATE_TEST_UNSET_VAR is not set" in text
    )
    # `check` runs in the caller's shell, a reload in the gateway's own environment
    assert "a running gateway keeps the environment it started with" in text
    assert "gw.yaml:7: providers.claude.base_url" in text and "http://" in text
    assert "upstreams.gpt.pricee: unknown key" in text
    assert len(rendered) >= 3


def test_a_key_written_twice_is_a_problem_not_a_silent_replacement():
    """YAML keeps the last of two equal keys: a second `models:` pasted at the end would
    silently drop every model of the first. Each repeat is a problem with its lines."""
    valid = (
        "server:\n  port: 4000\n"
        "models:\n  a: {upstreams: [sim-up]}\n"
        "providers: {sim: {type: simulated}}\n"
        "upstreams: {sim-up: {provider: sim, model: m}}\n"
    )
    parse_config(valid, "gw.yaml")
    repeated = (
        valid.replace("4000\n", "4000\n  port: 4001\n") + "models:\n  b: {upstreams: [sim-up]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(repeated, "gw.yaml")
    rendered = "\n".join(problem.render() for problem in raised.value.problems)
    assert "gw.yaml:3: server.port: written twice in the same mapping (lines 2 and 3)" in rendered
    assert "gw.yaml:8: models: written twice in the same mapping (lines 4 and 8)" in rendered


def test_a_validators_message_is_shown_without_pydantics_prefix():
    text = "server: {metrics_token: short}\n" + SIMULATED
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    (problem,) = raised.value.problems
    assert problem.message.startswith("use at least 16 characters"), problem.message


def test_a_yaml_error_names_the_file_not_a_unicode_string():
    with pytest.raises(ConfigError) as raised:
        parse_config("server: {port: [4000}\n", "gw.yaml")
    rendered = raised.value.problems[0].render()
    assert rendered.startswith("gw.yaml:1: (top level): not valid YAML")
    assert 'in "gw.yaml", line 1, column 21' in rendered and "<unicode string>" not in rendered


def test_an_unset_variable_is_one_problem():
    text = "redis: {url: '${METERGATE_TEST_UNSET_VAR}'}\n" + SIMULATED
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    (problem,) = raised.value.problems
    assert problem.message == "environment variable METERGATE_TEST_UNSET_VAR is not set"


def test_problems_are_listed_in_file_order():
    """A repeated key (found while reading the YAML) at the end of the file and a wrong
    type (found while validating) at its top are listed as an editor shows them."""
    text = (
        "server: {port: not-a-port}\n"
        "providers: {sim: {type: simulated}}\n"
        "upstreams: {sim-up: {provider: sim, model: m}}\n"
        "models:\n  a: {upstreams: [sim-up]}\n  a: {upstreams: [sim-up]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    lines = [problem.line for problem in raised.value.problems]
    assert lines == [1, 6], raised.value


def test_cross_references_are_checked():
    text = (
        BROKEN.replace("${METERGATE_TEST_UNSET_VAR}", "sk-x")
        .replace("base_url: api.anthropic.com", "api_key: k")
        .replace("pricee", "price")
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    rendered = "\n".join(problem.render() for problem in raised.value.problems)
    assert "upstreams.gpt.provider: unknown provider 'openia'" in rendered
    assert "hint: declared providers: claude, openai" in rendered
    assert "models.gpt-4.1.upstreams[1]: unknown upstream 'missing-one'" in rendered
    assert "providers.openai.base_url: an openai-compatible provider needs base_url" in rendered


def one_upstream(base_url: str) -> str:
    """A config of one OpenAI-compatible provider at `base_url`, one upstream, one model."""
    return f"""providers:
  up: {{type: openai, base_url: "{base_url}", api_key: k}}
upstreams:
  u: {{provider: up, model: m, price: {{input: 1, output: 1}}}}
models:
  m: {{upstreams: [u]}}
"""


def refusal(text: str) -> str:
    """The problems a config file `gw.yaml` holding `text` is refused with."""
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    return "\n".join(problem.render() for problem in raised.value.problems)


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("http://user:URLPASSWORD@127.0.0.1:9/v1", "must not carry user:password@"),
        ("http://127.0.0.1:9/v1?tenant=abc", "must not carry a query"),
        ("http://127.0.0.1:9/v1#part", "must not carry a query (?...) or fragment"),
    ],
)
def test_a_base_url_that_would_leak_or_misroute_is_refused(base_url, message):
    """A password in base_url travelled in the Host header and in callers' error
    messages; a query string ended up before the API path (/v1?x=1/chat/completions)."""
    rendered = refusal("\n" + one_upstream(base_url))
    assert "gw.yaml:3: providers.up.base_url" in rendered and message in rendered
    assert "URLPASSWORD" not in rendered


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_that_fails_exits_and_names_the_proxy_without_its_password(tmp_path, workers):
    """An environment proxy the gateway cannot use fails the start. The process exits
    (the ledger database it had opened no longer keeps it alive), saying why, and the
    proxy's password is not in what it says."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"ledger: {{url: 'sqlite:///{tmp_path / 'ledger.db'}'}}\n"
        + one_upstream("https://api.example.invalid/v1")
    )
    proxy = {"HTTPS_PROXY": "https://ops:pw-canary@proxy.invalid:3128"}
    serve = ["serve", "-c", str(config), "--port", str(free_port()), "--workers", str(workers)]
    result = run(*serve, cwd=tmp_path, env=proxy, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "proxy 'https://ops:***@proxy.invalid:3128': only http:// proxies" in output
    assert "pw-canary" not in output


def test_check_warns_of_an_environment_proxy_the_gateway_cannot_use(tmp_path):
    config = tmp_path / "gw.yaml"
    config.write_text(one_upstream("https://api.example.invalid/v1"))
    proxy = {"HTTPS_PROXY": "https://ops:pw-canary@proxy.invalid:3128"}
    result = run("check", str(config), cwd=tmp_path, env=proxy)
    assert result.returncode == 0, result.stderr  # a warning: the gateway may run elsewhere
    said = " ".join(result.stderr.split())
    assert "the environment's HTTPS_PROXY cannot be used here: proxy 'https://ops:***@" in said
    assert "pw-canary" not in result.stdout + result.stderr
    config.write_text(config.read_text().replace("api_key: k}", "api_key: k, proxy: direct}"))
    assert "HTTPS_PROXY" not in run("check", str(config), cwd=tmp_path, env=proxy).stderr


@pytest.mark.parametrize("url", ["hooks.slack.com/services/T0KEN", "https:///services/T0KEN"])
def test_a_webhook_url_that_cannot_be_posted_to_is_refused_when_the_config_loads(url):
    """Found out otherwise only by the first alert, which it would then lose."""
    rendered = refusal(
        one_upstream("http://127.0.0.1:9/v1")
        + f"""budgets:
  monthly: {{limit_usd: 10, webhook_url: "{url}"}}
rollouts:
  move: {{model: m, baseline: [u], candidate: [u], webhook_url: "{url}"}}
"""
    )
    assert "budgets.monthly.webhook_url" in rendered
    assert "rollouts.move.webhook_url" in rendered
    assert "must be an http:// or https:// URL with a host" in rendered
    assert "T0KEN" not in rendered  # a webhook URL is a secret


def test_an_empty_webhook_url_means_none() -> None:
    """What `webhook_url: ${SLACK_WEBHOOK_URL}` gives with the variable set empty."""
    config = parse_config(
        one_upstream("http://127.0.0.1:9/v1")
        + 'budgets:\n  monthly: {limit_usd: 10, webhook_url: ""}\n',
        "gw.yaml",
    )
    assert not config.budgets["monthly"].webhook_url


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("short-key", "at least 16 characters"),
        ("  padded-admin-key-0123  ", "without spaces"),
        ("clé-admin-0123456789abcdef", "printable ASCII"),
        ("mgk_0123456789abcdef0123", "prefix of caller keys"),
    ],
)
def test_an_admin_key_that_is_weak_or_unusable_is_refused(key, message):
    """A one-letter admin key was accepted, and keys with spaces or non-ASCII letters
    loaded but could never sign in: a reload could lock the operator out."""
    with pytest.raises(ConfigError) as raised:
        parse_config(f'admin: {{api_key: "{key}"}}\n', "gw.yaml")
    rendered = "\n".join(problem.render() for problem in raised.value.problems)
    assert "admin.api_key" in rendered and message in rendered and key.strip() not in rendered


def test_an_empty_admin_key_leaves_the_admin_api_off():
    assert AdminConfig(api_key="").api_key is None  # as with METERGATE_ADMIN_KEY= set empty


def test_env_substitution_with_default(monkeypatch):
    monkeypatch.setenv("METERGATE_TEST_KEY", "sk-from-env")
    config = parse_config(
        "providers:\n  p: {type: openai, base_url: '${METERGATE_TEST_URL:-http://h/v1}',"
        " api_key: '${METERGATE_TEST_KEY}'}\n"
        "upstreams: {u: {provider: p, model: m}}\nmodels: {m: {upstreams: [u]}}\n"
    )
    assert config.providers["p"].api_key.get_secret_value() == "sk-from-env"
    assert config.providers["p"].base_url == "http://h/v1"


def test_env_default_forms_follow_the_shell(monkeypatch):
    """`:-` takes the default for an unset or empty variable (`PORT=` in a .env file), `-`
    only for an unset one, as the shell and docker compose do with the same variables."""
    monkeypatch.setenv("METERGATE_TEST_EMPTY", "")
    monkeypatch.delenv("METERGATE_TEST_UNSET", raising=False)
    base = "upstreams: {u: {provider: p, model: m}}\nmodels: {m: {upstreams: [u]}}\n"

    def server(port: str, host: str) -> tuple[int, str]:
        config = parse_config(
            f"server: {{port: '{port}', host: '{host}'}}\n"
            f"providers: {{p: {{type: simulated}}}}\n{base}"
        )
        return config.server.port, config.server.host

    assert server("${METERGATE_TEST_EMPTY:-4100}", "${METERGATE_TEST_EMPTY:-h}") == (4100, "h")
    assert server("${METERGATE_TEST_UNSET:-4100}", "${METERGATE_TEST_UNSET-h}") == (4100, "h")
    assert server("${METERGATE_TEST_UNSET-4100}", "${METERGATE_TEST_EMPTY-h}") == (4100, "")
    with pytest.raises(ConfigError, match=r"server\.port: Input should be a valid integer"):
        server("${METERGATE_TEST_EMPTY-4100}", "h")


def test_embedded_default_is_valid():
    config = load_config(None)
    assert {p.type for p in config.providers.values()} == {"simulated"}
    assert config.ledger.url.startswith("sqlite")


def test_check_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    result = run("check", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "upstreams.gpt.provider: unknown provider 'openia'" not in result.stderr  # schema first
    assert f"{bad}:12: upstreams.gpt.pricee: unknown key" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text((Path(__file__).parents[1] / "src/metergate/config/default.yaml").read_text())
    ok = run("check", str(good), cwd=tmp_path)
    assert ok.returncode == 0 and "ok" in ok.stdout
    # `-c FILE`, as every other command takes the config
    assert run("check", "-c", str(bad), cwd=tmp_path).returncode == 2
    ok = run("check", "-c", str(good), cwd=tmp_path)
    assert ok.returncode == 0 and f"ok {good}:" in ok.stdout


def test_check_warns_of_what_is_valid_yet_likely_wrong(tmp_path):
    """An api_key whose variable is set to nothing and an MCP command this machine cannot
    find are warnings (the check passes: the gateway may run elsewhere), not silence."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        """
providers:
  openai: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key: "${METERGATE_TEST_EMPTY_KEY}"}
upstreams: {gpt: {provider: openai, model: gpt-4.1}}
models: {gpt: {upstreams: [gpt]}}
mcp:
  servers:
    files: {command: no-such-mcp-server-here}
    shell: {command: sh}
"""
    )
    result = run("check", str(config), cwd=tmp_path, env={"METERGATE_TEST_EMPTY_KEY": ""})
    assert result.returncode == 0, result.stderr
    assert "providers.openai.api_key: api_key is empty" in result.stderr
    assert "mcp.servers.files.command: command 'no-such-mcp-server-here' is not found" in (
        result.stderr
    )
    assert "mcp.servers.shell" not in result.stderr


def test_check_warns_of_a_rollout_baseline_the_model_does_not_serve(tmp_path):
    """Until `rollout start` the model's own upstreams serve it, then the baseline does:
    a baseline other than those upstreams is a switch no gate judges. A baseline that
    is the model's upstreams is quiet."""
    config = tmp_path / "gateway.yaml"
    body = """
providers: {sim: {type: simulated}}
upstreams:
  old: {provider: sim, model: a}
  other: {provider: sim, model: b}
  new: {provider: sim, model: c}
models: {gpt: {upstreams: [%s]}}
rollouts:
  move: {model: gpt, baseline: [old], candidate: [new]}
"""
    for upstreams in ("other, new", "new", "old, other"):
        config.write_text(body % upstreams)
        result = run("check", str(config), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (
            f"rollouts.move.baseline: model 'gpt' is served by {upstreams} until the rollout "
            "starts, then by its baseline old: starting it moves the model's traffic ungated"
        ) in " ".join(result.stderr.split()), result.stderr
    config.write_text(body % "old")
    result = run("check", str(config), cwd=tmp_path)
    assert result.returncode == 0 and "rollouts.move" not in result.stderr, result.stderr


def test_serve_refuses_an_invalid_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    result = run("serve", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "problem(s)" in result.stderr and "unknown key" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_named_and_no_banner_says_listening(tmp_path, workers):
    """Another process holds the port: serve ends with a message naming the address and
    the setting to change, and never printed that it was listening there."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = str(holder.getsockname()[1])
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"ledger: {{url: 'sqlite:///{tmp_path / 'ledger.db'}'}}\n"
        "providers: {sim: {type: simulated}}\n"
        "upstreams: {sim-up: {provider: sim, model: m}}\n"
        "models: {sim: {upstreams: [sim-up]}}\n"
    )
    try:
        result = run("serve", "-c", str(config), "--port", port, "--workers", workers, cwd=tmp_path)
    finally:
        holder.close()
    said = result.stdout + result.stderr
    assert result.returncode != 0, said
    assert f"cannot listen on 127.0.0.1:{port}" in said and "server.port" in said, said
    assert "listening on" not in said, said


def test_a_config_that_is_not_utf8_is_a_config_problem(tmp_path):
    """A file saved as Latin-1 is reported like any invalid config, not as a traceback."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# gateway\nserver:\n  host: café\n".encode("latin-1"))
    expected = f"{latin}:3: (top level): not valid UTF-8: byte 0xe9 at line 3, column 12"
    with pytest.raises(ConfigError) as raised:
        read_config(latin)
    assert raised.value.problems[0].render().startswith(expected)
    for command in (["check", str(latin)], ["serve", "-c", str(latin)]):
        result = run(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_port_it_cannot_listen_on(tmp_path):
    """70000 would wrap to 4464 while the banner said 70000; 0 would listen anywhere."""
    missing = str(tmp_path / "missing.yaml")  # never serves, even if the port passed
    for port in ("70000", "0", "-1"):
        result = CliRunner().invoke(cli_app, ["serve", "--port", port, "-c", missing])
        assert result.exit_code == 2 and "'--port'" in result.output, result.output
    config = tmp_path / "gw.yaml"
    config.write_text("server: {port: 0}\n")
    with pytest.raises(ConfigError, match=r"server\.port: Input should be greater than or equal"):
        read_config(config)


def test_keys_cli_create_list_revoke(tmp_path):
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"ledger: {{url: 'sqlite:///{tmp_path}/l.db'}}\n"
        "providers: {s: {type: simulated}}\n"
        "upstreams: {u: {provider: s, model: m}}\n"
        "models: {m: {upstreams: [u]}, n: {upstreams: [u]}}\n"
    )
    created = run(
        "keys", "create", "--name", "search-mcp", "--models", "m", "-c", str(config), cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("mgk_") and len(secret) == 47
    assert secret not in (tmp_path / "l.db").read_bytes().decode("latin-1")
    again = run("keys", "create", "--name", "search-mcp", "-c", str(config), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    listed = run("keys", "list", "-c", str(config), cwd=tmp_path)
    assert "search-mcp" in listed.stdout and secret[-4:] in listed.stdout
    assert secret not in listed.stdout
    revoked = run("keys", "revoke", "search-mcp", "-c", str(config), cwd=tmp_path)
    assert revoked.returncode == 0
    for command in (["keys", "revoke", "nobody"], ["keys", "update", "nobody", "--rpm", "5"]):
        unknown = run(*command, "-c", str(config), cwd=tmp_path)  # a name given wrong: 2,
        assert unknown.returncode == 2, unknown.stderr  # as an unknown model or team is
        assert "no active key named or with id 'nobody'" in unknown.stderr
    assert "revoked" in run("keys", "list", "-c", str(config), cwd=tmp_path).stdout
    unknown_model = run(
        "keys", "create", "--name", "x", "--models", "zzz", "-c", str(config), cwd=tmp_path
    )
    assert unknown_model.returncode == 2 and "unknown model" in unknown_model.stderr


def one_model_config(tmp_path: Path) -> Path:
    """A config of one simulated model `m` with its ledger in `tmp_path`."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"ledger: {{url: 'sqlite:///{tmp_path}/l.db'}}\n"
        "providers: {s: {type: simulated}}\n"
        "upstreams: {u: {provider: s, model: m}}\n"
        "models: {m: {upstreams: [u]}}\n"
    )
    return config


def test_keys_list_finds_keys_and_stops_at_a_limit(tmp_path):
    """With a key per end user the list must not print them all: it stops at --limit
    (1000) and says how many there are; --search, --team and --state find the others."""
    config = one_model_config(tmp_path)
    cli = CliRunner()

    def keys(*args: str) -> str:
        result = cli.invoke(cli_app, ["keys", *args, "-c", str(config)])
        assert result.exit_code == 0, result.output
        return result.output

    team = cli.invoke(cli_app, ["teams", "create", "crowd", "-c", str(config)])
    assert team.exit_code == 0, team.output
    for n in range(6):
        keys("create", "--name", f"user-{n}", *(["--team", "crowd"] if n < 2 else []))
    keys("revoke", "user-5")
    listed = keys("list", "--limit", "3")
    assert [f"user-{n}" in listed for n in range(6)] == [True] * 3 + [False] * 3
    assert "3 of 6 keys; --search, --team or --limit" in listed
    found = keys("list", "--search", "USER-3")
    assert "user-3" in found and "user-4" not in found and " of " not in found
    in_team = keys("list", "--team", "crowd")
    assert "user-0" in in_team and "user-1" in in_team and "user-2" not in in_team
    revoked = keys("list", "--state", "revoked")
    assert "user-5" in revoked and "user-0" not in revoked
    wrong = cli.invoke(cli_app, ["keys", "list", "--state", "gone", "-c", str(config)])
    assert wrong.exit_code == 2 and "--state" in wrong.output


def test_the_banner_hint_names_the_config_served(tmp_path):
    """Without -c, `keys create` would write to ./.metergate, which this gateway never reads."""
    config = tmp_path / "my gw.yaml"
    config.write_text(
        f"ledger: {{url: 'sqlite:///{tmp_path}/l.db'}}\n"
        "providers: {s: {type: simulated}}\n"
        "upstreams: {u: {provider: s, model: m}}\n"
        "models: {m: {upstreams: [u]}}\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [*METERGATE, "serve", "-c", str(config), "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        line = ""
        while process.stdout and "create a key first" not in line and process.poll() is None:
            line = process.stdout.readline()
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert f"metergate keys create --name my-service -c '{config}'" in line


def test_a_command_run_away_from_the_gateway_makes_no_second_ledger(tmp_path):
    """The embedded default's ledger is relative to where a command runs: run in another
    directory, `keys create` would put a key into a new ledger no gateway reads. It says
    where it looked instead, and creates nothing; so for an absolute path in a directory
    that does not exist (a typo, another host's path)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (["keys", "create", "--name", "svc"], ["keys", "list"], ["usage"]):
        refused = run(*command, cwd=elsewhere)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"no ledger at {elsewhere}/.metergate/metergate.db" in refused.stderr
        assert "run this command where the gateway runs" in refused.stderr
    assert list(elsewhere.iterdir()) == []
    typo = elsewhere / "typo-dir" / "ledger.db"
    config = tmp_path / "gw.yaml"
    config.write_text(f"ledger: {{url: 'sqlite:///{typo}'}}\n" + SIMULATED)
    for command in (["keys", "create", "--name", "svc"], ["keys", "list"], ["usage"]):
        refused = run(*command, "-c", str(config), cwd=elsewhere)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        said = " ".join(refused.stderr.split())
        assert f"no ledger at {typo}: its directory does not exist" in said, said
        assert "mgk_" not in refused.stdout
    assert list(elsewhere.iterdir()) == []


SIMULATED = (
    "providers: {s: {type: simulated}}\n"
    "upstreams: {u: {provider: s, model: m}}\n"
    "models: {m: {upstreams: [u]}}\n"
)


def test_words_and_numbers_yaml_reads_as_something_else_are_named_as_written():
    """YAML 1.1 reads an unquoted `on:` as the key true and `model: 3.5` as a number: the
    problem names the key as written, on its own line, and says to quote it (validation
    alone said `models[1].[key]` at the line of `models:`)."""
    text = (
        "providers: {s: {type: simulated}}\n"
        "upstreams:\n"
        "  u: {provider: s, model: m}\n"
        "  v: {provider: s, model: 3.5}\n"
        "models:\n"
        "  m: {upstreams: [u]}\n"
        "  on: {upstreams: [u]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    rendered = [problem.render() for problem in raised.value.problems]
    assert rendered == [
        "gw.yaml:4: upstreams.v.model: Input should be a valid string\n"
        '    hint: YAML reads 3.5 unquoted as a number: quote it ("3.5")',
        "gw.yaml:7: models.on: YAML reads the key on as a boolean, not as a name\n"
        '    hint: quote it: "on": (YAML reads on, off, yes, no, true and false unquoted as '
        "booleans)",
    ]


def test_a_value_from_the_environment_that_is_wrong_names_its_variable(monkeypatch):
    """The file shows `${MG_PORT:-4000}`, not the `abc` that failed: the problem says where
    the value came from, and what it was unless the field holds a secret."""
    monkeypatch.setenv("MG_TEST_PORT", "abc")
    monkeypatch.setenv("MG_TEST_ADMIN", "short-secret")
    monkeypatch.delenv("MG_TEST_CACHE", raising=False)
    text = (
        "server: {port: '${MG_TEST_PORT:-4000}'}\n"
        "cache: {enabled: '${MG_TEST_CACHE:-maybe}'}\n"
        "admin: {api_key: '${MG_TEST_ADMIN}'}\n"
        "providers: {s: {type: simulated}}\n"
        "upstreams: {u: {provider: s, model: m}}\n"
        "models: {m: {upstreams: [u]}}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    said = {problem.path: problem.message for problem in raised.value.problems}
    assert said[("server", "port")].endswith("(from MG_TEST_PORT='abc')")
    assert said[("cache", "enabled")].endswith("(from MG_TEST_CACHE unset: the default 'maybe')")
    assert said[("admin", "api_key")].endswith("(from MG_TEST_ADMIN)")
    assert "short-secret" not in str(raised.value.problems)


def test_ledger_commands_need_no_provider_secret_in_the_shell(tmp_path):
    """The provider keys and webhooks a config reads from `${VAR}` live in the gateway's
    environment (a systemd EnvironmentFile, a secret store), not in an operator's shell:
    the commands that work on the ledger alone run without them; `check` and `serve`,
    which need them, still say which is not set, and so does every command for one in
    `ledger:`."""
    config = tmp_path / "gw.yaml"
    body = (
        "providers:\n"
        "  oa:\n"
        "    type: openai\n"
        "    base_url: https://api.openai.com/v1\n"
        "    api_key: '${MG_TEST_UNSET_KEY}'\n"
        "    headers: {X-Key: '${MG_TEST_UNSET_H}'}\n"
        "upstreams: {u: {provider: oa, model: gpt-4.1}}\n"
        "models: {m: {upstreams: [u]}}\n"
        "budgets: {b: {limit_usd: 5, webhook_url: '${MG_TEST_UNSET_HOOK}'}}\n"
    )
    config.write_text(f"ledger: {{url: 'sqlite:///{tmp_path}/l.db'}}\n" + body)
    for command in (
        ["keys", "create", "--name", "svc"],
        ["keys", "list"],
        ["teams", "list"],
        ["usage"],
        ["config", "history"],
    ):
        result = run(*command, "-c", str(config), cwd=tmp_path)
        assert result.returncode == 0, (command, result.stdout + result.stderr)
    checked = run("check", str(config), cwd=tmp_path)
    assert checked.returncode == 2
    for variable in ("MG_TEST_UNSET_KEY", "MG_TEST_UNSET_H", "MG_TEST_UNSET_HOOK"):
        assert f"environment variable {variable} is not set" in checked.stderr
    config.write_text(f"ledger: {{url: 'sqlite:///{tmp_path}/${{MG_TEST_UNSET_DB}}.db'}}\n" + body)
    refused = run("keys", "list", "-c", str(config), cwd=tmp_path)
    assert refused.returncode == 2
    assert "ledger.url: environment variable MG_TEST_UNSET_DB is not set" in refused.stderr
    assert "MG_TEST_UNSET_KEY" not in refused.stderr


def test_a_ledger_that_cannot_be_opened_is_named_without_its_password(tmp_path):
    """`serve` and the commands that read the ledger say which database they could not
    open and exit 1: no traceback, and the URL's password never printed."""
    port = free_port()  # nothing listens there
    url = f"postgresql://metergate:pw-canary-5e6f7a@127.0.0.1:{port}/ledger"
    config = tmp_path / "gw.yaml"
    config.write_text(f"ledger: {{url: '{url}'}}\n" + SIMULATED)
    named = f"cannot open the ledger database postgresql://metergate:***@127.0.0.1:{port}/ledger"
    for command in (["keys", "list"], ["usage"], ["serve", "--port", str(free_port())]):
        result = run(*command, "-c", str(config), cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert named + ": ConnectionRefusedError" in " ".join(result.stderr.split()), output
        assert "Traceback" not in output and "pw-canary" not in output


@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_the_serve_banner_hides_the_ledger_password(tmp_path, fresh_postgres_url, where):
    """The database trusts loopback, so any password opens it: the banner shows none,
    whether the URL carries it before the host or as libpq's `?password=`."""
    if where == "userinfo":
        url = fresh_postgres_url.replace("postgres@", "postgres:pw-canary-0a9b8c@")
        shown = "ledger: postgresql://postgres:***@127.0.0.1:"
    else:
        url = f"{fresh_postgres_url}?password=pw-canary-0a9b8c"
        shown = "?password=***"
    config = tmp_path / "gw.yaml"
    config.write_text(f"ledger: {{url: '{url}'}}\n" + SIMULATED)
    process = subprocess.Popen(
        [*METERGATE, "serve", "-c", str(config), "--port", str(free_port())],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    lines = []
    try:
        while process.stdout and "metrics:" not in "".join(lines) and process.poll() is None:
            lines.append(process.stdout.readline())
    finally:
        process.terminate()
        process.communicate(timeout=30)
    banner = "".join(lines)
    assert shown in banner, banner
    assert "pw-canary" not in banner


def test_tables_are_not_cut_when_stdout_is_no_terminal(tmp_path):
    """Piped (or `kubectl exec` without -t), a table is as wide as its content: a key's id
    can be copied for `revoke`, a cost read whole."""
    config = one_model_config(tmp_path)
    name = "a-rather-long-service-name-for-a-table"
    created = run("keys", "create", "--name", name, "-c", str(config), cwd=tmp_path)
    key_id = created.stdout.split("(")[1].split(")")[0]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "80"}
    for command, expected in (("keys", "list"), [name, key_id]), (("usage",), ["$0.000000"]):
        shown = subprocess.run(
            [*METERGATE, *command, "-c", str(config)], capture_output=True, text=True, env=env
        )
        assert shown.returncode == 0, shown.stderr
        assert all(text in shown.stdout for text in expected), shown.stdout
        assert "…" not in shown.stdout.replace("mgk_…", "")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--name", "", "--name must be 1-64 characters"),
        ("--name", "bad name/with slash", "--name must be 1-64 characters"),
        ("--name", "two\nlines", "--name must be 1-64 characters"),
        ("--name", "x" * 5000, "--name must be 1-64 characters"),
        ("--max-tokens-cap", "0", "--max-tokens-cap must be an integer from 1 to 2147483647"),
        ("--max-tokens-cap", "99999999999", "--max-tokens-cap must be an integer from 1"),
    ],
)
def test_keys_create_applies_the_admin_api_rules(tmp_path, option, value, message):
    """What the admin API refuses (a name that is no metric label, a cap PostgreSQL cannot
    store) the CLI refuses too, before it opens anything."""
    args = ["keys", "create", "--name", "ok", option, value, "-c", str(tmp_path / "none.yaml")]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2
    assert message in result.output and "cannot read file" not in result.output


def test_default_serve_prints_a_working_demo_key(tmp_path):
    """The README's first command: no config, no keys, simulated models."""
    port = free_port()
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen(
        [*METERGATE, "serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        key = (tmp_path / ".metergate" / "demo-key").read_text().strip()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="demo-small", messages=[{"role": "user", "content": "Hello"}]
        )
        assert reply.choices[0].message.content
        assert reply.usage.total_tokens > 0
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit here
    assert process.returncode in (0, -15)
    assert "ledger flushed: 1 rows committed since the process started" in output
    assert key in output and f"http://127.0.0.1:{port}/v1" in output
    assert "from openai import OpenAI" in output and "curl" in output
    # where the ledger is: a sqlite:/// URL is relative to the directory served from
    assert f"(file {(tmp_path / '.metergate' / 'metergate.db').resolve()})" in output
