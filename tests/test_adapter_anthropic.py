"""The Anthropic adapter against a fake Messages API that speaks the real wire format."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import SecretStr

from metergate.config.model import ProviderConfig
from metergate.errors import GatewayError
from metergate.providers.anthropic import AnthropicAdapter
from metergate.providers.base import StreamState, UpstreamCall, Usage
from tests.upstreams import ANSWER, RECORDER, Recorder, assert_relayed_once, parse_sse, running
from tests.upstreams.anthropic_server import API_KEY, create_app

MODEL = "claude-test-1"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {}}}


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[tuple[web.Application, str]]:
    app = create_app()
    async with running(app) as url:
        yield app, url


@pytest.fixture(scope="module")
async def adapter(server: tuple[web.Application, str]) -> AsyncIterator[AnthropicAdapter]:
    config = ProviderConfig(type="anthropic", base_url=server[1], api_key=SecretStr(API_KEY))
    adapter = AnthropicAdapter("claude", config)
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
def recorder(server: tuple[web.Application, str]) -> Recorder:
    return server[0][RECORDER]


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gw-model", "messages": [{"role": "user", "content": text}], **extra}


async def chat(adapter: AnthropicAdapter, body: dict[str, Any]) -> tuple[dict[str, Any], Usage]:
    completion = await adapter.chat(UpstreamCall(body, MODEL))
    ChatCompletion.model_validate_json(completion.body)
    return orjson.loads(completion.body), completion.usage


async def stream(
    adapter: AnthropicAdapter, body: dict[str, Any], include_usage: bool = False
) -> tuple[list[Any], StreamState]:
    state = StreamState()
    items = [
        item
        async for item in adapter.chat_stream(
            UpstreamCall(body, MODEL, include_usage=include_usage), state
        )
    ]
    assert all(item.endswith(b"\n\n") for item in items), "items must hold whole events"
    events = parse_sse(b"".join(items))
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(event)
    return events, state


async def test_translates_request_and_answer(adapter: AnthropicAdapter, recorder: Recorder) -> None:
    body = {
        "model": "gw-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": "Hello"},
        ],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "NEVER",
        "user": "user-42",
        "presence_penalty": 0.5,
        "seed": 7,
        "stream_options": {"include_usage": True},
    }
    original = copy.deepcopy(body)
    answer, usage = await chat(adapter, body)

    assert body == original
    sent = recorder.last
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body == {
        "model": MODEL,
        "max_tokens": 4096,
        "system": "Be brief.\n\nAnswer in English.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["NEVER"],
        "metadata": {"user_id": "user-42"},
    }
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("msg_fake")
    assert answer["model"] == MODEL
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER, "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert usage.output_tokens == len(ANSWER.split()) and usage.cached_input_tokens == 0
    assert answer["usage"] == usage.to_openai()


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
async def test_token_limit_ends_with_length(
    adapter: AnthropicAdapter, recorder: Recorder, key: str
) -> None:
    answer, usage = await chat(adapter, user("Hi", **{key: 3}))
    assert recorder.last.body["max_tokens"] == 3
    assert answer["choices"][0]["message"]["content"] == "The quick brown"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage.output_tokens == 3


async def test_stop_sequence_ends_with_stop(adapter: AnthropicAdapter) -> None:
    answer, _ = await chat(adapter, user("Hi", stop=["fox", ""]))
    assert answer["choices"][0]["message"]["content"] == "The quick brown "
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_tool_use_answer(adapter: AnthropicAdapter, recorder: Recorder) -> None:
    answer, _ = await chat(
        adapter, user("Weather in Paris?", tools=[WEATHER, CLOCK], tool_choice="auto")
    )
    sent = recorder.last.body
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather of a city",
            "input_schema": WEATHER["function"]["parameters"],
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert sent["tool_choice"] == {"type": "auto"}
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [
        {"location": "Paris"},
        {"location": "Tokyo"},
    ]
    assert all(c["id"].startswith("toolu_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            None,
            {"type": "tool", "name": "get_time"},
        ),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, None, None),
    ],
)
async def test_tool_choice_mapping(
    adapter: AnthropicAdapter,
    recorder: Recorder,
    choice: Any,
    parallel: bool | None,
    expected: dict[str, Any] | None,
) -> None:
    extra: dict[str, Any] = {"tools": [WEATHER, CLOCK]}
    if choice is not None:
        extra["tool_choice"] = choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    answer, _ = await chat(adapter, user("Hi", **extra))
    assert recorder.last.body.get("tool_choice") == expected
    calls = answer["choices"][0]["message"].get("tool_calls") or []
    if expected and expected["type"] == "none":
        assert not calls
    else:
        assert len(calls) == (1 if parallel is False else 2)


async def test_tool_results_become_one_user_turn(
    adapter: AnthropicAdapter, recorder: Recorder
) -> None:
    arguments = '{"location": "Paris"}'
    messages = [
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                },
                {
                    "id": "toolu_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Tokyo"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "18C, sunny"},
        {
            "role": "tool",
            "tool_call_id": "toolu_b",
            "content": [{"type": "text", "text": "25C, rain"}],
        },
        {"role": "user", "content": "Thanks, summarise."},
    ]
    answer, _ = await chat(adapter, {"messages": messages, "tools": [WEATHER]})
    assert recorder.last.body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Tokyo?"}]},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_b",
                    "name": "get_weather",
                    "input": {"location": "Tokyo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "18C, sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "25C, rain"},
                {"type": "text", "text": "Thanks, summarise."},
            ],
        },
    ]
    assert answer["choices"][0]["message"]["content"] == ANSWER


async def test_images(adapter: AnthropicAdapter, recorder: Recorder) -> None:
    content = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]
    await chat(adapter, {"messages": [{"role": "user", "content": content}]})
    assert recorder.last.body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare these."},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_json_schema_becomes_a_system_instruction(
    adapter: AnthropicAdapter, recorder: Recorder
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    await chat(adapter, user("Where?", response_format=fmt))
    system = recorder.last.body["system"]
    assert "JSON" in system and "place" in system
    assert orjson.dumps(schema).decode() in system


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (user("Hi", n=2), "n > 1"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "x",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1"},
                            }
                        ],
                    }
                ]
            },
            "JSON object",
        ),
        ({"messages": [{"role": "function", "content": "x"}]}, "role"),
        ({"messages": ["not an object"]}, "`messages[0]` must be an object"),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "tools": [5]},
            "`tools[0]` must be an object",
        ),
    ],
)
async def test_unsupported_requests_fail_before_the_upstream(
    adapter: AnthropicAdapter, recorder: Recorder, body: dict[str, Any], fragment: str
) -> None:
    before = len(recorder.requests)
    with pytest.raises(GatewayError) as caught:
        await adapter.chat(UpstreamCall(body, MODEL))
    assert (caught.value.outcome, caught.value.status) == ("invalid_request", 400)
    assert fragment in caught.value.message
    assert len(recorder.requests) == before


async def test_cached_usage(adapter: AnthropicAdapter) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Long context TRIGGER:cached"},
            {"role": "user", "content": "Hi"},
        ]
    }
    answer, usage = await chat(adapter, body)
    plain, _ = await chat(adapter, {"messages": body["messages"][1:]})
    assert usage.cached_input_tokens == 1024
    assert usage.input_tokens > 256  # fresh input plus the 256 tokens written to the cache
    assert answer["usage"]["prompt_tokens"] == usage.input_tokens + 1024
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}
    assert plain["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_stream_text(adapter: AnthropicAdapter) -> None:
    body = user("Hello")
    events, state = await stream(adapter, body)
    _, usage = await chat(adapter, body)

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("msg_fake")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == ANSWER
    assert len(chunks) > 5  # one chunk per word, not one lump
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert all("usage" not in c for c in chunks)
    assert state.usage == usage
    assert state.finish_reason == "stop"


async def test_stream_usage_chunk_only_when_asked(adapter: AnthropicAdapter) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "TRIGGER:cached"},
            {"role": "user", "content": "Hello"},
        ]
    }
    events, state = await stream(adapter, body, include_usage=True)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == []
    assert state.usage is not None and state.usage.cached_input_tokens == 1024
    assert events[-2]["usage"] == state.usage.to_openai()
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


async def test_stream_tool_calls(adapter: AnthropicAdapter) -> None:
    events, state = await stream(adapter, user("Weather?", tools=[WEATHER]))
    chunks = events[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    heads = [call for call in calls if "id" in call]
    assert [(h["index"], h["type"], h["function"]["name"]) for h in heads] == [
        (0, "function", "get_weather"),
        (1, "function", "get_weather"),
    ]
    assert all(h["id"].startswith("toolu_") and h["function"]["arguments"] == "" for h in heads)
    arguments = ["", ""]
    for call in calls:
        arguments[call["index"]] += call["function"]["arguments"]
    assert [orjson.loads(a) for a in arguments] == [{"location": "Paris"}, {"location": "Tokyo"}]
    assert len(calls) > 4  # arguments arrive in fragments
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert state.finish_reason == "tool_calls"


async def test_a_streamed_tool_call_without_arguments_has_an_empty_object(
    adapter: AnthropicAdapter,
) -> None:
    """Anthropic streams a call of a tool without parameters as one empty `partial_json`:
    its arguments are "{}", as in the whole answer, not "" (which no JSON parser, the
    openai SDK's helpers included, reads)."""
    now = {"name": "now", "description": "The time", "input_schema": {"type": "object"}}
    events, _ = await stream(adapter, user("What time is it?", tools=[now]))
    calls = [call for c in events[:-1] for call in c["choices"][0]["delta"].get("tool_calls") or []]
    arguments = ["", ""]
    for call in calls:
        arguments[call["index"]] += call["function"]["arguments"]
    assert arguments == ["{}", "{}"]
    whole = await adapter.chat(UpstreamCall(user("What time is it?", tools=[now]), MODEL))
    message = orjson.loads(whole.body)["choices"][0]["message"]
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ["{}", "{}"]


@pytest.mark.parametrize(
    ("word", "outcome", "fragment"),
    [
        ("stream_error", "upstream_error", "Overloaded"),
        ("stream_cut", "upstream_error", "message_stop"),
        ("stream_abort", "connection_error", ""),
    ],
)
async def test_broken_streams(
    adapter: AnthropicAdapter, word: str, outcome: str, fragment: str
) -> None:
    state = StreamState()
    with pytest.raises(GatewayError) as caught:
        async for _ in adapter.chat_stream(UpstreamCall(user(f"TRIGGER:{word}"), MODEL), state):
            pass
    assert caught.value.outcome == outcome
    assert fragment in caught.value.message
    assert state.usage is not None and state.usage.input_tokens > 0  # known from message_start


@pytest.mark.parametrize(
    ("word", "outcome", "status", "upstream"),
    [
        ("stream_overloaded_first", "upstream_error", 502, 529),
        ("stream_rate_limited_first", "rate_limited", 429, 429),
    ],
)
async def test_stream_error_events_are_classed_as_their_answers_are(
    adapter: AnthropicAdapter, word: str, outcome: str, status: int, upstream: int
) -> None:
    """An `error` event after the 200 is the same failure as the same error answered
    with its status: an overload a 529 (which the Messages door keeps), a rate limit
    a 429, not a generic 502."""
    with pytest.raises(GatewayError) as caught:
        async for _ in adapter.chat_stream(
            UpstreamCall(user(f"TRIGGER:{word}"), MODEL), StreamState()
        ):
            pass
    failure = caught.value
    assert (failure.outcome, failure.status, failure.upstream_status) == (outcome, status, upstream)
    assert "mid-stream" in failure.message


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("word", "outcome", "status", "upstream", "message", "retry"),
    [
        ("overloaded", "upstream_error", 502, 529, "Overloaded", None),
        ("rate_limit", "rate_limited", 429, 429, "per-minute rate limit", 7.0),
        ("invalid", "upstream_rejected", 400, 400, "the trigger asked for a 400", None),
    ],
)
async def test_error_classification(
    adapter: AnthropicAdapter,
    streaming: bool,
    word: str,
    outcome: str,
    status: int,
    upstream: int,
    message: str,
    retry: float | None,
) -> None:
    call = UpstreamCall(user(f"TRIGGER:{word}"), MODEL)
    with pytest.raises(GatewayError) as caught:
        if streaming:
            async for _ in adapter.chat_stream(call, StreamState()):
                pass
        else:
            await adapter.chat(call)
    failure = caught.value
    assert (failure.outcome, failure.status, failure.upstream_status) == (outcome, status, upstream)
    assert message in failure.message
    assert failure.retry_after == retry


