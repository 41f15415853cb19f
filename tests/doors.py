"""A gateway with one model per kind of upstream, for the tests of the non-chat doors.

`sim` is the built-in simulated provider; `claude`, `gpt` and `gemini` are local servers
speaking Anthropic's, OpenAI's and Gemini's wire formats; `gpt-native` is the same OpenAI
server declared as serving the Responses and legacy completions APIs (`apis`), so those
doors pass through to it, while `gpt` gets their chat translation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from tests.harness import BackgroundLoop, Gateway, UpstreamServer
from tests.upstreams import RECORDER, Recorder, anthropic_server, gemini_server, openai_server

CONFIG = """
providers:
  sim: {{type: simulated, simulated: {{output_tokens: 5}}}}
  claude: {{type: anthropic, base_url: "{claude}", api_key: "{claude_key}"}}
  openai: {{type: openai, base_url: "{openai}/v1", api_key: "{openai_key}", apis: []}}
  openai-native:
    type: openai
    base_url: "{openai}/v1"
    api_key: "{openai_key}"
    apis: [responses, completions]
  gemini: {{type: gemini, base_url: "{gemini}", api_key: "{gemini_key}"}}
upstreams:
  sim-up: {{provider: sim, model: sim-model, price: {{input: 1, cached_input: 0.5, output: 2}}}}
  claude-up:
    provider: claude
    model: claude-sonnet-4-5
    price: {{input: 3, cached_input: 0.3, output: 15}}
  gpt-up: {{provider: openai, model: gpt-4.1, price: {{input: 2, cached_input: 0.5, output: 8}}}}
  gpt-native-up:
    provider: openai-native
    model: gpt-4.1
    price: {{input: 2, cached_input: 0.5, output: 8}}
  gemini-up:
    provider: gemini
    model: gemini-2.5-flash
    price: {{input: 0.3, cached_input: 0.075, output: 2.5}}
models:  # no retries: each error reaches the caller from the first attempt
  sim: {{upstreams: [sim-up], retry: {{max_retries: 0}}}}
  claude: {{upstreams: [claude-up], retry: {{max_retries: 0}}}}
  gpt: {{upstreams: [gpt-up], retry: {{max_retries: 0}}}}
  gpt-native: {{upstreams: [gpt-native-up], retry: {{max_retries: 0}}}}
  gemini: {{upstreams: [gemini-up], retry: {{max_retries: 0}}}}
"""
MODELS = ("sim", "claude", "gpt", "gemini")  # one per wire format (and the simulator)


class Upstreams:
    """The three local provider servers."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.claude = UpstreamServer(bg, anthropic_server.create_app())
        self.gemini = UpstreamServer(bg, gemini_server.create_app())
        app, self.openai_state = openai_server.create_app()
        self.openai = UpstreamServer(bg, app)

    @property
    def claude_recorder(self) -> Recorder:
        return self.claude.app[RECORDER]

    def config(self) -> str:
        return CONFIG.format(
            claude=self.claude.url,
            openai=self.openai.url,
            gemini=self.gemini.url,
            claude_key=anthropic_server.API_KEY,
            openai_key=openai_server.API_KEY,
            gemini_key=gemini_server.API_KEY,
        )

    def close(self) -> None:
        for server in (self.claude, self.gemini, self.openai):
            server.close()


@pytest.fixture
def upstreams(bg: BackgroundLoop) -> Iterator[Upstreams]:
    servers = Upstreams(bg)
    yield servers
    servers.close()


def anthropic_client(gateway: Gateway, **options: Any) -> anthropic.Anthropic:
    """The official SDK as a user points it at the gateway: base URL without /v1."""
    options = {"api_key": gateway.key, "max_retries": 0, **options}
    return anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), **options)


def async_anthropic_client(gateway: Gateway, **options: Any) -> anthropic.AsyncAnthropic:
    options = {"api_key": gateway.key, "max_retries": 0, **options}
    return anthropic.AsyncAnthropic(base_url=gateway.base_url.removesuffix("/v1"), **options)


def ledger_row(gateway: Gateway, where: str) -> dict[str, Any]:
    """The one ledger row matching `where`, polled briefly (a stream is metered as it ends)."""
    deadline = time.monotonic() + 5
    rows = gateway.ledger_rows(where)
    while not rows and time.monotonic() < deadline:
        time.sleep(0.02)
        rows = gateway.ledger_rows(where)
    assert len(rows) == 1, rows
    return rows[0]
