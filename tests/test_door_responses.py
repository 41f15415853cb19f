"""The Responses API (POST /v1/responses, GET/DELETE /v1/responses/{id}, input items)
through a served gateway, driven by the official `openai` SDK, against the simulated
provider, Anthropic, Gemini and OpenAI-compatible servers (translated) and an OpenAI
server that has the Responses API (passed through)."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.doors import MODELS, Upstreams, ledger_row, upstreams  # noqa: F401 - fixture
from tests.harness import Gateway
from tests.upstreams import ANSWER, openai_server, responses_api

WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}
ALL = (*MODELS, "gpt-native")
EXPECTED_TEXT = {
    "claude": ANSWER,
    "gemini": ANSWER,
    "gpt": "Hello from the fake OpenAI upstream.",
    "gpt-native": responses_api.TEXT,
}
MESSAGE_EVENTS = (
    "response.output_item.added response.content_part.added( response.output_text.delta)+ "
    "response.output_text.done response.content_part.done response.output_item.done"
)
CALL_EVENTS = (
    "response.output_item.added( response.function_call_arguments.delta)+ "
    "response.function_call_arguments.done response.output_item.done"
)


@pytest.fixture
def gateway(gateway_factory: Any, upstreams: Upstreams) -> Gateway:  # noqa: F811
    return gateway_factory(upstreams.config())


def openai_requests(upstreams: Upstreams) -> list[dict[str, Any]]:  # noqa: F811
    return upstreams.openai_state.requests


@pytest.mark.parametrize("model", ALL)
def test_create_retrieve_and_ledger(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    raw = client.responses.with_raw_response.create(
        model=model, input="Hello", instructions="Be brief.", max_output_tokens=200
    )
    response = raw.parse()
    assert response.object == "response" and response.status == "completed"
    assert response.id.startswith("resp_") and response.output_text
    # Every field the SDK's type requires is there (the SDK's own parse lets some pass).
    openai.types.responses.Response.model_validate(raw.http_response.json())
    if model in EXPECTED_TEXT:
        assert response.output_text == EXPECTED_TEXT[model]
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.instructions == "Be brief." and response.max_output_tokens == 200
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    row = ledger_row(gateway, f"request_id = '{raw.headers['x-request-id']}'")
    assert (row["api"], row["model"], row["outcome"]) == ("responses", model, "success")
    assert row["output_tokens"] == response.usage.output_tokens
    assert raw.headers["x-metergate-cost-usd"] == f"{row['cost_nano'] / 1e9:.9f}"


def test_openai_upstream_with_the_responses_api_gets_it_as_it_came(
    gateway: Gateway,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    client = gateway.client()
    body: dict[str, Any] = {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "instructions": "Be brief.",
        "tools": [WEATHER, {"type": "web_search"}],  # built-in: OpenAI runs it
        "reasoning": {"effort": "low", "summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "metadata": {"team": "search"},
        "truncation": "auto",
    }
    response = client.responses.create(model="gpt-native", **body)
    assert openai_requests(upstreams)[-1] == {**body, "model": "gpt-4.1"}
    assert response.output[
        0
    ].type == "function_call" and response.id == "resp_fake" + response.id.removeprefix("resp_fake")
    # Not a chat request: the chat translation went nowhere.
    assert "messages" not in openai_requests(upstreams)[-1]


@pytest.mark.parametrize("model", ALL)
def test_stream_helper_and_semantic_events(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    unary = client.responses.create(model=model, input="Hello")
    with client.responses.stream(model=model, input="Hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    grammar = " ".join(event.type for event in events)
    assert re.fullmatch(
        rf"response.created response.in_progress {MESSAGE_EVENTS} response.completed", grammar
    ), grammar
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == unary.output_text
    assert final.status == "completed" and final.usage.output_tokens == unary.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == final.output_text
    row = ledger_row(gateway, "stream = 1")
    assert (row["api"], row["output_tokens"]) == ("responses", final.usage.output_tokens)


@pytest.mark.parametrize("model", ["sim", "claude", "gemini", "gpt-native"])
def test_streamed_function_call(gateway: Gateway, model: str) -> None:
    with gateway.client().responses.stream(
        model=model, input="Weather in Paris?", tools=[WEATHER]
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    grammar = " ".join(event.type for event in events)
    assert re.fullmatch(
        rf"response.created response.in_progress( {MESSAGE_EVENTS})?( {CALL_EVENTS})+ "
        r"response.completed",
        grammar,
    ), grammar
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and all(orjson.loads(call.arguments) for call in calls)


@pytest.mark.parametrize("model", ALL)
def test_function_calling_round_trip(gateway: Gateway, model: str) -> None:
    client = gateway.client()
    first = client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" for call in calls)
    outputs = [
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees"}
        for call in calls
    ]
    second = client.responses.create(
        model=model, previous_response_id=first.id, input=outputs, tools=[WEATHER]
    )
    assert second.previous_response_id == first.id
    assert second.output[-1].type == "message" and second.output_text


def test_previous_response_id_chain_across_upstreams(
    gateway: Gateway,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """A conversation begun on the simulator, continued on OpenAI's Responses API and then
    on Anthropic: each upstream sees the whole conversation so far, in its own format."""
    client = gateway.client()
    first = client.responses.create(model="sim", input="My name is Ada.")
    second = client.responses.create(
        model="gpt-native", previous_response_id=first.id, input="What is my name?"
    )
    sent = openai_requests(upstreams)[-1]
    assert "previous_response_id" not in sent
    texts = orjson.dumps(sent["input"]).decode()
    assert "My name is Ada." in texts and first.output_text in texts
    assert "What is my name?" in texts
    third = client.responses.create(
        model="claude", previous_response_id=second.id, input="Spell it."
    )
    turns = upstreams.claude_recorder.last.body["messages"]
    said = orjson.dumps(turns).decode()
    for text in (
        "My name is Ada.",
        first.output_text,
        "What is my name?",
        second.output_text,
        "Spell it.",
    ):
        assert text in said
    assert [turn["role"] for turn in turns] == ["user", "assistant"] * 2 + ["user"]
    assert third.output_text == ANSWER
    items = client.responses.input_items.list(third.id, order="asc")
    assert [item.content[0].text for item in items.data] == ["Spell it."]


def test_input_items_pages(gateway: Gateway) -> None:
    client = gateway.client()
    sent = [{"role": "user", "content": f"line {n}"} for n in range(5)]
    response = client.responses.create(model="sim", input=sent)
    listed = client.responses.input_items.list(response.id, order="asc")
    assert [item.content[0].text for item in listed.data] == [f"line {n}" for n in range(5)]
    newest = client.responses.input_items.list(response.id, limit=2)
    assert [item.content[0].text for item in newest.data] == ["line 4", "line 3"]
    assert newest.has_more
    every = [
        item.content[0].text for item in client.responses.input_items.list(response.id, limit=2)
    ]  # the SDK follows the pages
    assert every == [f"line {n}" for n in reversed(range(5))]


def test_delete_and_ownership(gateway: Gateway) -> None:
    client = gateway.client()
    other = openai.OpenAI(
        base_url=gateway.base_url, api_key=gateway.new_key("other"), max_retries=0
    )
    response = client.responses.create(model="sim", input="secret plans")
    for call in (
        lambda: other.responses.retrieve(response.id),
        lambda: other.responses.input_items.list(response.id),
        lambda: other.responses.delete(response.id),
        lambda: other.responses.create(
            model="sim", input="go on", previous_response_id=response.id
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert client.responses.retrieve(response.id).output_text == response.output_text
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="sim", input="go on", previous_response_id=response.id)


def test_store_false_keeps_nothing(gateway: Gateway) -> None:
    client = gateway.client()
    response = client.responses.create(model="sim", input="forget me", store=False)
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="sim", input="more", previous_response_id=response.id)


def test_translation_to_chat(gateway: Gateway, upstreams: Upstreams) -> None:  # noqa: F811
    """What a chat upstream receives for the Responses features it has an equivalent of."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    gateway.client().responses.create(
        model="gpt",
        instructions="Answer in JSON.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Describe"},
                    {
                        "type": "input_image",
                        "image_url": "https://example.com/a.png",
                        "detail": "low",
                    },
                ],
            },
        ],
        text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        max_output_tokens=99,
        reasoning={"effort": "low"},
        temperature=0.5,
        store=False,
        metadata={"team": "a"},
    )
    sent = openai_requests(upstreams)[-1]
    assert sent == {
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/a.png", "detail": "low"},
                    },
                ],
            },
        ],
        "max_completion_tokens": 99,
        "temperature": 0.5,
        "reasoning_effort": "low",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": True},
        },
    }


