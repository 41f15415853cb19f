"""Perplexity through its Agent API, and chat through any upstream's Responses API.

Perplexity retired its Sonar chat completions on 2026-09-27: the `perplexity` preset
now sends chat requests to the Agent API (`/v1/responses`) translated, and reads the
answer (whole or streamed) back as a chat completion, with Perplexity's search results as
`citations` and `search_results`. The cost of each request is the one Perplexity states,
request fee included. The fake speaks the Agent API's wire format and refuses what the
real one refuses (unknown fields, the retired endpoint); callers use the openai SDK.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.harness import BackgroundLoop, Gateway, UpstreamServer
from tests.upstreams import (
    ANSWER,
    RECORDER,
    Recorder,
    openai_server,
    perplexity_server,
    responses_api,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def perplexity(bg: BackgroundLoop) -> Iterator[UpstreamServer]:
    server = UpstreamServer(bg, perplexity_server.create_app())
    yield server
    server.close()


@pytest.fixture
def gateway(gateway_factory: Any, perplexity: UpstreamServer) -> Gateway:
    return gateway_factory(
        {
            "providers": {
                "pplx": {
                    "type": "openai",
                    "preset": "perplexity",
                    "base_url": f"{perplexity.url}/v1",  # the preset's is api.perplexity.ai
                    "api_key": perplexity_server.API_KEY,
                }
            },
            "upstreams": {
                "sonar-up": {"provider": "pplx", "model": "perplexity/sonar"},
                "pro-up": {"provider": "pplx", "model": "preset:pro-search"},
            },
            "models": {
                "sonar": {"upstreams": ["sonar-up"], "retry": {"max_retries": 0}},
                "pro": {"upstreams": ["pro-up"], "retry": {"max_retries": 0}},
            },
        }
    )


def recorder(server: UpstreamServer) -> Recorder:
    return server.app[RECORDER]


def ledger_row(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    rows = gateway.ledger_rows(f"request_id = '{request_id}'")
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = gateway.ledger_rows(f"request_id = '{request_id}'")
    assert len(rows) == 1, rows
    return rows[0]


def test_chat_is_served_by_the_agent_api_and_costs_what_perplexity_states(
    gateway: Gateway, perplexity: UpstreamServer
) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="sonar",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about foxes."},
        ],
        temperature=0.2,  # chat clients send it; the Agent API has no such field
        max_tokens=50,
        extra_headers={"x-request-id": "pplx-unary"},
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"
    extra = reply.model_extra or {}
    assert extra["citations"] == [r["url"] for r in perplexity_server.RESULTS]
    assert extra["search_results"] == perplexity_server.RESULTS
    sent = recorder(perplexity).last
    assert sent.path == "/v1/responses"
    assert sent.body["model"] == "perplexity/sonar" and sent.body["max_output_tokens"] == 50
    assert sent.body["input"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about foxes."},
    ]
    assert not {"temperature", "store", "messages"} & set(sent.body)
    # The request fee is in the stated cost: tokens alone would be a fraction of it.
    row = ledger_row(gateway, "pplx-unary")
    assert (row["outcome"], row["usage_estimated"]) == ("success", 0)
    assert (row["input_tokens"], row["output_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    tokens_nano = (row["input_tokens"] + row["output_tokens"]) * perplexity_server.TOKEN_PRICE * 1e3
    assert row["cost_nano"] == round(tokens_nano + perplexity_server.REQUEST_FEE * 1e9)
    assert raw.headers["x-metergate-cost-usd"] == f"{row['cost_nano'] / 1e9:.9f}"


def test_a_streamed_answer_relays_the_text_and_ends_with_the_sources(
    gateway: Gateway, perplexity: UpstreamServer
) -> None:
    stream = gateway.client().chat.completions.create(
        model="sonar",
        messages=[{"role": "user", "content": "Tell me about foxes."}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "pplx-stream"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 9  # per word
    (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == "stop"
    assert (last.model_extra or {})["citations"] == [r["url"] for r in perplexity_server.RESULTS]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 9
    assert recorder(perplexity).last.body["stream"] is True
    row = ledger_row(gateway, "pplx-stream")
    assert (row["outcome"], row["output_tokens"], row["usage_estimated"]) == ("success", 9, 0)
    tokens_nano = (row["input_tokens"] + row["output_tokens"]) * perplexity_server.TOKEN_PRICE * 1e3
    assert row["cost_nano"] == round(tokens_nano + perplexity_server.REQUEST_FEE * 1e9)


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_come_back_as_tool_calls(gateway: Gateway, stream: bool) -> None:
    client = gateway.client()
    ask = [{"role": "user", "content": "Weather in Seoul?"}]
    if stream:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in client.chat.completions.create(
            model="sonar", messages=ask, tools=[WEATHER], stream=True
        ):
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                seen = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                seen["id"] = call.id or seen["id"]
                seen["name"] = (call.function and call.function.name) or seen["name"]
                seen["arguments"] += (call.function and call.function.arguments) or ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            ("weather", '{"city": "Seoul"}')
        ]
        call_id = calls[0]["id"]
    else:
        reply = client.chat.completions.create(model="sonar", messages=ask, tools=[WEATHER])
        assert reply.choices[0].finish_reason == "tool_calls"
        (call,) = reply.choices[0].message.tool_calls or []
        assert (call.function.name, call.function.arguments) == ("weather", '{"city": "Seoul"}')
        call_id = call.id
    assert call_id.startswith("call_pplx")
    # The tool's answer goes back as a function_call_output item.
    follow = client.chat.completions.create(
        model="sonar",
        messages=[
            *ask,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Seoul"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
        ],
    )
    assert follow.choices[0].message.content == ANSWER


def test_a_deployment_model_can_name_a_perplexity_preset(
    gateway: Gateway, perplexity: UpstreamServer
) -> None:
    gateway.client().chat.completions.create(
        model="pro", messages=[{"role": "user", "content": "hi"}]
    )
    sent = recorder(perplexity).last.body
    assert sent["preset"] == "pro-search" and "model" not in sent


def test_a_failed_stream_ends_in_an_error_and_is_billed_what_was_relayed(gateway: Gateway) -> None:
    text = ""
    with pytest.raises(openai.APIError) as failed:
        for chunk in gateway.client().chat.completions.create(
            model="sonar",
            messages=[{"role": "user", "content": "Go. TRIGGER:failed"}],
            stream=True,
            extra_headers={"x-request-id": "pplx-failed"},
        ):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert "search backend unavailable" in str(failed.value)
    # Every word up to the failure, even those that came in the same read as it.
    assert text == " ".join(ANSWER.split(" ")[:3])
    row = ledger_row(gateway, "pplx-failed")
    assert (row["outcome"], row["usage_estimated"]) == ("upstream_error", 1)
    assert row["output_tokens"] >= len(text.split())


@pytest.mark.parametrize(
    ("option", "value"), [("n", 2), ("stop", ["\n"]), ("logprobs", True), ("seed", 7)]
)
def test_what_the_responses_api_cannot_do_is_refused_by_name(
    gateway: Gateway, perplexity: UpstreamServer, option: str, value: Any
) -> None:
    before = len(recorder(perplexity).requests)
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().chat.completions.create(
            model="sonar", messages=[{"role": "user", "content": "hi"}], **{option: value}
        )
    assert f"`{option}`" in refused.value.message and "Responses API" in refused.value.message
    assert len(recorder(perplexity).requests) == before


def test_the_responses_door_passes_through_and_costs_what_perplexity_states(
    gateway: Gateway, perplexity: UpstreamServer
) -> None:
    raw = gateway.client().responses.with_raw_response.create(
        model="sonar", input="Tell me about foxes.", extra_headers={"x-request-id": "pplx-resp"}
    )
    response = raw.parse()
    assert response.output_text == ANSWER
    sent = recorder(perplexity).last.body
    assert sent == {"model": "perplexity/sonar", "input": "Tell me about foxes."}
    row = ledger_row(gateway, "pplx-resp")
    assert row["api"] == "responses" and row["outcome"] == "success"
    tokens_nano = (row["input_tokens"] + row["output_tokens"]) * perplexity_server.TOKEN_PRICE * 1e3
    assert row["cost_nano"] == round(tokens_nano + perplexity_server.REQUEST_FEE * 1e9)
    assert all(r.path == "/v1/responses" for r in recorder(perplexity).requests)


# --- any OpenAI-format upstream: `chat_via: responses` ----------------------------------


@pytest.fixture
def openai_responses(bg: BackgroundLoop) -> Iterator[tuple[UpstreamServer, Any]]:
    app, state = openai_server.create_app()
    server = UpstreamServer(bg, app)
    yield server, state
    server.close()


def _via_responses(gateway_factory: Any, server: UpstreamServer) -> Any:
    """A gateway whose model `o3-pro` is served by `server`'s Responses API."""
    return gateway_factory(
        {
            "providers": {
                "o": {
                    "type": "openai",
                    "base_url": f"{server.url}/v1",
                    "api_key": openai_server.API_KEY,
                    "chat_via": "responses",
                }
            },
            "upstreams": {
                "pro-up": {"provider": "o", "model": "o3-pro", "price": {"input": 20, "output": 80}}
            },
            "models": {"o3-pro": {"upstreams": ["pro-up"], "retry": {"max_retries": 0}}},
        }
    )


