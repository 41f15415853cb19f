"""Anthropic and Gemini upstreams behind the gateway, driven by the official openai SDK.

The fake provider servers speak the real wire formats. The adapters' unit tests cover
translation in depth; these check what an SDK user sees, and that the usage, the cost
header, the ledger and the metrics of one request agree with each other.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types import CompletionUsage

from tests.harness import BackgroundLoop, Gateway, UpstreamServer
from tests.upstreams import ANSWER, RECORDER, Recorder, anthropic_server, gemini_server

CACHED = "TRIGGER:cached"  # in the system prompt: both fakes report 1024 cached tokens
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


CONFIG = """
providers:
  claude: {{type: anthropic, base_url: "{claude}", api_key: "{claude_key}"}}
  gemini: {{type: gemini, base_url: "{gemini}", api_key: "{gemini_key}"}}
upstreams:
  claude-up:
    provider: claude
    model: claude-sonnet-4-5
    price: {{input: 3, cached_input: 0.3, output: 15}}
  gemini-up:
    provider: gemini
    model: gemini-2.5-flash
    price: {{input: 0.3, cached_input: 0.075, output: 2.5}}
  embed-up: {{provider: gemini, model: gemini-embedding-001, price: {{input: 0.15}}}}
models:  # no retries: each error reaches the caller from the first attempt
  claude: {{upstreams: [claude-up], retry: {{max_retries: 0}}}}
  gemini: {{upstreams: [gemini-up], retry: {{max_retries: 0}}}}
  gemini-embed: {{upstreams: [embed-up]}}
"""


@dataclass
class Provider:
    model: str  # the name callers use, also the key of its fake in `upstreams`
    prices: tuple[str, str, str]  # as configured, USD per million: input, cached, output
    overloaded: tuple[int, str]  # the gateway's status, and the provider's message kept
    rate_limited: str  # the provider's rate limit message
    cache_writes: int = 0  # of the input tokens, those CACHED writes to the prompt cache

    @property
    def upstream(self) -> str:  # the deployment's name, a metric label
        return f"{self.model}-up"


CLAUDE = Provider(
    "claude", ("3", "0.3", "15"), (502, "Overloaded"), "per-minute rate limit", cache_writes=256
)
GEMINI = Provider(
    "gemini", ("0.3", "0.075", "2.5"), (503, "The model is overloaded"), "current quota"
)


def config(urls: dict[str, str], api_key: str | None = None) -> str:
    return CONFIG.format(
        **urls,
        claude_key=api_key or anthropic_server.API_KEY,
        gemini_key=api_key or gemini_server.API_KEY,
    )


@pytest.fixture
def upstreams(bg: BackgroundLoop) -> Iterator[dict[str, UpstreamServer]]:
    servers = {
        "claude": UpstreamServer(bg, anthropic_server.create_app()),
        "gemini": UpstreamServer(bg, gemini_server.create_app()),
    }
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def gateway(
    gateway_factory: Callable[..., Gateway], upstreams: dict[str, UpstreamServer]
) -> Gateway:
    return gateway_factory(config({name: s.url for name, s in upstreams.items()}))


@pytest.fixture(params=[CLAUDE, GEMINI], ids=lambda p: p.model)
def provider(request: pytest.FixtureRequest) -> Provider:
    return request.param


def recorder(upstreams: dict[str, UpstreamServer], name: str) -> Recorder:
    return upstreams[name].app[RECORDER]


def ask(text: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


def split(usage: CompletionUsage) -> tuple[int, int, int]:
    """(prompt - cached, cached, completion) tokens: how the gateway prices and records them."""
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details else 0
    return usage.prompt_tokens - cached, cached, usage.completion_tokens


def tokens(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]


def expected_cost(provider: Provider, usage: CompletionUsage, writes: int = 0) -> Decimal:
    """USD at the configured prices (per million), rounded half up to the nano-dollar.

    `writes` of the input tokens were written to the prompt cache: with no price of their
    own configured, they cost Anthropic's published 1.25 times the input price."""
    micro = sum(n * Decimal(p) for n, p in zip(split(usage), provider.prices, strict=True))
    micro += writes * Decimal(provider.prices[0]) * Decimal("0.25")
    return (micro / 1_000_000).quantize(Decimal("1e-9"), rounding=ROUND_HALF_UP)


