"""The official openai SDK against the gateway's built-in simulated provider."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pydantic
import pytest

from tests.harness import simulated_config


@pytest.fixture
def gateway(gateway_factory):
    config = simulated_config(output_tokens=5)
    config["upstreams"]["sim-embed"] = {
        "provider": "sim",
        "model": "embed",
        "price": {"input": 0.1},
    }
    config["models"]["embed"] = {"upstreams": ["sim-embed"]}
    return gateway_factory(config)


def test_chat_completion_sync(gateway):
    reply = gateway.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert len(reply.choices[0].message.content.split()) == 5
    assert reply.usage.completion_tokens == 5
    assert reply.usage.prompt_tokens > 0


def test_same_request_same_answer(gateway):
    client = gateway.client()
    ask = dict(model="sim", messages=[{"role": "user", "content": "determinism"}])
    first = client.chat.completions.create(**ask)
    second = client.chat.completions.create(**ask)
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_chat_completion_async_stream_with_usage(gateway):
    client = gateway.async_client()
    stream = await client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(text.split()) == 5
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 5


def test_stream_without_usage_hides_usage_chunk(gateway):
    stream = gateway.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert chunks and all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)


def test_models_list_and_retrieve(gateway):
    client = gateway.client()
    assert sorted(model.id for model in client.models.list()) == ["embed", "sim"]
    assert client.models.retrieve("sim").id == "sim"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_embeddings_float_and_base64(gateway):
    client = gateway.client()
    default = client.embeddings.create(model="embed", input=["a", "b"])  # SDK asks for base64
    assert len(default.data) == 2 and len(default.data[0].embedding) == 8
    floats = client.embeddings.create(
        model="embed", input="a", encoding_format="float", dimensions=4
    )
    assert len(floats.data[0].embedding) == 4
    assert default.data[0].embedding[:4] == pytest.approx(floats.data[0].embedding, abs=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_an_embeddings_model_refuses_chat(gateway, stream):
    """As a real provider's does: the caller learns they asked the wrong model instead of
    getting text."""
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="embed", messages=[{"role": "user", "content": "hello"}], stream=stream
        )
    assert "upstream model embed is an embeddings model" in refused.value.message


def test_tools_and_response_format(gateway):
    client = gateway.client()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    reply = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "weather?"}], tools=tools
    )
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "example"}

    structured = client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
    )
    assert "answer" in json.loads(structured.choices[0].message.content)


class Address(pydantic.BaseModel):
    city: str
    zip_code: int | None


class Person(pydantic.BaseModel):
    name: str
    age: int
    score: float
    member: bool
    role: Literal["admin", "user"]
    home: Address
    past: list[Address]


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_answer_an_instance_of_the_schema(gateway, stream):
    """The SDK's `parse` validates the answer against the schema it sent, as it would a
    provider's strict structured output: nested models ($ref), Optional (anyOf with
    null), lists and Literal (enum) included."""
    client = gateway.client()
    ask = {"model": "sim", "messages": [{"role": "user", "content": "who?"}]}
    if stream:
        with client.chat.completions.stream(**ask, response_format=Person) as events:
            for _ in events:
                pass
            person = events.get_final_completion().choices[0].message.parsed
    else:
        person = client.chat.completions.parse(**ask, response_format=Person)
        person = person.choices[0].message.parsed
    assert isinstance(person, Person)
    assert person.role == "admin" and person.home.zip_code == 1 and len(person.past) == 1
    answered = client.responses.parse(model="sim", input="who?", text_format=Person)
    assert isinstance(answered.output_parsed, Person)


def test_n_stop_and_max_tokens(gateway):
    client = gateway.client()
    reply = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "x"}], n=3, max_tokens=2, temperature=0.2
    )
    assert len(reply.choices) == 3
    assert all(choice.finish_reason == "length" for choice in reply.choices)
    assert reply.usage.completion_tokens == 6


@pytest.mark.parametrize("stream", [False, True])
def test_more_choices_than_openai_allows_are_refused_at_once(gateway_factory, stream):
    """`n` beyond OpenAI's 128, from a demo model that paces its tokens: a 400 naming `n`
    at once, where it used to sleep for n x tokens (hours for n=100000)."""
    gateway = gateway_factory(simulated_config(output_tokens=5, tokens_per_second=100))
    client = gateway.client(timeout=30)
    ask = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match=r"n: at most 128 choices"):
        client.chat.completions.create(model="sim", messages=ask, n=100_000, stream=stream)
    reply = client.chat.completions.create(model="sim", messages=ask, n=128, max_tokens=1)
    assert len(reply.choices) == 128
    assert [row["outcome"] for row in gateway.ledger_rows()] == ["upstream_rejected", "success"]


def test_simulated_errors_follow_the_config(gateway_factory):
    gateway = gateway_factory(simulated_config(error_rate=1.0, error_kind="rate_limited"))
    with pytest.raises(openai.RateLimitError) as raised:
        gateway.client().chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.response.headers["retry-after"] == "1"
    assert "simulated upstream rate limit" in str(raised.value)


def test_simulated_error_rate_is_deterministic(gateway_factory):
    def failures() -> list[bool]:
        config = simulated_config(error_rate=0.5, seed=7)
        config["models"]["sim"]["retry"] = {"max_retries": 0}
        config["upstreams"]["sim-up"]["circuit"] = {"enabled": False}
        gateway = gateway_factory(config)
        client = gateway.client()
        outcome = []
        for _ in range(12):
            try:
                client.chat.completions.create(
                    model="sim", messages=[{"role": "user", "content": "x"}]
                )
                outcome.append(False)
            except openai.APIStatusError as error:
                assert error.status_code == 502
                outcome.append(True)
        return outcome

    first = failures()
    assert first == failures()
    assert 2 <= sum(first) <= 10