def test_chat_via_responses_on_an_openai_upstream(
    gateway_factory: Any, openai_responses: Any
) -> None:
    """OpenAI's Responses-only models: chat goes to `/responses` in OpenAI's shape
    (`text.format` for response_format, function call arguments streamed in deltas)."""
    server, state = openai_responses
    client = _via_responses(gateway_factory, server).client()
    schema = {"name": "answer", "schema": {"type": "object"}, "strict": True}
    reply = client.chat.completions.create(
        model="o3-pro",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.5,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    assert reply.choices[0].message.content == responses_api.TEXT
    assert reply.usage is not None and reply.usage.completion_tokens == 7
    sent = state.requests[-1]
    assert sent["temperature"] == 0.5  # OpenAI's Responses API has it
    assert sent["store"] is False  # as chat completions: not kept unless asked
    assert sent["text"] == {"format": {"type": "json_schema", **schema}}
    arguments = ""
    for chunk in client.chat.completions.create(
        model="o3-pro",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER],
        stream=True,
    ):
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments += (call.function and call.function.arguments) or ""
    assert arguments == '{"city": "Seoul"}'
    assert state.requests[-1]["tools"] == [
        {"type": "function", **{k: v for k, v in WEATHER["function"].items()}}
    ]


def test_a_whole_answer_to_a_chat_stream_via_responses_is_relayed_once(
    gateway_factory: Any, openai_responses: Any
) -> None:
    """A Responses server that ignores `stream: true` sends the whole response, which it
    made and billed: the chat stream translated from it carries its text and usage, and
    it is metered once as reported, not failed and retried."""
    server, state = openai_responses
    gateway = _via_responses(gateway_factory, server)
    sent = len(state.requests)
    chunks = list(
        gateway.client().chat.completions.create(
            model="o3-pro",
            messages=[{"role": "user", "content": "hi TRIGGER:unstreamed"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "whole-via-responses"},
        )
    )
    assert len(state.requests) == sent + 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == responses_api.TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    (usage,) = [c.usage for c in chunks if c.usage is not None]
    row = ledger_row(gateway, "whole-via-responses")
    assert (row["outcome"], row["attempts"], row["usage_estimated"]) == ("success", 1, 0)
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