async def test_wrong_api_key_is_the_gateways_problem(server: tuple[web.Application, str]) -> None:
    wrong = "sk-ant-wrong-key-abcdefghijklmnop"
    adapter = AnthropicAdapter(
        "claude", ProviderConfig(type="anthropic", base_url=server[1], api_key=SecretStr(wrong))
    )
    await adapter.start()
    try:
        with pytest.raises(GatewayError) as caught:
            await adapter.chat(UpstreamCall(user("Hi"), MODEL))
    finally:
        await adapter.close()
    failure = caught.value
    assert (failure.outcome, failure.status, failure.upstream_status) == (
        "upstream_rejected",
        502,
        401,
    )
    assert "invalid x-api-key" in failure.message and wrong not in failure.message


async def test_answers_parse_with_the_openai_sdk(adapter: AnthropicAdapter) -> None:
    text = await adapter.chat(UpstreamCall(user("Hi"), MODEL))
    parsed = ChatCompletion.model_validate_json(text.body)
    assert parsed.choices[0].message.content == ANSWER
    assert parsed.usage is not None and parsed.usage.completion_tokens == text.usage.output_tokens
    tools = await adapter.chat(UpstreamCall(user("Weather?", tools=[WEATHER]), MODEL))
    parsed = ChatCompletion.model_validate_json(tools.body)
    assert parsed.choices[0].finish_reason == "tool_calls"
    calls = parsed.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls if call.type == "function"] == [
        "get_weather",
        "get_weather",
    ]