def ledger_row(gateway: Gateway, where: str) -> dict[str, Any]:
    """The one ledger row matching `where`, polled briefly (a stream is metered as it ends)."""
    deadline = time.monotonic() + 5
    rows = gateway.ledger_rows(where)
    while not rows and time.monotonic() < deadline:
        time.sleep(0.02)
        rows = gateway.ledger_rows(where)
    assert len(rows) == 1, rows
    return rows[0]


def spend(gateway: Gateway, provider: Provider) -> tuple[float, ...]:
    """Tokens by type and cost in USD so far, from the model's metrics."""
    labels = {"model": provider.model, "upstream": provider.upstream, "key": "test"}
    tokens = (
        gateway.metric("metergate_tokens_total", type=kind, **labels)
        for kind in ("input", "cached_input", "output")
    )
    return (*tokens, gateway.metric("metergate_cost_usd_total", **labels))


def test_answer_and_length(
    gateway: Gateway, upstreams: dict[str, UpstreamServer], provider: Provider
) -> None:
    client = gateway.client()
    reply = client.chat.completions.create(model=provider.model, messages=ask("Hello"))
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", ANSWER)
    assert choice.finish_reason == "stop" and reply.usage.completion_tokens == 9
    cut = client.chat.completions.create(
        model=provider.model, messages=ask("Hi", system="Be brief."), max_tokens=3
    )
    assert cut.choices[0].message.content == "The quick brown"
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    # Spot check of the translation (Anthropic `system`, `max_tokens`; Gemini
    # `systemInstruction`, `generationConfig.maxOutputTokens`); adapter tests go deeper.
    sent = recorder(upstreams, provider.model).last.body
    if provider is CLAUDE:
        assert (sent["system"], sent["max_tokens"]) == ("Be brief.", 3)
    else:
        assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert sent["generationConfig"] == {"maxOutputTokens": 3}


async def test_stream_matches_the_unary_answer(gateway: Gateway, provider: Provider) -> None:
    client = gateway.async_client()
    unary = await client.chat.completions.create(model=provider.model, messages=ask("Hello"))
    stream = await client.chat.completions.create(
        model=provider.model, messages=ask("Hello"), stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks), "usage not asked for"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == unary.choices[0].message.content == ANSWER
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert reasons == ["stop"] and chunks[-1].choices[0].finish_reason == "stop"
    # The ledger has the stream's usage although the caller did not ask for it.
    row = ledger_row(gateway, "stream = 1")
    assert row["outcome"] == "success" and tokens(row) == split(unary.usage)


def test_stream_forwards_usage_when_asked(gateway: Gateway, provider: Provider) -> None:
    """One usage chunk, last and without choices, equal to the unary answer's usage."""
    client = gateway.client()
    messages = ask("Hello", system=CACHED)
    unary = client.chat.completions.create(model=provider.model, messages=messages)
    options = {"include_usage": True}
    chunks = list(
        client.chat.completions.create(
            model=provider.model, messages=messages, stream=True, stream_options=options
        )
    )
    usages = [chunk.usage for chunk in chunks if chunk.usage]
    assert len(usages) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    assert usages[0].prompt_tokens_details.cached_tokens == 1024
    assert usages[0].model_dump() == unary.usage.model_dump()
    unary_row = ledger_row(gateway, "stream = 0")
    stream_row = ledger_row(gateway, "stream = 1")
    assert tokens(stream_row) == split(usages[0])
    assert stream_row["cost_nano"] == unary_row["cost_nano"] > 0


