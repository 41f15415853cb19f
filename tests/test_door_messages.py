"""POST /v1/messages and /v1/messages/count_tokens through a served gateway, driven by the
official `anthropic` SDK, against the simulated provider and local servers speaking the
Anthropic (native pass-through), OpenAI and Gemini wire formats (translated)."""

from __future__ import annotations

import base64
import re
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.doors import (
    MODELS,
    Upstreams,
    anthropic_client,
    async_anthropic_client,
    ledger_row,
    upstreams,  # noqa: F401 - fixture
)
from tests.harness import Gateway, cancel_requests
from tests.upstreams import ANSWER, anthropic_server, openai_server

WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}
EXPECTED_TEXT = {"claude": ANSWER, "gemini": ANSWER, "gpt": "".join(openai_server.WORDS)}
HELLO = [{"role": "user", "content": "Hello"}]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image").decode()
PDF = base64.b64encode(b"%PDF-1.4 fake document").decode()


@pytest.fixture
def gateway(gateway_factory: Any, upstreams: Upstreams) -> Gateway:  # noqa: F811
    return gateway_factory(upstreams.config())


def raw_events(gateway: Gateway, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The SSE events of a streamed /v1/messages answer: (event name, data)."""
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    url = gateway.base_url + "/messages"
    with httpx.Client(timeout=30) as client:
        text = client.post(url, json={**body, "stream": True}, headers=headers).text
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n", 1)
        events.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return events


@pytest.mark.parametrize("model", MODELS)
def test_create_answers_as_the_messages_api(gateway: Gateway, model: str) -> None:
    raw = anthropic_client(gateway).messages.with_raw_response.create(
        model=model, max_tokens=200, system="Be brief.", messages=HELLO
    )
    message = raw.parse()
    assert (message.type, message.role, message.stop_reason) == ("message", "assistant", "end_turn")
    assert [block.type for block in message.content] == ["text"]
    if model in EXPECTED_TEXT:
        assert message.content[0].text == EXPECTED_TEXT[model]
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    # One accounting path: the ledger row of this request, with its api.
    row = ledger_row(gateway, f"request_id = '{raw.headers['x-request-id']}'")
    assert (row["api"], row["model"], row["upstream"]) == ("messages", model, f"{model}-up")
    assert row["output_tokens"] == message.usage.output_tokens
    assert raw.headers["x-metergate-cost-usd"] == f"{row['cost_nano'] / 1e9:.9f}"
    labels = {"model": model, "api": "messages", "outcome": "success"}
    assert gateway.metric("metergate_requests_total", **labels) == 1


@pytest.mark.parametrize("model", MODELS)
async def test_async_stream_helper_matches_create(gateway: Gateway, model: str) -> None:
    client = async_anthropic_client(gateway)
    ask: dict[str, Any] = {"model": model, "max_tokens": 200, "messages": HELLO}
    unary = await client.messages.create(**ask)
    async with client.messages.stream(**ask) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1, "streamed in pieces"
    assert "".join(pieces) == final.content[0].text == unary.content[0].text
    assert final.stop_reason == unary.stop_reason == "end_turn"
    assert final.usage.output_tokens == unary.usage.output_tokens
    assert final.usage.input_tokens == unary.usage.input_tokens
    row = ledger_row(gateway, "stream = 1")
    assert (row["api"], row["output_tokens"]) == ("messages", final.usage.output_tokens)


@pytest.mark.parametrize("model", ["sim", "gemini", "gpt"])
def test_translated_stream_keeps_the_event_grammar(gateway: Gateway, model: str) -> None:
    """message_start, ping, per block start / delta... / stop, message_delta, message_stop:
    every event named as its data's type, block indexes counting up from 0."""
    tools = [] if model == "gpt" else [WEATHER]  # the OpenAI fake streams text only
    events = raw_events(
        gateway, {"model": model, "max_tokens": 100, "messages": HELLO, "tools": tools}
    )
    assert all(name == data["type"] for name, data in events)
    grammar = " ".join(name for name, _ in events)
    block = r"content_block_start( content_block_delta)+ content_block_stop"
    assert re.fullmatch(rf"message_start ping( {block})+ message_delta message_stop", grammar)
    starts = [data for name, data in events if name == "content_block_start"]
    assert [start["index"] for start in starts] == list(range(len(starts)))
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["usage"]["output_tokens"] > 0 and delta["usage"]["input_tokens"] > 0
    if tools:
        kinds = {data["delta"]["type"] for name, data in events if name == "content_block_delta"}
        assert "input_json_delta" in kinds and delta["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("model", MODELS)
def test_tool_use_round_trip(gateway: Gateway, model: str) -> None:
    client = anthropic_client(gateway)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model=model, max_tokens=200, tools=[WEATHER], messages=messages)
    assert first.stop_reason == "tool_use"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert uses and all(use.name == "get_weather" and use.input for use in uses)
    results = [
        {"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}
        for use in uses
    ]
    messages += [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": results},
    ]
    second = client.messages.create(model=model, max_tokens=200, tools=[WEATHER], messages=messages)
    assert second.stop_reason == "end_turn" and second.content[-1].type == "text"


@pytest.mark.parametrize("model", ["sim", "claude", "gemini"])
def test_stream_helper_tool_use(gateway: Gateway, model: str) -> None:
    client = anthropic_client(gateway)
    with client.messages.stream(
        model=model, max_tokens=200, tools=[WEATHER], messages=[{"role": "user", "content": "?"}]
    ) as stream:
        final = stream.get_final_message()
    uses = [block for block in final.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and uses
    assert all(isinstance(use.input, dict) and use.input for use in uses)


def test_anthropic_upstream_gets_the_request_as_it_came(
    gateway: Gateway,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """Native pass-through: system blocks, cache_control, thinking blocks and their
    signatures, images, documents, tools, stop_sequences, metadata, top_k and the
    anthropic-beta header reach Anthropic untouched; the answer comes back whole."""
    ephemeral = {"type": "ephemeral"}
    body: dict[str, Any] = {
        "max_tokens": 300,
        "system": [{"type": "text", "text": "You are terse.", "cache_control": ephemeral}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {
                        "type": "document",
                        "title": "spec",
                        "cache_control": ephemeral,
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                    },
                    {"type": "text", "text": "Summarize."},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Short it is.", "signature": "sig-1"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "A spec."},
                ],
            },
            {"role": "user", "content": "And in detail?"},
        ],
        "stop_sequences": ["lazy"],
        "metadata": {"user_id": "user-42"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [{**WEATHER, "cache_control": ephemeral}],
        "tool_choice": {"type": "none"},
    }
    beta = "interleaved-thinking-2025-05-14"
    client = anthropic_client(gateway)
    message = client.messages.create(
        model="claude", **body, extra_headers={"anthropic-beta": beta}, extra_body={"top_k": 5}
    )
    sent = upstreams.claude_recorder.last
    assert sent.body == {**body, "top_k": 5, "model": "claude-sonnet-4-5"}
    assert sent.headers["anthropic-beta"] == beta
    assert sent.headers["x-api-key"] == anthropic_server.API_KEY  # the provider's, not ours
    thinking, text = message.content
    assert (thinking.type, thinking.thinking, thinking.signature) == (
        "thinking",
        anthropic_server.THOUGHT,
        anthropic_server.SIGNATURE,
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "lazy")
    assert text.text == ANSWER[: ANSWER.index("lazy")]
    with client.messages.stream(model="claude", **body) as stream:
        final = stream.get_final_message()
    assert final.content[0].signature == anthropic_server.SIGNATURE
    assert final.model_dump(exclude={"id"}) == message.model_dump(exclude={"id"})


def test_cache_writes_and_reads_priced_as_published(gateway: Gateway) -> None:
    """Anthropic bills cache writes at 1.25x input and reads at the cached price."""
    system = [{"type": "text", "text": "TRIGGER:cached", "cache_control": {"type": "ephemeral"}}]
    client = anthropic_client(gateway)
    ask: dict[str, Any] = {"model": "claude", "max_tokens": 50, "system": system}
    raw = client.messages.with_raw_response.create(**ask, messages=HELLO)
    answers = [(raw.parse().usage, raw.headers["x-request-id"])]
    with client.messages.stream(**ask, messages=HELLO) as stream:
        answers.append((stream.get_final_message().usage, stream.response.headers["x-request-id"]))
    for usage, request_id in answers:
        assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (256, 1024)
        micro = (
            usage.input_tokens * Decimal(3)
            + 256 * Decimal("3.75")
            + 1024 * Decimal("0.3")
            + usage.output_tokens * Decimal(15)
        )
        cost = (micro / 1_000_000).quantize(Decimal("1e-9"), rounding=ROUND_HALF_UP)
        row = ledger_row(gateway, f"request_id = '{request_id}'")
        assert row["cost_nano"] == int(cost * 10**9)
        assert (row["input_tokens"], row["cached_input_tokens"]) == (usage.input_tokens + 256, 1024)


def test_web_searches_are_billed_per_search(gateway: Gateway) -> None:
    """A server-side web_search tool costs $10 per 1,000 searches on top of the tokens
    (Anthropic's usage.server_tool_use): metered, whole answers and streams alike, not
    free (web fetches cost only their tokens)."""
    client = anthropic_client(gateway)
    ask: dict[str, Any] = {"model": "claude", "max_tokens": 50, "system": "TRIGGER:searched"}
    raw = client.messages.with_raw_response.create(**ask, messages=HELLO)
    answers = [(raw.parse().usage, raw.headers["x-request-id"])]
    with client.messages.stream(**ask, messages=HELLO) as stream:
        answers.append((stream.get_final_message().usage, stream.response.headers["x-request-id"]))
    for usage, request_id in answers:
        assert usage.server_tool_use is not None
        assert usage.server_tool_use.web_search_requests == 3
        micro = usage.input_tokens * Decimal(3) + usage.output_tokens * Decimal(15)
        searches = Decimal(3) * 10 / 1000  # USD
        cost = (micro / 1_000_000 + searches).quantize(Decimal("1e-9"), rounding=ROUND_HALF_UP)
        row = ledger_row(gateway, f"request_id = '{request_id}'")
        assert row["cost_nano"] == int(cost * 10**9)


SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search"}


def test_a_hard_budget_holds_what_web_searches_may_cost(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """Searches cost per search, beyond any token count: a hard budget holds the most a
    request's search tools may run, their `max_uses`, or else the model's
    budget_max_web_searches (5), which the tool is then sent as its own limit."""
    config = upstreams.config() + "budgets:\n  tight: {limit_usd: 0.06, hard: true}\n"
    client = anthropic_client(gateway_factory(config))
    ask: dict[str, Any] = {"model": "claude", "max_tokens": 50, "messages": HELLO}
    client.messages.create(**ask, tools=[SEARCH_TOOL])  # 5 x $0.01 fits in $0.06
    sent = upstreams.claude_recorder.last.body["tools"]
    assert sent == [{**SEARCH_TOOL, "max_uses": 5}]
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(**ask, tools=[{**SEARCH_TOOL, "max_uses": 10}])
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert "budget 'tight'" in message and "up to 10 web searches" in message, message
    assert "lower the search tool's max_uses" in message
    assert len(upstreams.claude_recorder.requests) == 1


@pytest.mark.parametrize(("marker", "write_price"), [(None, 3), ({}, 3.75), ({"ttl": "1h"}, 6)])
def test_a_hard_budget_holds_prompt_bytes_at_the_cache_write_price_asked_for(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
    marker: dict[str, str] | None,
    write_price: float,
) -> None:
    """A prompt marked for the cache may be billed as cache writes, dearer than input
    ($3.75 per million for 5 minutes, $6 for an hour, at $3 input): the hold prices each
    request byte at the price the request may be billed at."""
    config = upstreams.config() + "budgets:\n  tiny: {limit_usd: 0.000001, hard: true}\n"
    gateway = gateway_factory(config)
    block: dict[str, Any] = {"type": "text", "text": "Hello " * 50}
    if marker is not None:
        block["cache_control"] = {"type": "ephemeral", **marker}
    body = orjson.dumps(
        {"model": "claude", "max_tokens": 50, "messages": [{"role": "user", "content": [block]}]}
    )
    headers = {"x-api-key": gateway.key, "content-type": "application/json"}
    answer = httpx.post(gateway.base_url + "/messages", content=body, headers=headers)
    assert answer.status_code == 429
    pico = len(body) * int(write_price * 1_000_000) + 50 * 15_000_000
    worst = (pico + 999) // 1000 / 1e9
    assert f"this request may cost up to ${worst:.6f}" in answer.json()["error"]["message"]


def test_count_tokens(gateway: Gateway, upstreams: Upstreams) -> None:  # noqa: F811
    """Exact from an Anthropic upstream (it counts), an estimate for the others."""
    client = anthropic_client(gateway)
    messages = [{"role": "user", "content": "x" * 400}]
    exact = client.messages.count_tokens(model="claude", messages=messages, tools=[WEATHER])
    sent = upstreams.claude_recorder.last
    assert sent.path == "/v1/messages/count_tokens"
    assert sent.body == {"model": "claude-sonnet-4-5", "messages": messages, "tools": [WEATHER]}
    assert exact.input_tokens == anthropic_server._prompt_tokens(sent.body)
    assert client.messages.count_tokens(model="sim", messages=messages).input_tokens == 100
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": "x" * 40}]}]
    assert client.messages.count_tokens(model="gpt", messages=with_image).input_tokens == 1610
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=messages)
    garbled = [{"role": "user", "content": "TRIGGER:garbled"}]
    with pytest.raises(anthropic.APIStatusError) as raised:  # not the SDK's JSON error
        client.messages.count_tokens(model="claude", messages=garbled)
    assert raised.value.status_code == 502
    assert "token count" in raised.value.message
    assert gateway.ledger_rows() == [], "counting is free, and not a model call"


def test_errors_outside_the_door_take_anthropic_shape_for_anthropic_callers(
    gateway: Gateway,
) -> None:
    """A wrong method on the door, and a model lookup by Anthropic's SDK (it sends
    `anthropic-version`), answer in Anthropic's shape; OpenAI's callers keep theirs."""
    wrong = httpx.get(
        f"{gateway.base_url}/messages", headers={"x-api-key": gateway.key}, timeout=10
    )
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["type"] == "error"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        anthropic_client(gateway).models.retrieve("nope")
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(gateway, api_key="mgk_" + "x" * 43).models.list()
    with pytest.raises(openai.NotFoundError) as openai_missing:
        gateway.client().models.retrieve("nope")
    assert openai_missing.value.code == "model_not_found"


OVERLOADED_AFTER_START = [{"role": "user", "content": "TRIGGER:stream_overloaded_after_start"}]


def test_an_overload_right_after_the_opening_goes_to_the_fallback(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """Anthropic may report an overload after `message_start`, before any content. No
    byte has reached the caller then, so the request still goes to the model's fallback,
    on the Messages door (events passed through) and the chat door (translated) alike;
    without one the caller gets the 529 itself, not a 200 stream that ends in an error."""
    config = upstreams.config().replace(
        "  claude: {upstreams: [claude-up], retry: {max_retries: 0}}",
        "  claude: {upstreams: [claude-up], retry: {max_retries: 0}, fallbacks: [sim]}\n"
        "  claude-alone: {upstreams: [claude-up], retry: {max_retries: 0}}",
    )
    gateway = gateway_factory(config)
    ask: dict[str, Any] = {"max_tokens": 50, "messages": OVERLOADED_AFTER_START}
    with anthropic_client(gateway).messages.stream(model="claude", **ask) as events:
        answer = events.get_final_message()
    assert answer.content[0].type == "text" and answer.content[0].text
    chunks = list(
        gateway.client().chat.completions.create(
            model="claude", messages=OVERLOADED_AFTER_START, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with (
        pytest.raises(anthropic.OverloadedError),  # an HTTP 529, not an event after a 200
        anthropic_client(gateway).messages.stream(model="claude-alone", **ask) as events,
    ):
        events.get_final_message()
    deadline = time.monotonic() + 10  # (a stream's row is written as it ends)
    while len(rows := gateway.ledger_rows()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [(r["api"], r["upstream"], r["outcome"], r["attempts"]) for r in rows] == [
        ("messages", "sim-up", "success", 2),
        ("chat", "sim-up", "success", 2),
        ("messages", "claude-up", "upstream_error", 1),
    ]
    assert rows[-1]["cost_nano"] == 0  # the failed opening is not billed


def test_a_fallback_after_a_failed_opening_is_billed_on_its_own_usage(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """The failed attempt's opening reported its prompt (1,024 tokens read from the
    cache here); the fallback that serves the request, cut short by its caller, is
    billed on its own estimate, not on the usage the failed opening reported."""
    config = upstreams.config().replace(
        "  claude: {upstreams: [claude-up], retry: {max_retries: 0}}",
        "  claude: {upstreams: [claude-up], retry: {max_retries: 0}, fallbacks: [slow]}\n"
        "  slow: {upstreams: [slow-up], retry: {max_retries: 0}}",
    )
    slow = "{type: simulated, simulated: {output_tokens: 500, tokens_per_second: 20}}"
    slow_up = "{provider: slow, model: slow-model, price: {input: 1, output: 2}}"
    config = config.replace("upstreams:\n", f"upstreams:\n  slow-up: {slow_up}\n").replace(
        "providers:\n", f"providers:\n  slow: {slow}\n"
    )
    gateway = gateway_factory(config)
    system = {"role": "system", "content": "TRIGGER:cached"}
    stream = gateway.client().chat.completions.create(
        model="claude", messages=[system, *OVERLOADED_AFTER_START], stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()  # the caller leaves
    row = ledger_row(gateway, "outcome = 'cancelled'")
    assert (row["upstream"], row["attempts"], row["usage_estimated"]) == ("slow-up", 2, 1)
    assert row["cached_input_tokens"] == 0


def test_a_body_over_the_bound_is_anthropics_request_too_large(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """A body over `server.max_body_bytes` gets the 413 type Anthropic's API uses, not
    the generic 400 one."""
    gateway = gateway_factory(upstreams.config() + "server:\n  max_body_bytes: 4096\n")
    with pytest.raises(anthropic.APIStatusError) as refused:
        anthropic_client(gateway).messages.create(
            model="sim", max_tokens=5, messages=[{"role": "user", "content": "x" * 8192}]
        )
    assert refused.value.status_code == 413
    assert refused.value.body["error"]["type"] == "request_too_large"
    assert "max_body_bytes" in refused.value.body["error"]["message"]


def test_errors_take_anthropic_shape_and_sdk_classes(gateway: Gateway) -> None:
    client = anthropic_client(gateway)
    ask: dict[str, Any] = {"max_tokens": 50, "messages": HELLO}
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic_client(gateway, api_key="mgk_" + "x" * 43).messages.create(model="sim", **ask)
    assert auth.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", **ask)
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": missing.value.body["error"]["message"]},
    }
    with pytest.raises(anthropic.BadRequestError) as server_tool:
        client.messages.create(
            model="sim", tools=[{"type": "web_search_20250305", "name": "web_search"}], **ask
        )
    assert "web_search" in server_tool.value.message
    trouble = [{"role": "user", "content": "TRIGGER:overloaded"}]
    with pytest.raises(anthropic.OverloadedError):  # Anthropic's 529 stays a 529
        client.messages.create(model="claude", max_tokens=50, messages=trouble)
    trouble = [{"role": "user", "content": "TRIGGER:rate_limit"}]
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="claude", max_tokens=50, messages=trouble)
    trouble = [{"role": "user", "content": "TRIGGER:invalid"}]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude", max_tokens=50, messages=trouble)
    trouble = [{"role": "user", "content": "TRIGGER:stream_error"}]
    stream = client.messages.stream(model="claude", max_tokens=50, messages=trouble)
    with pytest.raises(anthropic.APIStatusError) as broken, stream as events:
        events.get_final_message()
    assert broken.value.body["error"]["type"] == "overloaded_error"
    for word, raised in (
        ("overloaded", anthropic.OverloadedError),
        ("rate_limited", anthropic.RateLimitError),
    ):
        # an error event as the stream's first: its 529 (or 429), as if answered so
        trouble = [{"role": "user", "content": f"TRIGGER:stream_{word}_first"}]
        with (
            pytest.raises(raised),
            client.messages.stream(model="claude", max_tokens=50, messages=trouble) as events,
        ):
            events.get_final_message()
    # After the first byte, a failure is an `error` event (the OpenAI fake's `cut` ends
    # its stream before [DONE]).
    trouble = [{"role": "user", "content": "TRIGGER:cut"}]
    events = raw_events(gateway, {"model": "gpt", "max_tokens": 50, "messages": trouble})
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"
    assert "ended before [DONE]" in events[-1][1]["error"]["message"]
    # Without the SDK's own checks: a body missing max_tokens, and no key at all.
    url = gateway.base_url + "/messages"
    refused = httpx.post(
        url, json={"model": "sim", "messages": HELLO}, headers={"x-api-key": gateway.key}
    )
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: a positive integer is required",
    }
    anonymous = httpx.post(url, json={"model": "sim", **ask})
    assert anonymous.status_code == 401 and anonymous.json()["type"] == "error"


WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, ".0.text"),
    ({"messages": [{"role": "user", "content": [{"type": 3}]}]}, "messages.0.content.0.type"),
    ({"system": 7}, "system"),
    ({"system": [{"type": "text", "text": ["x"]}]}, "system[0].text"),
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"input_schema": {}}]}, "tools.0.name"),
    ({"tools": [{**WEATHER, "input_schema": "any"}]}, "tools.0.input_schema"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": ["tool"]}}, "tool_choice.type"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "text", "data": 5}}],
                }
            ]
        },
        "messages.0.content.0.source.data",
    ),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"metadata": "me"}, "metadata"),
    (
        {
            "messages": [
                *HELLO,
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": 1}]},
            ]
        },
        "messages.1.content.0.name",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
        "messages.0.content.0.tool_use_id",
    ),
]


