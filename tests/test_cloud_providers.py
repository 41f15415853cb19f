"""Azure OpenAI, AWS Bedrock and Google Vertex AI (Gemini and Claude) behind the gateway.

The same suite the Anthropic and Gemini adapters pass (`test_providers_through_gateway`),
driven by the official openai SDK through a served gateway, against fakes that speak
each service's wire format and check its authentication (`tests.clouds`): answers and
limits, streams, usage forwarded exactly, usage = cost header = ledger = metrics, tool
calls, errors, a failure in the middle of a stream, the gateway's own bad credentials,
embeddings, a fallback into and out of each provider, and a rollout onto each of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yarl
from aiohttp import web

from metergate.rollout import transitions
from tests.clouds import UPSTREAMS, Clouds, config, serve_clouds
from tests.harness import BackgroundLoop, Gateway, UpstreamServer
from tests.test_providers_through_gateway import (  # the shared suite, run here on each cloud
    WEATHER,
    ask,
    ledger_row,
    test_stream_forwards_usage_when_asked,
    test_stream_matches_the_unary_answer,
    test_tool_calls,
    test_usage_cost_ledger_and_metrics_agree,
)
from tests.upstreams import ANSWER


@dataclass
class Cloud:
    model: str  # the name callers use; its upstream is `{model}-up`
    server: str  # which fake serves it
    overloaded: tuple[int, str]  # the gateway's status for the fake's overload, and its words
    rate_limited: str  # the fake's rate limit message
    retry_after: str | None  # the Retry-After the caller gets on a rate limit
    marker: bytes  # where the fake's mid-stream error begins
    cache_writes: int = 0  # of the input tokens, those written to a prompt cache

    @property
    def upstream(self) -> str:
        return f"{self.model}-up"

    @property
    def prices(self) -> tuple[str, str, str]:
        return UPSTREAMS[self.upstream][2]


AZURE = Cloud("azure", "azure", (503, "overloaded"), "Rate limit reached", "7", b'data: {"error"')
AZURE_ENTRA = Cloud(
    "azure-entra", "azure", (503, "overloaded"), "Rate limit reached", "7", b'data: {"error"'
)
BEDROCK = Cloud(
    "bedrock",
    "bedrock",
    (503, "unavailable"),
    "Too many requests",
    None,
    b":exception-type",
    cache_writes=256,
)
VERTEX_GEMINI = Cloud(
    "vertex-gemini", "vertex", (503, "overloaded"), "current quota", "7", b'data: {"error"'
)
VERTEX_CLAUDE = Cloud(
    "vertex-claude",
    "vertex",
    (502, "Overloaded"),
    "per-minute rate limit",
    "7",
    b"event: error",
    cache_writes=256,
)
CLOUDS = [AZURE, AZURE_ENTRA, BEDROCK, VERTEX_GEMINI, VERTEX_CLAUDE]


@pytest.fixture
def clouds(bg: BackgroundLoop, tmp_path: Path) -> Iterator[Clouds]:
    yield from serve_clouds(bg, tmp_path)


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway], clouds: Clouds) -> Gateway:
    return gateway_factory(config(clouds))


@pytest.fixture(params=CLOUDS, ids=lambda c: c.model)
def provider(request: pytest.FixtureRequest) -> Cloud:
    """Named as in the shared suite, whose tests are imported above and run here."""
    return request.param


__all__ = [
    "test_stream_forwards_usage_when_asked",
    "test_stream_matches_the_unary_answer",
    "test_tool_calls",
    "test_usage_cost_ledger_and_metrics_agree",
]


def test_answer_and_length(gateway: Gateway, clouds: Clouds, provider: Cloud) -> None:
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
    sent = clouds.recorder(provider.server).last
    if provider is BEDROCK:  # Converse: the profile id in the path, limits in inferenceConfig
        assert sent.path == "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/converse"
        assert sent.body["system"] == [{"text": "Be brief."}]
        assert sent.body["inferenceConfig"] == {"maxTokens": 3}
    elif provider is AZURE:
        assert sent.path == "/openai/deployments/prod-gpt41/chat/completions"
        assert sent.query == {"api-version": "2024-10-21"}
    elif provider is AZURE_ENTRA:
        assert sent.path == "/openai/v1/chat/completions" and sent.body["model"] == "prod-gpt41"
    else:
        base = "/v1/projects/metergate-test/locations/us-east5/publishers"
        method = "claude-sonnet-4-5@20250929:rawPredict"
        expected = (
            f"{base}/anthropic/models/{method}"
            if provider is VERTEX_CLAUDE
            else (f"{base}/google/models/gemini-2.5-flash:generateContent")
        )
        assert sent.path == expected


async def test_tool_results_round_trip(gateway: Gateway, provider: Cloud) -> None:
    """The answers to the calls go back in the provider's format and are accepted."""
    client = gateway.async_client()
    first = await client.chat.completions.create(
        model=provider.model, messages=ask("Weather?"), tools=[WEATHER]
    )
    message = first.choices[0].message
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": f"{n + 18}C"}
        for n, call in enumerate(message.tool_calls or [])
    ]
    history = [*ask("Weather?"), message.model_dump(exclude_none=True), *results]
    second = await client.chat.completions.create(
        model=provider.model, messages=history, tools=[WEATHER]
    )
    assert second.choices[0].message.content == ANSWER