def test_errors(gateway: Gateway) -> None:
    client = gateway.client()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=gateway.base_url, api_key="mgk_" + "y" * 43, max_retries=0
        ).responses.create(model="sim", input="hi")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="nope", input="hi")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as builtin:
        client.responses.create(model="claude", input="hi", tools=[{"type": "web_search"}])
    assert "web_search" in builtin.value.message and "cannot serve it" in builtin.value.message
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="sim", input=[])
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="gpt-native", input="TRIGGER:500")
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="gpt-native", input="TRIGGER:429")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_missing")


def test_a_native_stream_that_breaks_is_kept_as_failed(gateway: Gateway) -> None:
    """A Responses upstream's own stream, cut before its terminal event: the caller
    gets error + response.failed, and the response's id retrieves it as failed."""
    with gateway.client().responses.stream(model="gpt-native", input="TRIGGER:cut") as stream:
        events = list(stream)
    assert [event.type for event in events][-2:] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.id == events[0].response.id and failed.status == "failed"
    assert "ended before response.completed" in failed.error.message
    kept = gateway.client().responses.retrieve(failed.id)
    assert (kept.status, kept.error.message) == ("failed", failed.error.message)


def test_stream_broken_after_its_first_byte_fails_in_kind(gateway: Gateway) -> None:
    """The OpenAI fake's `TRIGGER:cut` ends its stream before [DONE], after the words."""
    with gateway.client().responses.stream(model="gpt", input="TRIGGER:cut") as stream:
        events = list(stream)
        with pytest.raises(RuntimeError):
            stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-2:] == ["error", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.id == events[0].response.id
    assert "ended before [DONE]" in failed.error.message
    # kept, as OpenAI keeps a failed response: its id says what happened
    kept = gateway.client().responses.retrieve(failed.id)
    assert kept.status == "failed" and kept.error is not None
    assert kept.error.message == failed.error.message
    relayed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert relayed
    # what the caller received before the failure is in the failed response, not lost
    assert failed.output_text == kept.output_text == relayed
    row = ledger_row(gateway, "stream = 1")
    assert (row["api"], row["outcome"]) == ("responses", "upstream_error")


RETENTION = """
providers: {sim: {type: simulated}}
upstreams: {sim-up: {provider: sim, model: sim-model}}
models: {sim: {upstreams: [sim-up]}}
responses: {retention_hours: 0.0005, max_stored_mb: 0.004}
"""


def test_retention_and_bounded_storage(gateway_factory: Any) -> None:
    """Stored responses expire after `retention_hours` (1.8 s here) and the oldest go
    once the total passes `max_stored_mb` (about 4 KB here)."""
    gateway = gateway_factory(RETENTION)
    client = gateway.client()
    stored = [client.responses.create(model="sim", input="x" * 900) for _ in range(6)]
    database = gateway.runtime.database

    def sizes() -> list[tuple[str, int]]:
        return gateway.bg.run(
            database.fetch("SELECT id, size FROM stored_responses ORDER BY created_at")
        )

    assert [row[0] for row in sizes()] == [response.id for response in stored]
    gateway.bg.run(gateway.app.responses.purge())
    kept = sizes()
    assert sum(size for _, size in kept) <= 0.004 * 1024 * 1024
    assert [row[0] for row in kept] == [r.id for r in stored[-len(kept) :]] and kept
    newest = stored[-1].id
    assert client.responses.retrieve(newest).id == newest
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # past the retention: gone for readers at once
        try:
            client.responses.retrieve(newest)
        except openai.NotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the response outlived its retention")
    assert gateway.bg.run(gateway.app.responses.purge()) == len(kept)
    assert sizes() == []


def test_unsupported_fields_are_refused(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.base_url + "/responses",
        json={"model": "sim", "input": "hi", "background": True},
        headers={"authorization": f"Bearer {gateway.key}"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "background"


def test_stored_responses_on_postgresql(gateway_factory: Any, fresh_postgres_url: str) -> None:
    """The store's SQL (the recursive conversation query, upserts, purge) on PostgreSQL."""
    gateway = gateway_factory(
        {
            "ledger": {"url": fresh_postgres_url},
            "providers": {"sim": {"type": "simulated", "simulated": {"output_tokens": 3}}},
            "upstreams": {"sim-up": {"provider": "sim", "model": "m"}},
            "models": {"sim": {"upstreams": ["sim-up"]}},
            "responses": {"max_stored_mb": 0.0015},
        }
    )
    client = gateway.client()
    first = client.responses.create(model="sim", input="one")
    second = client.responses.create(model="sim", input="two", previous_response_id=first.id)
    third = client.responses.create(model="sim", input="three", previous_response_id=second.id)
    assert client.responses.retrieve(third.id).previous_response_id == second.id
    assert [i.content[0].text for i in client.responses.input_items.list(third.id)] == ["three"]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as broken:  # its conversation lost its start
        client.responses.create(model="sim", input="four", previous_response_id=third.id)
    assert first.id in broken.value.message
    assert gateway.bg.run(gateway.app.responses.purge()) >= 1
    assert client.responses.retrieve(third.id).id == third.id  # the newest stays
    assert {row["api"] for row in gateway.ledger_rows()} == {"responses"}


REASONING = {"gemini": ("thinking", 40), "gpt": ("reasoning", 5), "gpt-native": ("reasoning", 5)}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", list(REASONING))
def test_reasoning_tokens_are_reported_apart(gateway: Gateway, model: str, stream: bool) -> None:
    """Thinking is billed as output, and callers see how much of it was thinking: on this
    door and, from a translated upstream, on the chat door."""
    word, reasoning = REASONING[model]
    client = gateway.client()
    question = f"Think first. TRIGGER:{word}"
    if stream:
        with client.responses.stream(model=model, input=question) as events:
            usage = events.get_final_response().usage
    else:
        usage = client.responses.create(model=model, input=question).usage
    assert usage is not None and usage.output_tokens_details.reasoning_tokens == reasoning
    assert usage.output_tokens > reasoning
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}]
    )
    assert chat.usage is not None and chat.usage.completion_tokens_details is not None
    assert chat.usage.completion_tokens_details.reasoning_tokens == reasoning
    assert chat.usage.completion_tokens > reasoning


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_web_search_calls_are_billed_per_call(gateway: Gateway, stream: bool) -> None:
    """OpenAI's built-in web search costs per call ($10 per 1,000 at the default price)
    on top of the tokens: each `web_search_call` of the answer is metered."""
    client = gateway.client()
    ask: dict[str, Any] = {
        "model": "gpt-native",
        "input": "News? TRIGGER:searched",
        "tools": [{"type": "web_search"}],
    }
    if stream:
        with client.responses.stream(**ask) as events:
            response = events.get_final_response()
        row = ledger_row(gateway, "stream = 1")
    else:
        raw = client.responses.with_raw_response.create(**ask)
        response = raw.parse()
        row = ledger_row(gateway, f"request_id = '{raw.headers['x-request-id']}'")
    assert [item.type for item in response.output].count("web_search_call") == 2
    assert response.usage is not None
    tokens_nano = (response.usage.input_tokens * 2 + response.usage.output_tokens * 8) * 1000
    assert row["cost_nano"] == tokens_nano + 2 * 10_000_000  # two calls at $0.01