def test_usage_cost_ledger_and_metrics_agree(gateway: Gateway, provider: Provider) -> None:
    """Usage, cost header, ledger row and metrics of one request tell the same story."""
    before = spend(gateway, provider)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=provider.model, messages=ask("What is cached?", system=CACHED)
    )
    usage = raw.parse().usage
    assert usage.prompt_tokens_details.cached_tokens == 1024
    assert usage.prompt_tokens > 1024 and usage.completion_tokens == 9
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cost = expected_cost(provider, usage, provider.cache_writes)
    assert raw.headers["x-metergate-cost-usd"] == f"{cost:.9f}"
    assert raw.headers["x-metergate-upstream"] == provider.upstream

    row = ledger_row(gateway, f"request_id = '{raw.headers['x-request-id']}'")
    assert tokens(row) == split(usage) and row["cost_nano"] == int(cost * 10**9)
    assert (row["upstream"], row["outcome"], row["status"]) == (provider.upstream, "success", 200)

    moved = [now - then for now, then in zip(spend(gateway, provider), before, strict=True)]
    assert tuple(moved[:3]) == tokens(row)
    assert moved[3] == pytest.approx(float(cost), abs=1e-12)


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls(gateway: Gateway, provider: Provider, stream: bool) -> None:
    """The fakes' two parallel calls; streamed, deltas are assembled by index as SDK users do."""
    reply: Any = await gateway.async_client().chat.completions.create(
        model=provider.model, messages=ask("Weather?"), tools=[WEATHER], stream=stream
    )
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    reasons = []
    if stream:
        async for chunk in reply:
            for delta in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(delta.index, ["", "", ""])
                call[0] += delta.id or ""
                call[1] += (delta.function and delta.function.name) or ""
                call[2] += (delta.function and delta.function.arguments) or ""
            reasons.append(chunk.choices[0].finish_reason)
    else:
        reasons.append(reply.choices[0].finish_reason)
        for index, call in enumerate(reply.choices[0].message.tool_calls):
            assert call.type == "function"
            calls[index] = [call.id, call.function.name, call.function.arguments]
    assert [reason for reason in reasons if reason] == ["tool_calls"]
    assert sorted(calls) == [0, 1]
    assert [calls[i][1] for i in (0, 1)] == ["get_weather", "get_weather"]
    arguments = [json.loads(calls[i][2]) for i in (0, 1)]
    assert arguments == [{"location": "Paris"}, {"location": "Tokyo"}]
    assert calls[0][0] and calls[1][0] and calls[0][0] != calls[1][0]


@pytest.mark.parametrize("word", ["overloaded", "rate_limit", "invalid"])
def test_upstream_errors_through_the_sdk(gateway: Gateway, provider: Provider, word: str) -> None:
    status, message, error_class, outcome = {
        "overloaded": (*provider.overloaded, openai.APIStatusError, "upstream_error"),
        # the provider's 429: its attempt is rate_limited, the request it ends an error
        "rate_limit": (429, provider.rate_limited, openai.RateLimitError, "upstream_rejected"),
        "invalid": (400, "trigger asked for a 400", openai.BadRequestError, "upstream_rejected"),
    }[word]
    with pytest.raises(error_class) as raised:
        gateway.client().chat.completions.create(
            model=provider.model, messages=ask(f"TRIGGER:{word}")
        )
    assert raised.value.status_code == status
    assert message.lower() in raised.value.message.lower()
    if word == "rate_limit":  # Anthropic's retry-after header, Gemini's RetryInfo "7s"
        assert raised.value.response.headers["retry-after"] == "7"
    row = ledger_row(gateway, "1=1")
    assert (row["status"], row["outcome"], row["attempts"]) == (status, outcome, 1)
    assert row["output_tokens"] == row["cost_nano"] == 0