@pytest.mark.parametrize("word", ["overloaded", "rate_limit", "invalid"])
def test_upstream_errors_through_the_sdk(gateway: Gateway, provider: Cloud, word: str) -> None:
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
    if word == "rate_limit":
        assert raised.value.response.headers.get("retry-after") == provider.retry_after
    row = ledger_row(gateway, "1=1")
    assert (row["status"], row["outcome"], row["attempts"]) == (status, outcome, 1)
    assert row["output_tokens"] == row["cost_nano"] == 0


def gated_proxy(target: str, marker: bytes, gate: asyncio.Event) -> web.Application:
    """Relays to `target` (Host header, path and body untouched, so signatures hold) but
    holds the answer back from `marker` until `gate` is set."""

    async def forward(request: web.Request) -> web.StreamResponse:
        skip = ("content-length", "transfer-encoding")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        url = yarl.URL(target + request.raw_path, encoded=True)
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(url, data=await request.read(), headers=headers) as up,
        ):
            head, found, tail = (await up.read()).partition(marker)
            response = web.StreamResponse(
                status=up.status, headers={"content-type": up.headers["content-type"]}
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
    gateway_factory: Callable[..., Gateway], clouds: Clouds, bg: BackgroundLoop, provider: Cloud
) -> None:
    """The provider's error after some deltas: the SDK raises while iterating."""
    gate = asyncio.Event()
    target = getattr(clouds, provider.server).url
    proxy = UpstreamServer(bg, gated_proxy(target, provider.marker, gate))
    try:
        gateway = gateway_factory(
            config(clouds, **{provider.model.split("-")[0]: proxy.url, "azure-entra": proxy.url})
        )
        stream = gateway.client().chat.completions.create(
            model=provider.model, messages=ask("TRIGGER:stream_error"), stream=True
        )
        chunks = iter(stream)
        received = next(chunks).choices[0].delta.content or ""
        bg.loop.call_soon_threadsafe(gate.set)
        with pytest.raises(openai.APIError, match=r"(?i)overloaded"):
            for chunk in chunks:
                received += chunk.choices[0].delta.content or ""
    finally:
        bg.loop.call_soon_threadsafe(gate.set)
        proxy.close()
    assert ANSWER.startswith(received) and received != ANSWER
    row = ledger_row(gateway, "stream = 1")
    assert (row["outcome"], row["stream"]) == ("upstream_error", 1)


@pytest.mark.parametrize("stream", [False, True])
def test_a_bedrock_answer_without_usage_is_billed_what_it_answered(
    gateway: Gateway, stream: bool
) -> None:
    """No usage in the Converse answer (or the stream's metadata): `usage: null` to the
    caller, and billed one token per byte of the text, not $0."""
    client = gateway.client()
    ask_for = ask("Tell me. TRIGGER:nousage")
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="bedrock",
                messages=ask_for,
                stream=True,
                stream_options={"include_usage": True},  # none to give: no zeros either
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert all(chunk.usage is None for chunk in chunks)
    else:
        answer = client.chat.completions.create(model="bedrock", messages=ask_for)
        assert answer.usage is None
        text = answer.choices[0].message.content or ""
    row = ledger_row(gateway, f"stream = {int(stream)}")
    assert (row["outcome"], row["usage_estimated"]) == ("success", 1)
    assert row["output_tokens"] == len(text.encode()) > 0 and row["cost_nano"] > 0