def test_a_hard_budget_holds_what_web_search_calls_may_cost(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """The hold counts `max_tool_calls` searches, or the model's budget_max_web_searches
    (5), which is then sent as the request's `max_tool_calls`."""
    config = upstreams.config() + "budgets:\n  tight: {limit_usd: 0.06, hard: true}\n"
    client = gateway_factory(config).client()
    ask: dict[str, Any] = {"model": "gpt-native", "input": "News?", "max_output_tokens": 50}
    ask["tools"] = [{"type": "web_search"}]
    client.responses.create(**ask)  # 5 x $0.01 fits in $0.06
    assert openai_requests(upstreams)[-1]["max_tool_calls"] == 5
    sent = len(openai_requests(upstreams))
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(**ask, max_tool_calls=10)
    message = refused.value.message
    assert "budget 'tight'" in message and "up to 10 web searches" in message, message
    assert len(openai_requests(upstreams)) == sent


def test_a_budget_refusal_names_the_doors_own_output_limit(
    gateway_factory: Any,
    upstreams: Upstreams,  # noqa: F811
) -> None:
    """A Responses caller limits its answer with `max_output_tokens`: the 429 that says
    which limit would fit names that field, not chat's `max_tokens`."""
    config = upstreams.config() + "budgets:\n  tight: {limit_usd: 0.01, hard: true}\n"
    client = gateway_factory(config).client()
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="gpt-native", input="Hello")
    message = refused.value.message
    assert "(it sent no max_output_tokens, so the gateway bounds its answer" in message
    fits = int(re.search(r"send max_output_tokens of at most (\d+) to fit", message).group(1))
    assert client.responses.create(model="gpt-native", input="Hello", max_output_tokens=fits)