def gated_proxy(target: str, marker: bytes, gate: asyncio.Event) -> web.Application:
    """Relays to the fake at `target` but holds its stream back from `marker` until `gate`.

    The fakes write a whole stream at once, so the gateway would read the error event
    together with the first deltas, before it started its own stream.
    """

    async def forward(request: web.Request) -> web.StreamResponse:
        skip = ("host", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                target + request.path_qs, data=await request.read(), headers=headers
            ) as up,
        ):
            head, found, tail = (await up.read()).partition(marker)
            response = web.StreamResponse(
                status=up.status, headers={"content-type": up.content_type}
            )
        await response.prepare(request)
        await response.write(head)
        await asyncio.wait_for(gate.wait(), 10)
        await response.write(found + tail)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/{path:.*}", forward)
    return app


def test_mid_stream_error(
    gateway_factory: Callable[..., Gateway],
    upstreams: dict[str, UpstreamServer],
    bg: BackgroundLoop,
    provider: Provider,
) -> None:
    """The provider's error event after some deltas: the SDK raises while iterating."""
    gate = asyncio.Event()
    marker = b"event: error" if provider is CLAUDE else b'data: {"error"'
    proxy = UpstreamServer(bg, gated_proxy(upstreams[provider.model].url, marker, gate))
    try:
        urls = {name: proxy.url for name in upstreams}
        gateway = gateway_factory(config(urls))
        stream = gateway.client().chat.completions.create(
            model=provider.model, messages=ask("TRIGGER:stream_error"), stream=True
        )
        chunks = iter(stream)
        received = next(chunks).choices[0].delta.content or ""
        bg.loop.call_soon_threadsafe(gate.set)  # the provider's error event follows
        with pytest.raises(openai.APIError, match=r"(?i)overloaded"):
            for chunk in chunks:
                received += chunk.choices[0].delta.content or ""
    finally:
        bg.loop.call_soon_threadsafe(gate.set)
        proxy.close()
    assert received and ANSWER.startswith(received) and received != ANSWER
    row = ledger_row(gateway, "stream = 1")
    assert (row["outcome"], row["stream"]) == ("upstream_error", 1)
    assert row["input_tokens"] > 0  # what the provider reported before failing is metered


def test_wrong_provider_key_is_a_502(
    gateway_factory: Callable[..., Gateway],
    upstreams: dict[str, UpstreamServer],
    provider: Provider,
) -> None:
    """The gateway's own bad credentials are not the caller's 401, and are not echoed."""
    wrong = "sk-wrong-provider-key-abcdefghijklmnop"
    gateway = gateway_factory(config({n: s.url for n, s in upstreams.items()}, api_key=wrong))
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client().chat.completions.create(model=provider.model, messages=ask("hi"))
    sent = recorder(upstreams, provider.model).last.headers
    assert wrong in (sent.get("x-api-key"), sent.get("x-goog-api-key"))  # it was really tried
    assert not isinstance(raised.value, openai.AuthenticationError)
    assert raised.value.status_code == 502
    assert "check this provider's api_key" in raised.value.message
    assert wrong not in raised.value.response.text


def test_gemini_embeddings(gateway: Gateway, upstreams: dict[str, UpstreamServer]) -> None:
    """Default (base64, decoded by the SDK) and float vectors agree; usage is estimated."""
    client = gateway.client()
    texts = ["hello world", "a longer sentence to embed"]
    raw = client.embeddings.with_raw_response.create(model="gemini-embed", input=texts)
    default = raw.parse()  # the SDK asks for base64 and decodes it
    sent = recorder(upstreams, "gemini").last
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert [r["content"]["parts"][0]["text"] for r in sent.body["requests"]] == texts
    floats = client.embeddings.create(model="gemini-embed", input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [d.index for d in floats.data] == [0, 1]
    for decoded, exact in zip(default.data, floats.data, strict=True):
        assert len(exact.embedding) == 8 and all(-1 <= v <= 1 for v in exact.embedding)
        assert decoded.embedding == pytest.approx(exact.embedding, abs=1e-6)
    assert floats.data[0].embedding != floats.data[1].embedding
    estimate = sum(math.ceil(len(text) / 4) for text in texts)  # Gemini reports no usage
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens == estimate
    assert raw.headers["x-metergate-cost-usd"] == f"{Decimal(estimate) * 150 / 10**9:.9f}"