@pytest.mark.parametrize(
    ("trigger", "said"),
    [
        ("stream_error_at_once", "modelStreamErrorException"),
        ("stream_corrupt_at_once", "malformed event stream"),
    ],
)
def test_bedrock_text_before_a_broken_frame_in_the_same_read_reaches_the_caller(
    gateway: Gateway, trigger: str, said: str
) -> None:
    """An exception frame, or a frame whose checksum is wrong, in the same network read
    as the text before it: that text is relayed and billed, then the stream ends with
    the error (it was all dropped, the caller got a bare 502 and the ledger $0)."""
    text = ""
    with pytest.raises(openai.APIError) as broken:
        for chunk in gateway.client().chat.completions.create(
            model="bedrock", messages=ask(f"Tell me. TRIGGER:{trigger}"), stream=True
        ):
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert said in str(broken.value.message)
    assert text == " ".join(ANSWER.split(" ")[:4])  # the four words before the break
    row = ledger_row(gateway, "1=1")
    assert (row["outcome"], row["usage_estimated"]) == ("upstream_error", 1)
    assert row["output_tokens"] >= len(text.encode()) and row["cost_nano"] > 0


def test_a_bedrock_throttle_right_after_the_opening_is_the_callers_429(gateway: Gateway) -> None:
    """A throttle Bedrock reports right after `messageStart`, before any content: no
    byte has reached the caller, so it is a rate limit answered as one (a 429 the
    gateway could retry or reroute), not a 200 stream ending in an error, and not billed."""
    with pytest.raises(openai.RateLimitError) as throttled:
        for _ in gateway.client().chat.completions.create(
            model="bedrock", messages=ask("TRIGGER:stream_throttled_after_start"), stream=True
        ):
            pass
    assert "throttlingException" in throttled.value.message
    row = ledger_row(gateway, "1=1")
    assert (row["outcome"], row["status"], row["cost_nano"]) == ("upstream_rejected", 429, 0)


def test_a_bedrock_model_failure_is_an_upstream_error_not_the_callers(gateway: Gateway) -> None:
    """HTTP 424 ModelErrorException: the model failed on a valid request. A 502 the
    caller may retry (and the gateway does), not a 400 telling it its request is wrong."""
    with pytest.raises(openai.InternalServerError) as raised:
        gateway.client().chat.completions.create(
            model="bedrock", messages=ask("TRIGGER:model_error")
        )
    assert raised.value.status_code == 502
    assert "ModelErrorException" in raised.value.message
    assert "failed to process" in raised.value.message
    row = ledger_row(gateway, "1=1")
    assert (row["status"], row["outcome"]) == (502, "upstream_error")


def test_wrong_provider_credentials_are_a_502(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, provider: Cloud, tmp_path: Path
) -> None:
    """The service refusing the gateway's credentials is not the caller's 401."""
    settings = config(clouds)
    entry = settings["providers"][UPSTREAMS[provider.upstream][0]]
    secret = "wrong-secret-abcdefghijklmnop0123"
    if provider in (AZURE,):
        entry["api_key"] = secret
    elif provider is AZURE_ENTRA:
        entry["azure"]["client_secret"] = secret
    elif provider is BEDROCK:
        entry["bedrock"]["secret_access_key"] = secret
    else:  # a key file for another key pair than the one Google knows
        from tests.upstreams.vertex_server import State

        other = tmp_path / "other.json"
        other.write_text(json.dumps(State().service_account(f"{clouds.vertex.url}/token")))
        entry["vertex"]["credentials_file"] = str(other)
    gateway = gateway_factory(settings)
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client().chat.completions.create(model=provider.model, messages=ask("hi"))
    assert not isinstance(raised.value, openai.AuthenticationError)
    assert raised.value.status_code == 502
    assert secret not in raised.value.response.text
    assert "check" in raised.value.message
    row = ledger_row(gateway, "1=1")
    assert (row["status"], row["outcome"]) == (502, "upstream_rejected")


