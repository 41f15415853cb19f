"""The Gemini adapter against a fake Gemini API that speaks the real wire format."""

from __future__ import annotations

import base64
import copy
import math
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import SecretStr

from metergate.config.model import ProviderConfig
from metergate.errors import GatewayError
from metergate.providers.base import StreamState, UpstreamCall, Usage
from metergate.providers.gemini import GeminiAdapter
from tests.upstreams import ANSWER, RECORDER, Recorder, assert_relayed_once, parse_sse, running
from tests.upstreams.gemini_server import API_KEY, create_app

MODEL = "gemini-test-flash"
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
CLOCK = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[tuple[web.Application, str]]:
    app = create_app()
    async with running(app) as url:
        yield app, url


@pytest.fixture(scope="module")
async def adapter(server: tuple[web.Application, str]) -> AsyncIterator[GeminiAdapter]:
    config = ProviderConfig(type="gemini", base_url=server[1], api_key=SecretStr(API_KEY))
    adapter = GeminiAdapter("gemini", config)
    await adapter.start()
    yield adapter
    await adapter.close()


@pytest.fixture
def recorder(server: tuple[web.Application, str]) -> Recorder:
    return server[0][RECORDER]


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gw-model", "messages": [{"role": "user", "content": text}], **extra}


async def chat(adapter: GeminiAdapter, body: dict[str, Any]) -> tuple[dict[str, Any], Usage]:
    completion = await adapter.chat(UpstreamCall(body, MODEL))
    ChatCompletion.model_validate_json(completion.body)
    return orjson.loads(completion.body), completion.usage


async def stream(
    adapter: GeminiAdapter, body: dict[str, Any], include_usage: bool = False
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


async def test_translates_request_and_answer(adapter: GeminiAdapter, recorder: Recorder) -> None:
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
        "max_tokens": 100,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.1,
        "user": "user-42",
        "logprobs": False,
    }
    original = copy.deepcopy(body)
    answer, usage = await chat(adapter, body)

    assert body == original
    sent = recorder.last
    assert sent.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief.\n\nAnswer in English."}]},
        "generationConfig": {
            "temperature": 0.3,
            "topP": 0.9,
            "seed": 7,
            "presencePenalty": 0.5,
            "frequencyPenalty": 0.1,
            "maxOutputTokens": 100,
            "stopSequences": ["NEVER"],
        },
    }
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-fakeresp")
    assert answer["model"] == MODEL
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER, "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert usage.output_tokens == len(ANSWER.split()) and usage.cached_input_tokens == 0
    assert answer["usage"] == usage.to_openai()


async def test_a_system_prompt_in_parts_keeps_them_apart(
    adapter: GeminiAdapter, recorder: Recorder
) -> None:
    """A system message in text parts (as the Messages door makes of system blocks)
    reaches the model with the parts apart, as separate system messages do: not glued
    into one line ("You are terse.Answer in French.")."""
    parts = [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Answer in French."},
    ]
    body = {
        "model": "gw-model",
        "messages": [{"role": "system", "content": parts}, *user("Hi")["messages"]],
    }
    await chat(adapter, body)
    sent = recorder.last.body["systemInstruction"]["parts"]
    assert sent == [{"text": "You are terse.\n\nAnswer in French."}]


async def test_a_pdf_file_part_is_inline_data(adapter: GeminiAdapter, recorder: Recorder) -> None:
    """A base64 PDF (a chat `file` part, as the Messages door makes of a `document`
    block) is Gemini inline data; a file id, which names a file stored with OpenAI, is
    refused naming the part."""
    pdf = base64.b64encode(b"%PDF-1.4 tiny").decode()
    file_part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{pdf}"},
    }
    content = [{"type": "text", "text": "Summarise."}, file_part]
    await chat(adapter, {"model": "gw-model", "messages": [{"role": "user", "content": content}]})
    sent = recorder.last.body["contents"][0]["parts"]
    assert sent[1] == {"inlineData": {"mimeType": "application/pdf", "data": pdf}}
    stored = {"type": "file", "file": {"file_id": "file-abc"}}
    with pytest.raises(GatewayError) as refused:
        await chat(
            adapter, {"model": "gw-model", "messages": [{"role": "user", "content": [stored]}]}
        )
    assert refused.value.param == "messages[0].content[0].file"


async def test_token_limit_ends_with_length(adapter: GeminiAdapter) -> None:
    answer, usage = await chat(adapter, user("Hi", max_completion_tokens=3))
    assert answer["choices"][0]["message"]["content"] == "The quick brown"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage.output_tokens == 3


