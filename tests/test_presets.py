"""OpenAI-compatible presets behind the gateway: one line of config each, and each
service's quirks read so that usage and cost come out exact (with the openai SDK)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from metergate.config import parse_config
from metergate.config.presets import PRESETS
from tests.harness import BackgroundLoop, Gateway, UpstreamServer
from tests.test_providers_through_gateway import CACHED, WEATHER, ask, ledger_row, split, tokens
from tests.upstreams import ANSWER, RECORDER, Recorder, compatible_server
from tests.upstreams.compatible_server import API_KEY, REASONING

# preset -> (fake flavor, model id)
PRESET_MODELS = {
    "deepseek": ("deepseek", "deepseek-chat"),
    "xai": ("xai", "grok-3-mini"),
    "groq": ("groq", "llama-3.3-70b-versatile"),
    "mistral": ("mistral", "mistral-small-latest"),
    "perplexity": ("perplexity", "sonar"),
    "together": ("openai", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    "fireworks": ("openai", "accounts/fireworks/models/llama-v3p3-70b-instruct"),
    "openrouter": ("openai", "openai/gpt-4.1"),
    "holysheep": ("openai", "gpt-4.1"),
    "ollama": ("openai", "llama3.2"),
    "vllm": ("openai", "Qwen/Qwen2.5-7B-Instruct"),
}


@pytest.fixture
def server(bg: BackgroundLoop) -> Iterator[UpstreamServer]:
    server = UpstreamServer(bg, compatible_server.create_app())
    yield server
    server.close()


def preset_config(server: UpstreamServer, **extra_models: str) -> dict[str, Any]:
    """One provider per preset (base URL pointed at the fake), priced by the preset."""
    providers: dict[str, Any] = {}
    upstreams: dict[str, Any] = {}
    for preset, (flavor, model) in PRESET_MODELS.items():
        providers[preset] = {
            "type": "openai",
            "preset": preset,
            "base_url": f"{server.url}/{flavor}/v1",
            "api_key": API_KEY,
        }
        upstreams[f"{preset}-up"] = {"provider": preset, "model": model}
    # The fake's Perplexity is its retired Sonar chat API (its Agent API, which the preset
    # now speaks, is tests/test_provider_perplexity.py): `chat_via: chat` still reaches it.
    providers["perplexity"]["chat_via"] = "chat"
    upstreams["deepseek-reasoner-up"] = {"provider": "deepseek", "model": "deepseek-reasoner"}
    models = {
        name.removesuffix("-up"): {"upstreams": [name], "retry": {"max_retries": 0}}
        for name in upstreams
    }
    return {"providers": providers, "upstreams": upstreams, "models": models}


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway], server: UpstreamServer) -> Gateway:
    return gateway_factory(preset_config(server))


@pytest.fixture(params=sorted(PRESET_MODELS))
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


def recorder(server: UpstreamServer) -> Recorder:
    return server.app[RECORDER]


def test_one_line_fills_url_and_prices() -> None:
    config = parse_config(
        "providers:\n"
        "  ds: {type: openai, preset: deepseek, api_key: sk-x}\n"
        "  local: {type: openai, preset: ollama}\n"
        "upstreams:\n"
        "  a: {provider: ds, model: deepseek-chat}\n"
        "  b: {provider: local, model: llama3.2}\n"
        "models: {m: {upstreams: [a, b]}}\n"
    )
    deepseek, ollama = config.providers["ds"], config.providers["local"]
    assert (deepseek.base_url, deepseek.price_list) == ("https://api.deepseek.com/v1", "deepseek")
    assert (ollama.base_url, ollama.price_list, ollama.api_key) == (
        "http://127.0.0.1:11434/v1",
        "free",
        None,
    )
    written = parse_config(
        "providers: {ds: {type: openai, preset: deepseek, api_key: k, base_url: 'http://h/v1',"
        " price_list: official}}\nupstreams: {a: {provider: ds, model: m}}\n"
        "models: {m: {upstreams: [a]}}\n"
    ).providers["ds"]
    assert (written.base_url, written.price_list) == ("http://h/v1", "official")


def test_every_preset_answers_streams_and_meters(gateway: Gateway, preset: str) -> None:
    client = gateway.client()
    messages = ask("Hello", system=CACHED)
    unary = client.chat.completions.create(model=preset, messages=messages, max_tokens=50)
    assert unary.choices[0].message.content == ANSWER
    assert unary.usage.prompt_tokens_details.cached_tokens == 1024
    chunks = list(
        client.chat.completions.create(
            model=preset,
            messages=messages,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    unary_row = ledger_row(gateway, "stream = 0")
    stream_row = ledger_row(gateway, "stream = 1")
    assert tokens(unary_row) == tokens(stream_row) == split(unary.usage)
    assert stream_row["outcome"] == "success"
    assert tokens(unary_row)[1] == 1024
    prices_known = PRESETS[preset].price_list == "free" or unary_row["cost_nano"] > 0
    assert prices_known, "the preset's shipped price list prices its example model"


def test_deepseek_cache_hits_and_reasoning(gateway: Gateway, server: UpstreamServer) -> None:
    """DeepSeek reports cache hits in its own field; the answer gets OpenAI's too."""
    reply = gateway.client().chat.completions.with_raw_response.create(
        model="deepseek-reasoner", messages=ask("Hello", system=CACHED)
    )
    parsed = reply.parse()
    assert parsed.usage.prompt_tokens_details.cached_tokens == 1024
    message = reply.http_response.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "First, think. Then answer."
    assert parsed.usage.completion_tokens == len(ANSWER.split()) + REASONING
    row = ledger_row(gateway, "1=1")
    assert row["cached_input_tokens"] == 1024
    # deepseek-reasoner at 0.28 / 0.028 / 0.42 USD per million (the shipped list)
    uncached, cached, output = split(parsed.usage)
    expected = uncached * 280 + cached * 28 + output * 420  # nano-USD
    assert row["cost_nano"] == expected
    chunks = list(
        gateway.client().chat.completions.create(
            model="deepseek-reasoner", messages=ask("Hello"), stream=True
        )
    )
    reasoning = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks]
    assert "First, think. Then answer." in reasoning