@pytest.mark.parametrize(
    ("model", "tokens_used"),
    [("azure-embed", 7), ("titan", 7), ("cohere", 7), ("vertex-embed", 7)],
)
def test_embeddings(gateway: Gateway, model: str, tokens_used: int) -> None:
    """Base64 (the SDK's default, decoded by it) and floats agree; usage as reported
    (the fakes count one token per word)."""
    client = gateway.client()
    texts = ["hello world", "a longer sentence to embed"]
    default = client.embeddings.create(model=model, input=texts)
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [d.index for d in floats.data] == [0, 1]
    for decoded, exact in zip(default.data, floats.data, strict=True):
        assert len(exact.embedding) == 8
        assert decoded.embedding == pytest.approx(exact.embedding, abs=1e-6)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens == tokens_used
    row = gateway.ledger_rows("1=1")[-1]
    assert (row["input_tokens"], row["outcome"]) == (tokens_used, "success")


def with_simulated(settings: dict[str, Any], error_rate: float) -> dict[str, Any]:
    settings["providers"]["sim"] = {
        "type": "simulated",
        "simulated": {"error_rate": error_rate, "error_kind": "server_error"},
    }
    settings["upstreams"]["sim-up"] = {"provider": "sim", "model": "sim-model", "price": {}}
    settings["models"]["sim"] = {"upstreams": ["sim-up"], "retry": {"max_retries": 0}}
    return settings


def test_fallback_into_the_provider(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, provider: Cloud
) -> None:
    settings = with_simulated(config(clouds), error_rate=1.0)
    settings["models"]["sim"]["fallbacks"] = [provider.model]
    gateway = gateway_factory(settings)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="sim", messages=ask("Hello")
    )
    assert raw.parse().choices[0].message.content == ANSWER
    assert raw.headers["x-metergate-upstream"] == provider.upstream
    moved = {"model": "sim", "from_upstream": "sim-up", "to_upstream": provider.upstream}
    assert gateway.metric("metergate_fallbacks_total", **moved) == 1
    row = ledger_row(gateway, "1=1")
    assert (row["upstream"], row["attempts"], row["outcome"]) == (provider.upstream, 2, "success")


def test_fallback_out_of_the_provider(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, provider: Cloud
) -> None:
    settings = with_simulated(config(clouds), error_rate=0.0)
    settings["models"][provider.model]["fallbacks"] = ["sim"]
    gateway = gateway_factory(settings)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=provider.model, messages=ask("TRIGGER:overloaded")
    )
    assert raw.headers["x-metergate-upstream"] == "sim-up"
    assert (
        gateway.metric(
            "metergate_upstream_attempts_total",
            upstream=provider.upstream,
            outcome="upstream_error",
        )
        == 1
    )
    row = ledger_row(gateway, "1=1")
    assert (row["upstream"], row["attempts"], row["outcome"]) == ("sim-up", 2, "success")


async def test_rollout_onto_the_provider(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, provider: Cloud
) -> None:
    """A staged rollout from the simulator to the provider completes; both served."""
    settings = with_simulated(config(clouds), error_rate=0.0)
    settings["rollouts"] = {
        "move": {
            "model": "sim",
            "baseline": ["sim-up"],
            "candidate": [provider.upstream],
            "stages": [50, 100],
            "interval_seconds": 0.3,
            "min_requests": 3,
        }
    }
    gateway = gateway_factory(settings)
    rollout = gateway.runtime.plan.rollouts.rollouts["move"]
    gateway.bg.run(transitions.start(gateway.runtime.database, rollout))
    client = gateway.async_client()
    served: list[str] = []
    deadline = time.monotonic() + 20
    while rollout.state != "completed" and time.monotonic() < deadline:
        raw = await client.chat.completions.with_raw_response.create(
            model="sim", messages=ask("Hello")
        )
        served.append(raw.headers["x-metergate-upstream"])
        await asyncio.sleep(0.01)
    assert rollout.state == "completed"
    assert {"sim-up", provider.upstream} <= set(served)
    after = await client.chat.completions.with_raw_response.create(
        model="sim", messages=ask("Hello")
    )
    assert after.headers["x-metergate-upstream"] == provider.upstream
    assert after.parse().choices[0].message.content == ANSWER