@pytest.mark.parametrize("value", ["abc", True, -5, 2.5])
@pytest.mark.parametrize("field", ["max_output_tokens", "top_logprobs"])
def test_a_malformed_integer_is_a_400_naming_it(
    gateway_factory: Any, field: str, value: Any
) -> None:
    """Read as a number by the cap, the budget's worst case and every translator: a
    string there was an internal error, a boolean or a negative number went upstream."""
    gateway = gateway_factory(
        {
            "providers": {"sim": {"type": "simulated", "simulated": {"output_tokens": 3}}},
            "upstreams": {"sim-up": {"provider": "sim", "model": "m"}},
            "models": {"sim": {"upstreams": ["sim-up"], "max_tokens_cap": 50}},
            "budgets": {"all": {"limit_usd": 10, "hard": True}},
        }
    )
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.client().responses.create(model="sim", input="hi", **{field: value})
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == field  # type: ignore[index]
    assert "must be" in refused.value.message
    answered = gateway.client().responses.create(model="sim", input="hi", **{field: 7})
    assert answered.status == "completed"


WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"instructions": ["be brief"]}, "instructions"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}]}, "[0].text"),
    ({"input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
    ({"input": [{"type": "message", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    (
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
        "input[0].arguments",
    ),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "[0].output"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "any"}]}, "tools[0].parameters"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"text": {"format": "json"}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"reasoning": "high"}, "reasoning"),
    ({"reasoning": {"effort": {"k": 1}}}, "reasoning.effort"),
    ({"tool_choice": {"type": 5}}, "tool_choice.type"),
    ({"tool_choice": {}}, "tool_choice.type"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": None}]}]},
        "input[0].content[0]",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": 3}]}]},
        "input[0].content[0].image_url",
    ),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"text": "hi"}]}]}, "input[0].content[0].type"),
    ({"input": [{"call_id": "c", "output": "x"}]}, "input[0].type"),
    ({"tools": [{"type": None, "name": "f"}]}, "tools[0].type"),
]