def test_xai_reasoning_tokens_count_as_output(gateway: Gateway) -> None:
    reply = gateway.client().chat.completions.create(model="xai", messages=ask("Hello"))
    assert reply.usage.completion_tokens == len(ANSWER.split()) + REASONING
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert ledger_row(gateway, "1=1")["output_tokens"] == reply.usage.completion_tokens


def test_groq_stream_usage_under_x_groq(gateway: Gateway) -> None:
    chunks = list(
        gateway.client().chat.completions.create(model="groq", messages=ask("Hello"), stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    row = ledger_row(gateway, "stream = 1")
    assert row["output_tokens"] == len(ANSWER.split()) and row["input_tokens"] > 0


def test_mistral_gets_the_fields_it_accepts(gateway: Gateway, server: UpstreamServer) -> None:
    client = gateway.client()
    reply = client.chat.completions.create(
        model="mistral", messages=ask("Hello"), max_completion_tokens=3
    )
    assert reply.choices[0].message.content == "The quick brown"
    sent = recorder(server).last.body
    assert sent["max_tokens"] == 3 and "max_completion_tokens" not in sent
    list(
        client.chat.completions.create(
            model="mistral",
            messages=ask("Hello"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "stream_options" not in recorder(server).last.body
    assert ledger_row(gateway, "stream = 1")["output_tokens"] == len(ANSWER.split())


def test_a_stream_without_done_is_complete_after_its_finish(gateway: Gateway) -> None:
    """Perplexity ends its streams without `data: [DONE]`; the caller still gets one."""
    with gateway.client().chat.completions.with_streaming_response.create(
        model="perplexity", messages=ask("Hello"), stream=True
    ) as response:
        body = b"".join(response.iter_bytes())
    assert body.rstrip().endswith(b"data: [DONE]")
    assert ledger_row(gateway, "stream = 1")["outcome"] == "success"


@pytest.mark.parametrize("word", ["stream_cut", "stream_error"])
def test_a_stream_cut_before_its_finish_is_an_error(gateway: Gateway, word: str) -> None:
    with pytest.raises(openai.APIError):
        for _ in gateway.client().chat.completions.create(
            model="perplexity", messages=ask(f"TRIGGER:{word}"), stream=True
        ):
            pass
    assert ledger_row(gateway, "stream = 1")["outcome"] == "upstream_error"


@pytest.mark.parametrize("stream", [False, True])
def test_preset_tool_calls(gateway: Gateway, stream: bool) -> None:
    reply: Any = gateway.client().chat.completions.create(
        model="deepseek", messages=ask("Weather?"), tools=[WEATHER], stream=stream
    )
    if stream:
        names = [
            call.function.name
            for chunk in reply
            for call in chunk.choices[0].delta.tool_calls or []
            if call.function and call.function.name
        ]
    else:
        names = [call.function.name for call in reply.choices[0].message.tool_calls]
    assert names == ["get_weather", "get_weather"]


def test_preset_embeddings(gateway: Gateway) -> None:
    reply = gateway.client().embeddings.create(
        model="ollama", input=["hello world"], encoding_format="float"
    )
    assert len(reply.data[0].embedding) == 8 and reply.usage.prompt_tokens == 2
