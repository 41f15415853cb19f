"""Clients built for Azure OpenAI (`openai.AzureOpenAI`) work against the gateway: its
deployment paths name a metergate model, its `api-key` header carries the gateway key."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.harness import simulated_config

ASK = [{"role": "user", "content": "hello from azure"}]
VERSION = "2024-10-21"


@pytest.fixture
def gateway(gateway_factory):
    config = simulated_config(output_tokens=5)
    embed = {"provider": "sim", "model": "embed", "price": {"input": 0.1}}
    config["upstreams"]["sim-embed"] = embed
    config["models"]["embed"] = {"upstreams": ["sim-embed"]}
    return gateway_factory(config)


def endpoint(gateway) -> str:
    return gateway.base_url.removesuffix("/v1")


def azure(gateway, **options) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=endpoint(gateway),
        api_key=options.pop("api_key", gateway.key),
        api_version=VERSION,
        max_retries=0,
        **options,
    )


def test_chat_streaming_and_embeddings_through_deployment_paths(gateway):
    client = azure(gateway)
    reply = client.chat.completions.create(model="sim", messages=ASK)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="sim", messages=ASK, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5
    vectors = client.embeddings.create(model="embed", input=["a", "b"])
    assert len(vectors.data) == 2 and vectors.data[0].embedding
    rows = gateway.ledger_rows()
    assert [(r["key_name"], r["model"], r["outcome"]) for r in rows] == [
        ("test", "sim", "success"),
        ("test", "sim", "success"),
        ("test", "embed", "success"),
    ]
    assert gateway.metric("metergate_requests_total", key="test", model="sim") == 2


def test_the_deployment_in_the_path_names_the_model(gateway):
    pinned = azure(gateway, azure_deployment="sim")
    # the SDK sends the body's model too; on Azure, as here, the path decides
    reply = pinned.chat.completions.create(model="gpt-4o", messages=ASK)
    assert reply.usage.completion_tokens == 5
    assert gateway.ledger_rows()[-1]["model"] == "sim"
    answer = httpx.post(  # a body without a model, as Azure's REST examples send
        f"{endpoint(gateway)}/openai/deployments/sim/chat/completions?api-version={VERSION}",
        headers={"api-key": gateway.key},
        json={"messages": ASK},
    )
    assert answer.status_code == 200, answer.text
    with pytest.raises(openai.NotFoundError) as raised:
        azure(gateway).chat.completions.create(model="no-such-deployment", messages=ASK)
    assert "no-such-deployment" in raised.value.message and "sim" in raised.value.message


def test_the_api_key_header_is_checked_like_any_key(gateway):
    with pytest.raises(openai.AuthenticationError) as raised:
        azure(gateway, api_key="not-a-gateway-key").chat.completions.create(
            model="sim", messages=ASK
        )
    assert raised.value.code == "malformed_api_key"
    with pytest.raises(openai.AuthenticationError):
        azure(gateway, api_key="mgk_" + "x" * 43).chat.completions.create(model="sim", messages=ASK)
    assert all(r["outcome"] != "success" for r in gateway.ledger_rows())


def test_endpoints_outside_deployments_and_the_v1_path(gateway):
    client = azure(gateway)
    assert "sim" in [m.id for m in client.models.list()]
    answer = client.responses.create(model="sim", input="hello")
    assert answer.output_text and answer.usage.output_tokens == 5
    assert client.responses.retrieve(answer.id).id == answer.id
    # Azure's v1 API takes the plain OpenAI client on /openai/v1
    plain = openai.OpenAI(
        base_url=f"{endpoint(gateway)}/openai/v1", api_key=gateway.key, max_retries=0
    )
    assert plain.chat.completions.create(model="sim", messages=ASK).usage.completion_tokens == 5