@pytest.mark.parametrize("model", ["sim", "claude"])
def test_a_wrongly_typed_field_gets_a_400_naming_it(gateway: Gateway, model: str) -> None:
    """Whatever upstream serves the model, a field of the wrong type or a missing one is
    the caller's to fix: a 400 whose message names it, not a generic one or a 500."""
    url = gateway.base_url + "/messages"
    headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
    with httpx.Client(timeout=30) as client:
        for change, field in WRONG_TYPES:
            body = {"model": model, "max_tokens": 20, "messages": HELLO, **change}
            answer = client.post(url, json=body, headers=headers)
            assert answer.status_code == 400, (change, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert field in error["message"], (change, error["message"])
    assert not any(row["status"] == 500 for row in gateway.ledger_rows())


def test_models_in_anthropic_shape(gateway: Gateway) -> None:
    client = anthropic_client(gateway)
    listed = client.models.list()
    assert sorted(model.id for model in listed.data) == sorted([*MODELS, "gpt-native"])
    assert all(model.type == "model" for model in listed.data) and not listed.has_more
    assert client.models.retrieve("claude").display_name == "claude"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")
    # Without anthropic-version it stays OpenAI's list.
    assert gateway.client().models.list().data[0].object == "model"


@pytest.mark.parametrize("model", ["claude", "sim"])
def test_claude_code_setup(
    gateway: Gateway,
    upstreams: Upstreams,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    model: str,
) -> None:
    """What Claude Code does with ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN set: the SDK
    takes both from the environment and sends the key as a bearer token, calls the beta
    messages endpoint (`?beta=true`) with `anthropic-beta` flags, cached system and tool
    blocks and a `metadata.user_id`, streams, and names a model the gateway configures
    (ANTHROPIC_MODEL and ANTHROPIC_DEFAULT_{OPUS,SONNET,HAIKU}_MODEL pick them)."""
    monkeypatch.setenv("ANTHROPIC_BASE_URL", gateway.base_url.removesuffix("/v1"))
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", gateway.key)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    client = anthropic.Anthropic(max_retries=0)
    betas = ["claude-code-20250219", "interleaved-thinking-2025-05-14"]
    cached = {"cache_control": {"type": "ephemeral"}}
    with client.beta.messages.stream(
        model=model,
        max_tokens=32000,
        betas=betas,
        system=[{"type": "text", "text": "You are Claude Code.", **cached}],
        tools=[{**WEATHER, **cached}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi", **cached}]}],
        metadata={"user_id": "user_abc_account__session_1"},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    row = ledger_row(gateway, "stream = 1")
    assert (row["api"], row["model"], row["outcome"]) == ("messages", model, "success")
    if model == "claude":
        sent = upstreams.claude_recorder.last
        assert sent.headers["anthropic-beta"] == ",".join(betas)
        assert "authorization" not in sent.headers  # the gateway key stays here


def test_count_tokens_cut_by_a_shutdown_gets_an_anthropic_error(
    gateway: Gateway,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """A request outside the model pipeline (count_tokens waiting on its upstream) that a
    shutdown's grace period cuts gets a JSON 503 its SDK reads, with its request id, not
    the HTTP server's plain-text 500."""
    client = anthropic_client(gateway)
    slow = [{"role": "user", "content": "TRIGGER:slow"}]
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.messages.count_tokens, model="claude", messages=slow)
        recorder = upstreams.claude_recorder
        deadline = time.monotonic() + 10  # until the fake upstream holds it
        while not recorder.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gateway.bg.run(cancel_requests()) == 1
        with pytest.raises(anthropic.InternalServerError) as raised:
            answer.result(timeout=30)
    error = raised.value
    assert error.status_code == 503 and error.body["type"] == "error"
    request_id = error.response.headers["x-request-id"]
    assert f"request {request_id} was answered" in error.body["error"]["message"]


def test_error_shapes_follow_the_endpoint_and_anthropic_version(gateway: Gateway) -> None:
    """What the README promises: the shared paths (models, an unknown path) answer an
    Anthropic caller (`anthropic-version`) in Anthropic's error shape; the OpenAI
    endpoints answer in OpenAI's whatever the headers."""
    anthropic_caller = {"x-api-key": "mg-wrong", "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
        for path, status in [("/models", 401), ("/no-such-path", 404)]:
            answer = client.get(path, headers=anthropic_caller)
            assert answer.status_code == status, answer.text
            assert answer.json()["type"] == "error", (path, answer.text)
            assert answer.json()["error"]["message"]
        answer = client.post(
            "/chat/completions",
            json={"model": "sim", "messages": HELLO},
            headers={**anthropic_caller, "authorization": "Bearer mg-wrong"},
        )
        assert answer.status_code == 401
        assert set(answer.json()) == {"error"} and answer.json()["error"]["code"]


def test_a_refusal_stops_with_refusal_streamed_or_not(gateway: Gateway) -> None:
    """A chat upstream's refusal is the message's text and its stop reason `refusal`,
    in the stream's final message too (it ended `end_turn`)."""
    client = anthropic_client(gateway)
    ask: dict[str, Any] = {
        "model": "gpt",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Do the bad thing. TRIGGER:refuse"}],
    }
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    for message in (whole, streamed):
        assert message.stop_reason == "refusal"
        assert [block.text for block in message.content] == [openai_server.REFUSAL]