@pytest.mark.parametrize("model", ["sim", "gpt-native"])
def test_a_wrongly_typed_field_gets_a_400_naming_it(gateway: Gateway, model: str) -> None:
    """Whatever upstream serves the model, a field of the wrong type or a missing one is
    the caller's to fix: a 400 that names it (`param`), not a generic one or a 500."""
    client = gateway.client()
    for change, field in WRONG_TYPES:
        body = {"model": model, "input": "hi", **change}
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**body)
        assert field in (refused.value.param or ""), (change, refused.value.message)
        assert field in refused.value.message
    assert not any(row["status"] == 500 for row in gateway.ledger_rows())


def test_a_refusal_is_a_refusal_part_streamed_or_not(gateway: Gateway) -> None:
    """A chat upstream's `message.refusal` (streamed as `refusal` deltas) is what the
    Responses API calls a `refusal` content part of a message item, not dropped."""
    client = gateway.client()
    ask = {"model": "gpt", "input": "Do the bad thing. TRIGGER:refuse"}
    whole = client.responses.create(**ask)
    parts = [part for item in whole.output for part in getattr(item, "content", [])]
    assert [(p.type, p.refusal) for p in parts] == [("refusal", openai_server.REFUSAL)]
    with client.responses.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    parts = [part for item in final.output for part in getattr(item, "content", [])]
    assert [(p.type, p.refusal) for p in parts] == [("refusal", openai_server.REFUSAL)]
    assert "response.refusal.delta" in kinds and "response.refusal.done" in kinds