async def test_n_becomes_candidate_count(adapter: GeminiAdapter, recorder: Recorder) -> None:
    answer, _ = await chat(adapter, user("Hi", n=2))
    assert recorder.last.body["generationConfig"] == {"candidateCount": 2}
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["message"]["content"] == ANSWER for c in answer["choices"])


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "place",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "additionalProperties": False,
                    },
                },
            },
            {
                "responseMimeType": "application/json",
                "responseJsonSchema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
        ),
        ({"type": "text"}, None),
    ],
)
async def test_response_format(
    adapter: GeminiAdapter,
    recorder: Recorder,
    response_format: dict[str, Any],
    expected: dict[str, Any] | None,
) -> None:
    await chat(adapter, user("Where?", response_format=response_format))
    assert recorder.last.body.get("generationConfig") == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
        ),
        (None, None),
    ],
)
async def test_tools_and_tool_choice(
    adapter: GeminiAdapter, recorder: Recorder, choice: Any, expected: dict[str, Any] | None
) -> None:
    extra: dict[str, Any] = {"tools": [WEATHER, CLOCK]}
    if choice is not None:
        extra["tool_choice"] = choice
    answer, _ = await chat(adapter, user("Weather in Paris?", **extra))
    sent = recorder.last.body
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather of a city",
                    "parametersJsonSchema": WEATHER["function"]["parameters"],
                },
                {"name": "get_time"},
            ]
        }
    ]
    assert (sent.get("toolConfig") or {}).get("functionCallingConfig") == expected
    choice_out = answer["choices"][0]
    if choice == "none":
        assert choice_out["finish_reason"] == "stop" and "tool_calls" not in choice_out["message"]
        return
    assert choice_out["finish_reason"] == "tool_calls"
    assert choice_out["message"]["content"] is None
    calls = choice_out["message"]["tool_calls"]
    name = "get_time" if isinstance(choice, dict) else "get_weather"
    assert [c["function"]["name"] for c in calls] == [name, name]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [
        {"location": "Paris"},
        {"location": "Tokyo"},
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


async def test_tool_results_round_trip_with_signatures(
    adapter: GeminiAdapter, recorder: Recorder
) -> None:
    question = {"role": "user", "content": "Weather in Paris and Tokyo? TRIGGER:thinking"}
    first, _ = await chat(adapter, {"messages": [question], "tools": [WEATHER]})
    message = first["choices"][0]["message"]
    calls = message["tool_calls"]
    assert calls[0]["extra_content"] == {"google": {"thought_signature": "c2lnbmF0dXJlParis"}}

    messages = [
        question,
        message,
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18C, sunny"},
        {
            "role": "tool",
            "tool_call_id": calls[1]["id"],
            "content": [{"type": "text", "text": "25C, rain"}],
        },
    ]
    answer, _ = await chat(adapter, {"messages": messages, "tools": [WEATHER]})
    contents = recorder.last.body["contents"]
    assert contents[1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
                    "thoughtSignature": "c2lnbmF0dXJlParis",
                },
                {
                    "functionCall": {"name": "get_weather", "args": {"location": "Tokyo"}},
                    "thoughtSignature": "c2lnbmF0dXJlTokyo",
                },
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"result": "18C, sunny"}}},
                {"functionResponse": {"name": "get_weather", "response": {"result": "25C, rain"}}},
            ],
        },
    ]
    assert answer["choices"][0]["message"]["content"] == ANSWER


async def test_images(adapter: GeminiAdapter, recorder: Recorder) -> None:
    content = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=2"}},
    ]
    await chat(adapter, {"messages": [{"role": "user", "content": content}]})
    assert recorder.last.body["contents"][0]["parts"] == [
        {"text": "Compare these."},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=2"}},
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "tool", "tool_call_id": "call_unknown", "content": "x"},
                ]
            },
            "call_unknown",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
        (user("Hi", tools=[{"type": "web_search"}]), "web_search"),
        (user("Hi", tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        ({"messages": [{"role": "user", "content": [None]}]}, "`messages[0].content[0]` must"),
        (user("Hi", max_tokens="many"), "`max_tokens` must be a positive integer"),
    ],
)
async def test_unsupported_requests_fail_before_the_upstream(
    adapter: GeminiAdapter, recorder: Recorder, body: dict[str, Any], fragment: str
) -> None:
    before = len(recorder.requests)
    with pytest.raises(GatewayError) as caught:
        await adapter.chat(UpstreamCall(body, MODEL))
    assert (caught.value.outcome, caught.value.status) == ("invalid_request", 400)
    assert fragment in caught.value.message
    assert len(recorder.requests) == before


async def test_cached_usage(adapter: GeminiAdapter) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Long context TRIGGER:cached"},
            {"role": "user", "content": "Hi"},
        ]
    }
    answer, usage = await chat(adapter, body)
    assert usage.cached_input_tokens == 1024 and usage.input_tokens > 0
    assert answer["usage"]["prompt_tokens"] == usage.input_tokens + 1024
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 1024}