def test_default_base_url() -> None:
    adapter = AnthropicAdapter("claude", ProviderConfig(type="anthropic", api_key=SecretStr("k")))
    assert adapter.url == "https://api.anthropic.com/v1/messages"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
        (
            {
                "model": "m",
                "max_tokens": 9,
                "n": 2,
                "messages": [{"role": "user", "content": "Hi"}],
            },
            "Extra inputs",
        ),
        (
            {
                "model": "m",
                "max_tokens": 9,
                "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            },
            "alternate",
        ),
        (
            {
                "model": "m",
                "max_tokens": 9,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}
                ],
            },
            "tool_use_id",
        ),
    ],
)
async def test_fake_server_validates_like_the_api(
    server: tuple[web.Application, str], body: dict[str, Any], fragment: str
) -> None:
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server[1]}/v1/messages", json=body, headers=headers) as response,
    ):
        assert response.status == 400
        error = await response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]


async def test_fake_server_speaks_the_sdk_format(server: tuple[web.Application, str]) -> None:
    """The official anthropic SDK reads the fake's answers, so the fake is faithful."""
    client = anthropic.AsyncAnthropic(base_url=server[1], api_key=API_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "Hi"}]
    message = await client.messages.create(model=MODEL, max_tokens=50, messages=messages)
    assert message.content[0].type == "text" and message.content[0].text == ANSWER
    async with client.messages.stream(model=MODEL, max_tokens=50, messages=messages) as events:
        final = await events.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == ANSWER
    assert final.usage.output_tokens == len(ANSWER.split())
    await client.close()


@pytest.mark.parametrize("extra", [{}, {"tools": [WEATHER]}], ids=["text", "tools"])
async def test_a_whole_answer_to_a_stream_is_relayed_as_its_stream(
    adapter: AnthropicAdapter, recorder: Recorder, extra: dict[str, Any]
) -> None:
    """A server that ignores `stream: true` sends the whole message. The upstream made
    (and billed) it, so it is relayed as the stream it would have been, once: the same
    text, tool calls, finish reason and usage as the answer, not a failure to retry."""
    body = user("Weather? TRIGGER:unstreamed", **extra)
    await assert_relayed_once(recorder, partial(chat, adapter), partial(stream, adapter), body)
