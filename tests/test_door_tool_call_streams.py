"""Parallel tool calls streamed by an OpenAI-compatible upstream, through the `/v1/messages`
and `/v1/responses` doors, read with the official `anthropic` and `openai` SDKs.

OpenAI streams one call after the other; vLLM and some proxies interleave the argument
deltas of the calls (index 0, then 1, then 0 again). Either way each tool call must reach
the caller whole, in a stream of the door's grammar: a Messages content block or a
Responses output item is finished before the next one starts, and nothing is sent for it
after it is finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.doors import anthropic_client
from tests.harness import BackgroundLoop, Gateway, UpstreamServer

TEXT = ["Let me", " check."]
CALLS = [  # id, name, arguments (as the model writes them)
    ("call_paris", "get_weather", '{"location": "Paris", "unit": "celsius"}'),
    ("call_tokyo", "get_time", '{"city": "Tokyo"}'),
    ("call_oslo", "get_forecast", '{"city": "Oslo", "days": 3, "hourly": false}'),
]
SCRIPTS = ("sequential", "interleaved", "late")


def pieces(arguments: str) -> list[str]:
    return [arguments[at : at + 5] for at in range(0, len(arguments), 5)]


def start(index: int) -> dict[str, Any]:
    call_id, name, _ = CALLS[index]
    function = {"name": name, "arguments": ""}
    return {"index": index, "id": call_id, "type": "function", "function": function}


def piece(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": text}}


def script(name: str) -> list[dict[str, Any]]:
    """The deltas of an answer: some text, then the three calls, one after the other
    (`sequential`), or round-robin, one argument piece of each in turn (`interleaved`),
    or one after the other with each call's id and name in its second delta (`late`)."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": text} for text in TEXT]
    split = [pieces(arguments) for _, _, arguments in CALLS]
    if name == "late":
        for index, parts in enumerate(split):
            deltas.append({"tool_calls": [piece(index, parts[0])]})
            deltas.append({"tool_calls": [{**start(index), "function": {"name": CALLS[index][1]}}]})
            deltas += [{"tool_calls": [piece(index, part)]} for part in parts[1:]]
        return deltas
    if name == "sequential":
        for index, parts in enumerate(split):
            deltas.append({"tool_calls": [start(index)]})
            deltas += [{"tool_calls": [piece(index, part)]} for part in parts]
        return deltas
    for step in range(max(map(len, split))):
        for index, parts in enumerate(split):
            if step == 0:
                deltas.append({"tool_calls": [start(index)]})
            if step < len(parts):
                deltas.append({"tool_calls": [piece(index, parts[step])]})
    return deltas


def upstream_app() -> web.Application:
    """An OpenAI-compatible chat endpoint answering the script named by the model."""
    usage = {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "chatcmpl-tools", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            calls = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": a}}
                for call_id, name, a in CALLS
            ]
            message = {"role": "assistant", "content": "".join(TEXT), "tool_calls": calls}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(answer)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        chunks = [
            {"index": 0, "delta": delta, "finish_reason": None} for delta in script(body["model"])
        ]
        chunks.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
        for choice in chunks:
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture
def gateway(bg: BackgroundLoop, gateway_factory: Any) -> Iterator[Gateway]:
    server = UpstreamServer(bg, upstream_app())
    upstreams = {f"{name}-up": {"provider": "compatible", "model": name} for name in SCRIPTS}
    price = {"input": 1, "cached_input": 0.5, "output": 2}
    yield gateway_factory(
        {
            "providers": {
                "compatible": {
                    "type": "openai",
                    "base_url": f"{server.url}/v1",
                    "api_key": "sk-test",
                    "apis": [],
                }
            },
            "upstreams": {name: {**up, "price": price} for name, up in upstreams.items()},
            "models": {name: {"upstreams": [f"{name}-up"]} for name in SCRIPTS},
        }
    )
    server.close()


def expected_inputs() -> list[tuple[str, str, dict[str, Any]]]:
    return [(call_id, name, orjson.loads(arguments)) for call_id, name, arguments in CALLS]