async def test_thoughts_are_hidden_but_billed(adapter: GeminiAdapter) -> None:
    answer, usage = await chat(adapter, user("TRIGGER:thinking"))
    assert answer["choices"][0]["message"]["content"] == ANSWER
    assert usage.output_tokens == len(ANSWER.split()) + 40
    assert answer["usage"]["completion_tokens"] == usage.output_tokens


@pytest.mark.parametrize("word", ["safety", "blocked"])
async def test_filtered_answers(adapter: GeminiAdapter, word: str) -> None:
    answer, _ = await chat(adapter, user(f"TRIGGER:{word}"))
    assert len(answer["choices"]) == 1
    assert answer["choices"][0]["finish_reason"] == "content_filter"
    assert not answer["choices"][0]["message"]["content"]
    events, state = await stream(adapter, user(f"TRIGGER:{word}"))
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert state.finish_reason == "content_filter"


async def test_stream_text(adapter: GeminiAdapter, recorder: Recorder) -> None:
    body = user("Hello")
    events, state = await stream(adapter, body)
    assert recorder.last.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert recorder.last.query == {"alt": "sse"}
    _, usage = await chat(adapter, body)

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == ANSWER
    assert len(chunks) > 5
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert all("usage" not in c for c in chunks)
    assert state.usage == usage
    assert state.finish_reason == "stop"


async def test_stream_usage_chunk_only_when_asked(adapter: GeminiAdapter) -> None:
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
    assert state.usage.output_tokens == len(ANSWER.split())


