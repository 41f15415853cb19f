"""Provider settings checked before anything is sent (`metergate check`), optional
extras, shipped price lists, and the small parts the cloud adapters stand on: the
credential cache and the AWS event-stream framing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer

from metergate.config import ConfigError, parse_config
from metergate.config.model import Price
from metergate.metering.pricing import price_for, price_list_sources, shipped_price_lists
from metergate.providers.tokens import Refreshing
from tests.upstreams.eventstream import event, exception

MODELS = "models: {m: {upstreams: [u]}}\n"


def problems(providers: str, upstream: str = "{provider: p, model: m}") -> str:
    text = f"providers:\n{providers}\nupstreams: {{u: {upstream}}}\n{MODELS}"
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "gw.yaml")
    return "\n".join(problem.render() for problem in raised.value.problems)


@pytest.mark.parametrize(
    ("providers", "expected"),
    [
        ("  p: {type: bedrock}", "providers.p.bedrock.region: a bedrock provider needs a region"),
        (
            "  p: {type: bedrock, api_key: k, bedrock: {region: r, access_key_id: a,"
            " secret_access_key: s}}",
            "providers.p.api_key: api_key (a Bedrock API key) and AWS credentials are both set",
        ),
        (
            "  p: {type: bedrock, bedrock: {region: r, access_key_id: a}}",
            "access_key_id and secret_access_key go together",
        ),
        (
            "  p: {type: bedrock, bedrock: {region: r, profile: x, access_key_id: a,"
            " secret_access_key: s}}",
            "both a profile and explicit access keys are set",
        ),
        (
            "  p: {type: azure, api_key: k, azure: {deployments: {x: y}}}",
            "providers.p.base_url: an azure provider needs base_url",
        ),
        (
            "  p: {type: azure, base_url: 'https://r.openai.azure.com', api_key: k,"
            " azure: {deployments: {m: d}, tenant_id: t, client_id: c, client_secret: s}}",
            "both api_key and Entra credentials are set",
        ),
        (
            "  p: {type: azure, base_url: 'https://r.openai.azure.com',"
            " azure: {deployments: {m: d}, tenant_id: t}}",
            "Entra client credentials are incomplete: client_id, client_secret missing",
        ),
        (
            "  p: {type: azure, base_url: 'https://r.openai.azure.com',"
            " azure: {deployments: {m: d}}}",
            "an azure provider needs api_key or Entra credentials",
        ),
        (
            "  p: {type: azure, base_url: 'https://r.openai.azure.com', api_key: k,"
            " azure: {deployments: {other: d}}}",
            "upstreams.u.model: no Azure deployment for model 'm'",
        ),
        ("  p: {type: vertex, vertex: {location: global}}", "vertex.project: a vertex provider"),
        ("  p: {type: vertex, vertex: {project: x}}", "vertex.location: a vertex provider needs"),
        (
            "  p: {type: vertex, api_key: k, vertex: {project: x, location: global}}",
            "authenticates with Google credentials, not api_key",
        ),
        (
            "  p: {type: vertex, vertex: {project: x, location: global,"
            " credentials_file: /nonexistent/key.json}}",
            "no such file: /nonexistent/key.json",
        ),
        ("  p: {type: openai, preset: groq}", "providers.p.api_key: the groq preset needs api_key"),
        ("  p: {type: anthropic, api_key: k, preset: groq}", "presets are for type openai"),
        (
            "  p: {type: openai, base_url: 'http://h/v1', bedrock: {region: r}}",
            "bedrock settings apply to type bedrock, not openai",
        ),
    ],
)
def test_provider_settings_are_checked(providers: str, expected: str) -> None:
    assert expected in problems(providers)


def test_problems_carry_hints_and_lines() -> None:
    rendered = problems("  p: {type: bedrock}")
    assert "gw.yaml:2: providers.p.bedrock.region" in rendered
    assert "hint: bedrock: {region: us-east-1}" in rendered


def metergate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )


def test_check_warns_about_unpriced_models(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "providers:\n"
        "  ds: {type: openai, preset: deepseek, api_key: sk-x}\n"
        "  br: {type: bedrock, bedrock: {region: us-east-1}}\n"
        "  pplx: {type: openai, preset: perplexity, api_key: pplx-x}\n"
        "upstreams:\n"
        "  known: {provider: ds, model: deepseek-chat}\n"
        "  profile: {provider: br, model: eu.anthropic.claude-sonnet-4-5-20250929-v1:0}\n"
        "  unknown: {provider: ds, model: deepseek-v9}\n"
        "  sonar: {provider: pplx, model: perplexity/sonar}\n"
        "  research: {provider: pplx, model: 'preset:deep-research'}\n"
        "models: {m: {upstreams: [known, profile, unknown, sonar, research]}}\n"
    )
    done = metergate("from metergate.cli import main; main()", "check", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {config}: upstreams.unknown.model: no price for model 'deepseek-v9' in "
        "price list 'deepseek': its requests will be metered at $0",
        # Perplexity states each answer's cost: only holds and estimates lack a price.
        f"warning: {config}: upstreams.research.model: no price for model "
        "'preset:deep-research' in price list 'perplexity': each answer states its cost, "
        "which is what it is metered at, but budget holds and the estimates of cut streams "
        "will be $0",
    ]


def test_a_missing_extra_names_the_pip_command(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "providers: {br: {type: bedrock, bedrock: {region: us-east-1}}}\n"
        "upstreams: {u: {provider: br, model: amazon.nova-lite-v1:0}}\n" + MODELS
    )
    blocked = "import sys; sys.modules['botocore'] = None\nfrom metergate.cli import main; main()"
    done = metergate(blocked, "check", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert "provider type bedrock needs optional dependencies not installed" in done.stderr
    assert "pip install 'metergate[bedrock]'" in done.stderr


def test_price_lists_carry_source_and_date() -> None:
    lists = shipped_price_lists()
    sources = price_list_sources()
    for name in (
        "bedrock",
        "vertex",
        "deepseek",
        "mistral",
        "groq",
        "openrouter",
        "together",
        "fireworks",
        "xai",
        "perplexity",
    ):
        assert lists[name], name
        assert sources[name].startswith("https://") and " as of 20" in sources[name]


def test_price_lookups() -> None:
    profile = price_for("us.anthropic.claude-sonnet-4-5-20250929-v1:0", None, "bedrock")
    assert profile == lists_entry("bedrock", "anthropic.claude-sonnet-4-5-20250929-v1:0")
    assert price_for("global.amazon.nova-lite-v1:0", None, "bedrock") is not None
    assert price_for("anything", None, "free") == Price()
    assert price_for("nope.unknown-model", None, "bedrock") is None
    explicit = Price(input=1)
    assert price_for("us.anthropic.claude-haiku-4-5-20251001-v1:0", explicit, "bedrock") == explicit


def lists_entry(name: str, model: str) -> Price:
    return shipped_price_lists()[name][model]


async def test_credentials_are_fetched_once_for_concurrent_requests() -> None:
    calls = 0
    release = asyncio.Event()

    async def fetch() -> tuple[str, float | None]:
        nonlocal calls
        calls += 1
        await release.wait()
        return f"token-{calls}", 3600.0

    cache: Refreshing[str] = Refreshing(fetch, "a test token")
    waiting = [asyncio.ensure_future(cache.get()) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    assert set(await asyncio.gather(*waiting)) == {"token-1"}
    assert await cache.get() == "token-1" and calls == 1


async def test_credentials_refresh_behind_the_request_and_failures_are_shared() -> None:
    results: list[tuple[str, float | None] | Exception] = [("first", 0.4), ("second", 3600.0)]

    async def fetch() -> tuple[str, float | None]:
        outcome = results.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    cache: Refreshing[str] = Refreshing(fetch, "a test token")
    assert await cache.get() == "first"
    await asyncio.sleep(0.25)  # past the refresh point (half its life), before expiry
    assert await cache.get() == "first"  # still valid: served while the refresh runs
    for _ in range(100):
        if cache.fetches == 2 and await cache.get() == "second":
            break
        await asyncio.sleep(0.01)
    assert await cache.get() == "second"

    async def broken() -> tuple[str, float | None]:
        raise OSError("token endpoint down")

    failing: Refreshing[str] = Refreshing(broken, "a broken token")
    with pytest.raises(OSError):
        await failing.get()
    with pytest.raises(OSError):
        await failing.get()  # remembered for a moment: not fetched again at once
    assert failing.fetches == 1


def test_botocore_decodes_the_fakes_frames() -> None:
    frames = event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}})
    frames += exception("throttlingException", "slow down")
    buffer = EventStreamBuffer()
    buffer.add_data(frames[:10])  # a frame split anywhere waits for its rest
    assert list(buffer) == []
    buffer.add_data(frames[10:])
    decoded = list(buffer)
    assert [m.headers[":message-type"] for m in decoded] == ["event", "exception"]
    assert decoded[0].headers[":event-type"] == "contentBlockDelta"
    assert decoded[0].payload == b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}'
    assert decoded[1].headers[":exception-type"] == "throttlingException"
    corrupt = bytearray(event("messageStop", {"stopReason": "end_turn"}))
    corrupt[-6] ^= 0xFF
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(corrupt))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


def test_readme_provider_examples_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's example has one provider of each new kind, and it passes the checks."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Providers", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    for variable in ("DEEPSEEK_API_KEY", "AZURE_OPENAI_API_KEY"):
        monkeypatch.setenv(variable, "placeholder-secret")
    config = parse_config(block, "README.md")
    kinds = {(p.type, p.preset) for p in config.providers.values()}
    assert kinds == {("openai", "deepseek"), ("azure", None), ("bedrock", None), ("vertex", None)}
    assert config.providers["bedrock"].price_list == "bedrock"