def sequenced(spans: dict[int, list[str]], order: list[int]) -> None:
    """Each block's events are start, deltas..., stop, and blocks follow one another:
    `order` lists the block of every event as it came."""
    for block, kinds in spans.items():
        assert kinds[0] == "start" and kinds[-1] == "stop", (block, kinds)
        assert set(kinds[1:-1]) <= {"delta"}, (block, kinds)
    assert order == sorted(order), order


ANTHROPIC_TOOLS: list[Any] = [
    {"name": name, "input_schema": {"type": "object"}} for _, name, _ in CALLS
]


@pytest.mark.parametrize("model", SCRIPTS)
def test_messages_stream_carries_every_tool_call_whole(gateway: Gateway, model: str) -> None:
    ask: dict[str, Any] = {
        "model": model,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Weather, time and forecast?"}],
        "tools": ANTHROPIC_TOOLS,
    }
    spans: dict[int, list[str]] = {}
    order: list[int] = []
    deltas: dict[int, int] = {}
    with anthropic_client(gateway).messages.stream(**ask) as stream:
        for event in stream:
            if event.type.startswith("content_block_"):
                kind = event.type.removeprefix("content_block_")
                spans.setdefault(event.index, []).append(kind)
                order.append(event.index)
                deltas[event.index] = deltas.get(event.index, 0) + (kind == "delta")
        final = stream.get_final_message()
    sequenced(spans, order)
    assert [block.type for block in final.content] == ["text", *["tool_use"] * len(CALLS)]
    assert final.content[0].type == "text" and final.content[0].text == "".join(TEXT)
    calls = [(b.id, b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert calls == expected_inputs()
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 30
    if model == "sequential":  # one after the other, each call is relayed as it comes
        assert [deltas[i + 1] for i in range(len(CALLS))] == [len(pieces(a)) for *_, a in CALLS]
    unary = anthropic_client(gateway).messages.create(**ask)
    assert [(b.id, b.name, b.input) for b in unary.content if b.type == "tool_use"] == calls


RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": name, "parameters": {"type": "object"}, "strict": False}
    for _, name, _ in CALLS
]


@pytest.mark.parametrize("model", SCRIPTS)
def test_responses_stream_carries_every_tool_call_whole(gateway: Gateway, model: str) -> None:
    ask: dict[str, Any] = {"model": model, "input": "Weather?", "tools": RESPONSES_TOOLS}
    spans: dict[int, list[str]] = {}
    order: list[int] = []
    sent: dict[int, str] = {}  # the arguments each item's deltas brought
    done: dict[int, list[str]] = {}  # the arguments its .done events carry
    kinds = {
        "response.output_item.added": "start",
        "response.function_call_arguments.delta": "delta",
        "response.output_text.delta": "delta",
        "response.content_part.added": "delta",
        "response.output_text.done": "delta",
        "response.content_part.done": "delta",
        "response.function_call_arguments.done": "delta",
        "response.output_item.done": "stop",
    }
    with gateway.client().responses.stream(**ask) as stream:
        for event in stream:
            if event.type not in kinds:
                continue
            index = event.output_index
            spans.setdefault(index, []).append(kinds[event.type])
            order.append(index)
            if event.type == "response.function_call_arguments.delta":
                sent[index] = sent.get(index, "") + event.delta
            elif event.type == "response.function_call_arguments.done":
                done.setdefault(index, []).append(event.arguments)
            elif event.type == "response.output_item.done" and event.item.type == "function_call":
                done.setdefault(index, []).append(event.item.arguments)
        final = stream.get_final_response()
    sequenced(spans, order)
    assert final.status == "completed" and final.output_text == "".join(TEXT)
    assert [item.type for item in final.output] == ["message", *["function_call"] * len(CALLS)]
    calls = [
        (item.call_id, item.name, orjson.loads(item.arguments))
        for item in final.output
        if item.type == "function_call"
    ]
    assert calls == expected_inputs()
    for index, (_, _, arguments) in enumerate(CALLS, start=1):
        assert sent[index] == arguments and done[index] == [arguments, arguments]
    unary = gateway.client().responses.create(**ask)
    assert [
        (item.call_id, item.name, orjson.loads(item.arguments))
        for item in unary.output
        if item.type == "function_call"
    ] == calls