async def test_stream_several_candidates(adapter: GeminiAdapter) -> None:
    events, _ = await stream(adapter, user("Hi", n=2))
    chunks = events[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content") or "" for c in mine) == ANSWER
        assert mine[-1]["finish_reason"] == "stop"


async def test_stream_tool_calls(adapter: GeminiAdapter) -> None:
    events, state = await stream(adapter, user("Weather?", tools=[WEATHER]))
    chunks = events[:-1]
    calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls") or []]
    assert [(c["index"], c["type"], c["function"]["name"]) for c in calls] == [
        (0, "function", "get_weather"),
        (1, "function", "get_weather"),
    ]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [
        {"location": "Paris"},
        {"location": "Tokyo"},
    ]
    assert all(c["id"].startswith("call_") for c in calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert state.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("word", "outcome", "fragment"),
    [
        ("stream_error", "upstream_error", "overloaded"),
        ("stream_cut", "upstream_error", "finishReason"),
        ("stream_abort", "connection_error", ""),
    ],
)
async def test_broken_streams(
    adapter: GeminiAdapter, word: str, outcome: str, fragment: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        async for _ in adapter.chat_stream(
            UpstreamCall(user(f"TRIGGER:{word}"), MODEL), StreamState()
        ):
            pass
    assert caught.value.outcome == outcome
    assert fragment in caught.value.message


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("word", "outcome", "status", "upstream", "message", "retry"),
    [
        ("overloaded", "upstream_error", 503, 503, "The model is overloaded", None),
        ("rate_limit", "rate_limited", 429, 429, "exceeded your current quota", 7.0),
        ("invalid", "upstream_rejected", 400, 400, "The trigger asked for a 400", None),
    ],
)
async def test_error_classification(
    adapter: GeminiAdapter,
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


async def test_a_stream_error_event_is_classed_by_its_code(adapter: GeminiAdapter) -> None:
    """RESOURCE_EXHAUSTED as a stream's first event is the rate limit its 429 answer
    would be, with the retry delay it names, not a generic 502."""
    call = UpstreamCall(user("TRIGGER:stream_rate_limited_first"), MODEL)
    with pytest.raises(GatewayError) as caught:
        async for _ in adapter.chat_stream(call, StreamState()):
            pass
    failure = caught.value
    assert (failure.outcome, failure.status, failure.upstream_status) == ("rate_limited", 429, 429)
    assert "exhausted" in failure.message and failure.retry_after == 7.0


async def test_bad_api_key_is_the_gateways_problem(server: tuple[web.Application, str]) -> None:
    wrong = "AIzaWrongKeyabcdefghijklmnop"
    adapter = GeminiAdapter(
        "gemini", ProviderConfig(type="gemini", base_url=server[1], api_key=SecretStr(wrong))
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
        400,
    )
    assert "API key not valid" in failure.message and wrong not in failure.message
    assert failure.error_type == "upstream_error"  # not the caller's invalid request


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_embeddings(adapter: GeminiAdapter, recorder: Recorder, encoding: str) -> None:
    texts = ["hello world", "a longer sentence to embed"]
    body = {"model": "gw-embed", "input": texts, "dimensions": 4, "encoding_format": encoding}
    completion = await adapter.embeddings(UpstreamCall(body, "models/text-embedding-test"))
    assert adapter.supports_embeddings
    assert recorder.last.path == "/v1beta/models/text-embedding-test:batchEmbedContents"
    assert recorder.last.body == {
        "requests": [
            {
                "model": "models/text-embedding-test",
                "content": {"parts": [{"text": text}]},
                "outputDimensionality": 4,
            }
            for text in texts
        ]
    }

    answer = orjson.loads(completion.body)
    if encoding == "float":  # the SDK type holds decoded vectors, after base64 decoding
        CreateEmbeddingResponse.model_validate(answer)
    tokens = sum(math.ceil(len(text) / 4) for text in texts)
    assert completion.usage == Usage(input_tokens=tokens)
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert [item["index"] for item in answer["data"]] == [0, 1]
    vectors = [item["embedding"] for item in answer["data"]]
    if encoding == "base64":
        vectors = [list(struct.unpack("<4f", base64.b64decode(v))) for v in vectors]
    assert all(len(v) == 4 for v in vectors)
    floats = await adapter.embeddings(
        UpstreamCall({**body, "encoding_format": "float"}, "text-embedding-test")
    )
    expected = [item["embedding"] for item in orjson.loads(floats.body)["data"]]
    for vector, wanted in zip(vectors, expected, strict=True):
        assert vector == pytest.approx(wanted, abs=1e-6)


async def test_embeddings_reject_token_ids(adapter: GeminiAdapter) -> None:
    with pytest.raises(GatewayError) as caught:
        await adapter.embeddings(UpstreamCall({"input": [[1, 2, 3]]}, "text-embedding-test"))
    assert (caught.value.outcome, caught.value.status) == ("invalid_request", 400)


async def test_answers_parse_with_the_openai_sdk(adapter: GeminiAdapter) -> None:
    text = await adapter.chat(UpstreamCall(user("Hi", n=2), MODEL))
    parsed = ChatCompletion.model_validate_json(text.body)
    assert [choice.message.content for choice in parsed.choices] == [ANSWER, ANSWER]
    assert parsed.usage is not None and parsed.usage.completion_tokens == text.usage.output_tokens
    tools = await adapter.chat(UpstreamCall(user("Weather?", tools=[WEATHER]), MODEL))
    parsed = ChatCompletion.model_validate_json(tools.body)
    assert parsed.choices[0].finish_reason == "tool_calls"
    calls = parsed.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls if call.type == "function"] == [
        "get_weather",
        "get_weather",
    ]


async def test_embeddings_parse_with_the_openai_sdk(adapter: GeminiAdapter) -> None:
    call = UpstreamCall({"input": "hello"}, "text-embedding-test")
    parsed = CreateEmbeddingResponse.model_validate_json((await adapter.embeddings(call)).body)
    assert len(parsed.data[0].embedding) == 8 and parsed.usage.prompt_tokens == 2


def test_urls() -> None:
    adapter = GeminiAdapter("gemini", ProviderConfig(type="gemini", api_key=SecretStr("k")))
    assert adapter._url("models/gemini-x", "generateContent") == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-x:generateContent"
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, 'Unknown name "messages"'),
        (
            {
                "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
                "generationConfig": {"max_tokens": 5},
            },
            'Unknown name "max_tokens"',
        ),
        (
            {
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}]},
                    {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                    {"role": "user", "parts": [{"text": "no answer"}]},
                ]
            },
            "function response",
        ),
        ({"contents": [{"role": "assistant", "parts": [{"text": "Hi"}]}]}, "valid role"),
    ],
)
async def test_fake_server_validates_like_the_api(
    server: tuple[web.Application, str], body: dict[str, Any], fragment: str
) -> None:
    url = f"{server[1]}/v1beta/models/{MODEL}:generateContent"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers={"x-goog-api-key": API_KEY}) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["code"] == 400
    assert fragment in error["message"]


@pytest.mark.parametrize("extra", [{}, {"tools": [WEATHER]}], ids=["text", "tools"])
async def test_a_whole_answer_to_a_stream_is_relayed_as_its_stream(
    adapter: GeminiAdapter, recorder: Recorder, extra: dict[str, Any]
) -> None:
    """A server that ignores `alt=sse` streaming sends the whole GenerateContentResponse
    (which is what each stream event is): relayed once, with the answer's text, calls,
    finish reason and usage, not failed and retried."""
    body = user("Weather? TRIGGER:unstreamed", **extra)
    await assert_relayed_once(recorder, partial(chat, adapter), partial(stream, adapter), body)
