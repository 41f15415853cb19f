"""An OpenAI-compatible upstream behind the gateway, driven by the official openai SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.upstreams.openai_server import API_KEY, WORDS


@pytest.fixture
def gateway(gateway_factory, openai_upstream):
    server, _ = openai_upstream
    return gateway_factory(
        {
            "providers": {
                "up": {"type": "openai", "base_url": f"{server.url}/v1", "api_key": API_KEY}
            },
            "upstreams": {
                "up-gpt": {
                    "provider": "up",
                    "model": "gpt-4.1-2025-04-14",
                    "price": {"input": 2, "cached_input": 0.5, "output": 8},
                },
                "up-embed": {"provider": "up", "model": "text-embedding-3-small"},
            },
            "models": {"gpt-4.1": {"upstreams": ["up-gpt"]}, "embed": {"upstreams": ["up-embed"]}},
        }
    )


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_request_passes_through_with_model_replaced(gateway, openai_upstream):
    _, state = openai_upstream
    reply = gateway.client().chat.completions.create(
        model="gpt-4.1",
        messages=ask("hi"),
        temperature=0.3,
        stop=["\n"],
        seed=5,
        extra_body={"vendor_knob": {"nested": [1, 2]}},
    )
    sent = state.requests[-1]
    assert sent["model"] == "gpt-4.1-2025-04-14"
    assert sent["vendor_knob"] == {"nested": [1, 2]}
    assert sent["temperature"] == 0.3 and sent["stop"] == ["\n"] and sent["seed"] == 5
    assert state.headers[-1]["Authorization"] == f"Bearer {API_KEY}"
    assert reply.choices[0].message.content == "".join(WORDS)
    assert reply.usage.prompt_tokens == 11 and reply.usage.completion_tokens == 7


def test_tool_calls_and_n(gateway):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    reply = gateway.client().chat.completions.create(
        model="gpt-4.1", messages=ask("weather"), tools=tools, n=2
    )
    assert len(reply.choices) == 2
    call = reply.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("weather", '{"city": "Seoul"}')


async def test_stream_always_asks_upstream_for_usage(gateway, openai_upstream):
    _, state = openai_upstream
    stream = await gateway.async_client().chat.completions.create(
        model="gpt-4.1", messages=ask("hi"), stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert state.requests[-1]["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(WORDS)
    assert all(chunk.choices for chunk in chunks), "usage-only chunk must not be forwarded"
    row = gateway.ledger_rows()[-1]
    assert (row["input_tokens"], row["output_tokens"], row["stream"]) == (11, 7, 1)


def test_stream_forwards_usage_when_asked(gateway):
    stream = gateway.client().chat.completions.create(
        model="gpt-4.1",
        messages=ask("TRIGGER:cached"),
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage]
    assert len(usage) == 1
    assert usage[0].prompt_tokens == 2000
    assert usage[0].prompt_tokens_details.cached_tokens == 1024


def test_embeddings(gateway):
    result = gateway.client().embeddings.create(
        model="embed", input=["a", "b"], encoding_format="float"
    )
    assert [d.embedding for d in result.data] == [[0.1, 0.2, 0.3]] * 2
    assert result.usage.prompt_tokens == 6


@pytest.mark.parametrize(
    ("trigger", "error_class", "status"),
    [
        ("429", openai.RateLimitError, 429),
        ("500", openai.APIStatusError, 502),
        ("503", openai.APIStatusError, 503),
        ("400", openai.BadRequestError, 400),
    ],
)
def test_upstream_errors_keep_their_message(gateway, trigger, error_class, status):
    with pytest.raises(error_class) as raised:
        gateway.client().chat.completions.create(
            model="gpt-4.1", messages=ask(f"TRIGGER:{trigger}")
        )
    assert raised.value.status_code == status
    message = raised.value.body["message"]
    assert ("Rate limit reached" if trigger == "429" else f"upstream says {trigger}") in message
    if trigger == "429":
        assert raised.value.response.headers["retry-after"] == "2"


def test_wrong_provider_key_is_not_reported_as_the_callers_401(gateway_factory, openai_upstream):
    server, _ = openai_upstream
    wrong = "sk-wrong-provider-key-abcdefghijklmnop"
    gateway = gateway_factory(
        {
            "providers": {
                "up": {"type": "openai", "base_url": f"{server.url}/v1", "api_key": wrong}
            },
            "upstreams": {"u": {"provider": "up", "model": "m"}},
            "models": {"m": {"upstreams": ["u"]}},
        }
    )
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client().chat.completions.create(model="m", messages=ask("hi"))
    assert raised.value.status_code == 502
    assert "check this provider's api_key" in raised.value.body["message"]
    assert wrong not in raised.value.response.text


def test_cut_stream_ends_with_an_error_event(gateway):
    stream = gateway.client().chat.completions.create(
        model="gpt-4.1", messages=ask("TRIGGER:cut"), stream=True
    )
    with pytest.raises(openai.APIError, match="ended before"):
        for _ in stream:
            pass
    row = gateway.ledger_rows()[-1]
    assert row["outcome"] == "upstream_error"


def test_client_disconnect_cancels_the_upstream_stream(gateway, openai_upstream):
    _, state = openai_upstream
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{gateway.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {gateway.key}"},
            json={"model": "gpt-4.1", "stream": True, "messages": ask("TRIGGER:slowstream")},
        ) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content":"."' in line:
                break  # leave while the upstream is still streaming
    deadline = time.monotonic() + 5
    while state.streams_cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.streams_cancelled == 1
    rows = [r for r in gateway.ledger_rows() if r["outcome"] == "cancelled"]
    assert len(rows) == 1 and rows[0]["status"] == 499
    assert rows[0]["output_tokens"] >= 1  # an abandoned stream is still charged
